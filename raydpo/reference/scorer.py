"""The frozen reference model as a Ray Data actor: pairs in, reference log-probs out."""

from __future__ import annotations

import pyarrow as pa

IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


class HfBackend:
    """transformers forward: weights in ``dtype`` (or bitsandbytes ``8bit`` / ``4bit``), log-softmax
    in float32, chosen and rejected of a group in one concatenated forward pass. With ``max_tokens``
    the pairs are sorted by length and cut into forward passes of at most that many padded tokens
    (:mod:`raydpo.reference.batching`); without it all pairs given go through together."""

    def __init__(self, model_path: str, dtype: str, pad_id: int, trust_remote_code: bool = False,
                 max_tokens: int | None = None, quantization: str | None = None):
        import torch

        from raydpo.models import load_causal_lm

        self.torch = torch
        # An actor that reserved a GPU (reference.num_gpus_per_actor > 0) sees it here.
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, frozen=True, quantization=quantization,
                                    device=str(self.device))
        if quantization is None:  # quantized weights are loaded in place and cannot be moved
            self.model.to(self.device)
        self.pad_id = pad_id
        self.max_tokens = max_tokens

    def score(self, prompt_ids: list, chosen_ids: list, rejected_ids: list):
        """(chosen, rejected) reference log-probs, each a [B] float32 numpy array in input order."""
        import numpy as np

        from raydpo.data.collate import collate_pairs
        from raydpo.logprobs import forward_logps, split_pairs
        from raydpo.reference.batching import pair_lengths, plan_batches

        n = len(prompt_ids)
        groups = [list(range(n))]
        if self.max_tokens:
            lengths = pair_lengths(*([len(x) for x in col] for col in (prompt_ids, chosen_ids, rejected_ids)))
            groups = plan_batches(lengths, self.max_tokens)
        chosen, rejected = np.empty(n, np.float32), np.empty(n, np.float32)
        for group in groups:
            cols = [[col[i] for i in group] for col in (prompt_ids, chosen_ids, rejected_ids)]
            inputs = {k: v.to(self.device) for k, v in collate_pairs(*cols, self.pad_id).items()}
            with self.torch.inference_mode():
                c, r = split_pairs(forward_logps(self.model, inputs))
            chosen[group], rejected[group] = c.float().cpu().numpy(), r.float().cpu().numpy()
        return chosen, rejected


class ReferenceScorer:
    """Callable class for ``Dataset.map_batches`` on an ``ActorPoolStrategy``.

    Each actor loads the reference once, with ``backend`` ``hf`` (:class:`HfBackend`) or ``vllm``
    (:class:`raydpo.reference.vllm_backend.VllmBackend`, ``backend_options`` its settings), and adds
    ``ref_chosen_logps`` / ``ref_rejected_logps`` ([B] float32) to every batch. With ``shard_dir``
    each scored batch is also written there as a cache shard.
    """

    def __init__(self, model_path: str, dtype: str, pad_id: int, trust_remote_code: bool = False,
                 shard_dir: str | None = None, max_tokens: int | None = None, quantization: str | None = None,
                 backend: str = "hf", backend_options: dict | None = None):
        if backend == "vllm":
            from raydpo.reference.vllm_backend import VllmBackend

            self.backend = VllmBackend(model_path, dtype, trust_remote_code, **(backend_options or {}))
        else:
            self.backend = HfBackend(model_path, dtype, pad_id, trust_remote_code, max_tokens, quantization)
        self.shard_dir = shard_dir

    def score(self, prompt_ids: list, chosen_ids: list, rejected_ids: list):
        """(chosen, rejected) reference log-probs, each a [B] float32 numpy array in input order."""
        return self.backend.score(prompt_ids, chosen_ids, rejected_ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Arrow in and out keeps the id columns list<int32>; a numpy round trip would turn them
        # into Ray's tensor extension type.
        chosen, rejected = self.score(*(batch[name].to_pylist() for name in IDS))
        batch = batch.append_column("ref_chosen_logps", pa.array(chosen, pa.float32()))
        batch = batch.append_column("ref_rejected_logps", pa.array(rejected, pa.float32()))
        if self.shard_dir:
            # Written here, as each batch is scored, so an interrupted run keeps what it finished.
            from raydpo.reference.store import write_shard

            write_shard(self.shard_dir, batch)
        return batch
