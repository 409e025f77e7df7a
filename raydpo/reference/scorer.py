"""The frozen reference model as a Ray Data actor: pairs in, reference log-probs out."""

from __future__ import annotations

import os

IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


class HfBackend:
    """transformers forward: weights in ``dtype`` (or bitsandbytes ``8bit`` / ``4bit``), log-softmax
    in float32. With ``share_prompt`` each pair is one packed row, its prompt computed once
    (:mod:`raydpo.data.shared`), if a probe at start shows the model honours the packed mask;
    otherwise chosen and rejected rows go through one concatenated forward. With ``max_tokens`` the
    pairs are sorted by length and cut into forward passes of at most that many padded tokens
    (:mod:`raydpo.reference.batching`); without it all pairs given go through together.

    ``ld_alpha`` (``loss.ld_alpha``): the sums are LD-DPO-weighted as the policy's, by
    :func:`raydpo.logprobs.forward_logps`; the packed rows (whose sums are unweighted) are then off,
    each pair is two rows. ``pad_to_multiple_of`` (``train.pad_to_multiple_of``): the
    width of every padded forward."""

    def __init__(self, model_path: str, dtype: str, pad_id: int, trust_remote_code: bool = False,
                 max_tokens: int | None = None, quantization: str | None = None, share_prompt: bool = True,
                 attn_implementation: str | None = None, logits_chunk_tokens: int | None = None,
                 ld_alpha: float | None = None, pad_to_multiple_of: int | None = None):
        import torch

        from raydpo.models import load_causal_lm

        self.torch = torch
        # An actor that reserved a GPU (reference.num_gpus_per_actor > 0) sees it here.
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        # Read straight onto the device (no whole copy in host memory first).
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, frozen=True, quantization=quantization,
                                    device=str(self.device), attn_implementation=attn_implementation)
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.chunk = logits_chunk_tokens
        self.ld_alpha, self.multiple = ld_alpha, pad_to_multiple_of
        self.packed = False
        if share_prompt and ld_alpha is None:
            self.packed = self._packing_agrees()
            if not self.packed:
                import sys

                sys.stderr.write("[raydpo] reference actor: this model does not give the packed rows' numbers (probe "
                                 "pairs differ); scoring chosen and rejected rows separately\n")

    def _forward(self, cols: list, packed: bool):
        from raydpo.data.collate import collate_pairs
        from raydpo.data.shared import DENSE_MAX_WIDTH, collate_shared
        from raydpo.logprobs import forward_logps, split_pairs

        # The shared row's dense mask is [T, T]: past DENSE_MAX_WIDTH the concatenated rows (causal
        # attention without a materialized mask) take less memory than the shared prompt saves.
        packed = packed and max(len(p) + len(c) + len(r) for p, c, r in zip(*cols)) <= DENSE_MAX_WIDTH
        batch = (collate_shared(*cols, self.pad_id, pad_to_multiple_of=self.multiple) if packed
                 else collate_pairs(*cols, self.pad_id, pad_to_multiple_of=self.multiple))
        with self.torch.inference_mode():
            return split_pairs(forward_logps(self.model, {k: v.to(self.device) for k, v in batch.items()}, self.chunk,
                                             ld_alpha=self.ld_alpha))

    def _packing_agrees(self) -> bool:
        """Whether this model honours the packed 4D mask: two probe pairs scored both ways agree.
        (An attention implementation that ignores custom masks would let rejected see chosen.)"""
        # Prompts, chosen and rejected completions of two pairs of different lengths.
        probe = [[[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17]], [[18, 19], [20, 21, 22, 23, 24]]]
        window = getattr(self.model.config, "sliding_window", None)
        if window and window <= 512:  # a third pair longer than the window, so the windowed masks are probed too
            long = [5 + i % 20 for i in range(window + 8)]
            probe = [col + [part] for col, part in zip(probe, (long, long[:9], long[3:12]))]
        try:
            a, b = self._forward(probe, packed=False), self._forward(probe, packed=True)
        except Exception:  # noqa: BLE001 - a model that rejects a 4D mask takes the concatenated path
            return False
        return bool(self.torch.allclose(self.torch.cat(a), self.torch.cat(b), atol=1e-3, rtol=1e-4))

    def score(self, prompt_ids: list, chosen_ids: list, rejected_ids: list):
        """(chosen, rejected) reference log-probs, each a [B] float32 numpy array in input order."""
        import numpy as np

        from raydpo.reference.batching import pair_lengths, plan_batches

        n = len(prompt_ids)
        groups = [list(range(n))]
        if self.max_tokens:
            lengths = pair_lengths(*([len(x) for x in col] for col in (prompt_ids, chosen_ids, rejected_ids)), packed=self.packed)
            groups = plan_batches(lengths, self.max_tokens, rows_per_pair=1 if self.packed else 2)
        chosen, rejected = np.empty(n, np.float32), np.empty(n, np.float32)
        for group in groups:
            c, r = self._forward([[col[i] for i in group] for col in (prompt_ids, chosen_ids, rejected_ids)], self.packed)
            chosen[group], rejected[group] = c.float().cpu().numpy(), r.float().cpu().numpy()
        return chosen, rejected


class ReferenceScorer:
    """Callable class for ``Dataset.map_batches`` on an ``ActorPoolStrategy``.

    Each actor loads the reference once, with ``backend`` ``hf`` (:class:`HfBackend`) or ``vllm``
    (:class:`raydpo.reference.vllm_backend.VllmBackend`, ``backend_options`` its settings), and adds
    ``ref_chosen_logps`` / ``ref_rejected_logps`` ([B] float32) to every batch, scoring it
    ``batch_size`` pairs at a time. With ``shard_dir`` each scored batch is also written there as one
    cache shard; with ``workers_dir`` the actor records
    its process and node there (:mod:`raydpo.observability.workers`); ``ld_alpha`` and ``pad_to_multiple_of``: see
    :class:`HfBackend` (the vllm backend sums unweighted: the config refuses it with ``ld_alpha``).
    """

    def __init__(self, model_path: str, dtype: str, pad_id: int, trust_remote_code: bool = False,
                 shard_dir: str | None = None, max_tokens: int | None = None, quantization: str | None = None,
                 backend: str = "hf", backend_options: dict | None = None, share_prompt: bool = True,
                 attn_implementation: str | None = None, workers_dir: str | None = None,
                 logits_chunk_tokens: int | None = None, ld_alpha: float | None = None,
                 pad_to_multiple_of: int | None = None, batch_size: int | None = None):
        if workers_dir:
            from raydpo.observability.workers import record

            record(workers_dir, f"reference-{os.getpid()}", backend=backend)
        if backend == "vllm":
            from raydpo.reference.vllm_backend import VllmBackend

            self.backend = VllmBackend(model_path, dtype, trust_remote_code, **(backend_options or {}))
        else:
            self.backend = HfBackend(model_path, dtype, pad_id, trust_remote_code, max_tokens, quantization, share_prompt,
                                     attn_implementation, logits_chunk_tokens, ld_alpha, pad_to_multiple_of)
        self.shard_dir, self.batch_size = shard_dir, batch_size

    def score(self, prompt_ids: list, chosen_ids: list, rejected_ids: list):
        """(chosen, rejected) reference log-probs, each a [B] float32 numpy array in input order."""
        return self.backend.score(prompt_ids, chosen_ids, rejected_ids)

    def timed_score(self, prompt_ids: list, chosen_ids: list, rejected_ids: list):
        """:meth:`score` plus the seconds it took in this actor (the online pool reports compute time)."""
        import time

        start = time.perf_counter()
        chosen, rejected = self.score(prompt_ids, chosen_ids, rejected_ids)
        return chosen, rejected, time.perf_counter() - start

    def __call__(self, batch: "pa.Table") -> "pa.Table":  # noqa: F821
        # Arrow in and out keeps the id columns list<int32>; a numpy round trip would turn them
        # into Ray's tensor extension type. (Imported here: the GPU check builds a scorer without pyarrow.)
        import numpy as np
        import pyarrow as pa

        cols = [batch[name].to_pylist() for name in IDS]
        step = self.batch_size or max(len(cols[0]), 1)  # a shard's pairs, scored batch_size at a time
        parts = [self.score(*(col[i:i + step] for col in cols)) for i in range(0, len(cols[0]), step)]
        chosen = np.concatenate([c for c, _ in parts]) if parts else np.empty(0, np.float32)
        rejected = np.concatenate([r for _, r in parts]) if parts else np.empty(0, np.float32)
        batch = batch.append_column("ref_chosen_logps", pa.array(chosen, pa.float32()))
        batch = batch.append_column("ref_rejected_logps", pa.array(rejected, pa.float32()))
        if self.shard_dir:
            # Written here, as each batch is scored, so an interrupted run keeps what it finished.
            from raydpo.reference.store import write_shard

            write_shard(self.shard_dir, batch)
        return batch
