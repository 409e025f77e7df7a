"""The frozen reference model as a Ray Data actor: pairs in, reference log-probs out."""

from __future__ import annotations

import pyarrow as pa


class ReferenceScorer:
    """Callable class for ``Dataset.map_batches`` on an ``ActorPoolStrategy``.

    Each actor loads the reference once (weights in ``dtype``, log-softmax in float32) and adds
    ``ref_chosen_logps`` / ``ref_rejected_logps`` ([B] float32) to every batch, scoring chosen and
    rejected sequences in one concatenated forward pass. With ``shard_dir`` each scored batch is
    also written there as a cache shard.
    """

    def __init__(self, model_path: str, dtype: str, pad_id: int, trust_remote_code: bool = False,
                 shard_dir: str | None = None):
        import torch

        from raydpo.models import load_causal_lm

        self.torch = torch
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, frozen=True)
        # An actor that reserved a GPU (reference.num_gpus_per_actor > 0) sees it here.
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model.to(self.device)
        self.pad_id = pad_id
        self.shard_dir = shard_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raydpo.data.collate import collate_pairs
        from raydpo.logprobs import forward_logps, split_pairs

        # Arrow in and out keeps the id columns list<int32>; a numpy round trip would turn them
        # into Ray's tensor extension type.
        ids = [batch[name].to_pylist() for name in ("prompt_ids", "chosen_ids", "rejected_ids")]
        inputs = {k: v.to(self.device) for k, v in collate_pairs(*ids, self.pad_id).items()}
        with self.torch.inference_mode():
            chosen, rejected = split_pairs(forward_logps(self.model, inputs))
        batch = batch.append_column("ref_chosen_logps", pa.array(chosen.cpu().numpy(), pa.float32()))
        batch = batch.append_column("ref_rejected_logps", pa.array(rejected.cpu().numpy(), pa.float32()))
        if self.shard_dir:
            # Written here, as each batch is scored, so an interrupted run keeps what it finished.
            from raydpo.reference.store import write_shard

            write_shard(self.shard_dir, batch)
        return batch
