"""Sequence parallelism for the policy: DeepSpeed's Ulysses (ALST) attention, DPO's log-probs.

``train.sequence_parallel_size`` = P groups consecutive ranks by P. The P ranks of a group read the
same data split and collate the same micro-batch; each runs the model on its 1/P of the columns
(:func:`raydpo.logprobs.forward.sp_layout`: a padded batch's rows as they are, padding-free rows end
to end in one row), so embeddings, MLPs, norms and the chunked output head see T/P tokens, and
DeepSpeed's ``UlyssesSPAttentionHF`` exchanges heads for sequence around each attention
(all-to-all), so attention sees the whole sequence for H/P heads. Each rank sums its scored
positions per sequence; the sums are added over the group (:class:`SumOverGroup`), so every rank
holds the batch's full log-probs and the same loss. DeepSpeed reduces gradients over all ranks
(``mpu`` from ``parallel_state_sp``), which adds the P partial gradients (:func:`grad_scale`).

Masks: Ulysses drops the model's attention mask (built for T/P columns) and runs the core attention
causally over the gathered sequence. For ``sdpa``, raydpo's core attention (:func:`document_sdpa`)
rebuilds what the mask said from the gathered position ids where causal attention is not enough
(:func:`sequence_mask`): padding-free rows' sequences (positions restart) and sliding windows
shorter than the row. Flash attention reads packed sequences from the position ids itself.
"""

from __future__ import annotations

from typing import Optional

import torch


def sequence_mask(pos: torch.Tensor, window: Optional[int]) -> Optional[torch.Tensor]:
    """The attention a batch's position ids [B, T] imply, as a boolean [B, 1, T, T] mask (True:
    visible): causal, within the query's sequence (one starts where positions do not increase) and,
    with ``window``, within it. None where plain causal attention is already exact: no sequence
    starts after another in a row (a pad at position 0 followed by 1 would be one) and no window
    shorter than the row, so sdpa keeps its memory-efficient causal kernels for padded batches."""
    t = pos.shape[1]
    restarts = bool(((pos[:, 1:-1] == 0) & (pos[:, 2:] == 1)).any()) if t > 2 else False
    if not restarts and not (window and t > window):
        return None
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] <= pos[:, :-1]
    doc = starts.long().cumsum(-1)  # [B, T]
    allowed = torch.ones(t, t, dtype=torch.bool, device=pos.device).tril() & (doc[:, None, :, None] == doc[:, None, None, :])
    if window:
        allowed = allowed & ((pos[:, None, :, None] - pos[:, None, None, :]) < window)
    return allowed


def document_sdpa(sdpa):
    """transformers' sdpa attention, given the mask :func:`sequence_mask` rebuilds from the
    (gathered) position ids when the model's own was dropped."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        pos = kwargs.get("position_ids")
        if attention_mask is None and pos is not None and query.shape[2] > 1:
            attention_mask = sequence_mask(pos.to(query.device), getattr(module, "sliding_window", None))
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


class SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: the gradient times ``scale``.

    Every rank computes the same loss from the summed log-probs, so each rank's partial sums get
    dL/d(sum) once (a summing backward, as ``torch.distributed.nn.all_reduce``'s, would count it P
    times) and the reduction of the P ranks' parameter gradients adds them up. ``scale`` undoes what
    that reduction divides by beyond the data-parallel size (:func:`grad_scale`)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group, scale: float) -> torch.Tensor:
        import torch.distributed as dist

        ctx.scale = scale
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None, None


def grad_scale(size: int, zero_stage: int) -> float:
    """DeepSpeed 0.19 reduces gradients over all data and sequence ranks and divides ZeRO 0-2's by
    the data-parallel size (world / P), but ZeRO-3's reduce-scatter by the whole world: there the
    partial gradients need P times more (measured: SP=2 took half SP=1's SGD step under ZeRO-3
    only; tests/test_long_context.py checks every stage)."""
    return float(size) if zero_stage == 3 else 1.0


class SequenceParallel:
    """This rank's place in its sequence-parallel group, after :func:`setup`."""

    def __init__(self, size: int, rank: int, group, scale: float = 1.0):
        self.size, self.rank, self.group, self.scale = size, rank, group, scale

    def shard(self):
        """This rank's :class:`raydpo.logprobs.forward.SequenceShard` for ``forward_logps``."""
        from raydpo.logprobs.forward import SequenceShard

        return SequenceShard(self.size, self.rank, lambda partial: SumOverGroup.apply(partial, self.group, self.scale))


def setup(model, size: int, zero_stage: int, rows: int):
    """Patch transformers' attention for Ulysses over groups of ``size`` consecutive ranks (the
    policy trained with DeepSpeed ZeRO ``zero_stage``, ``rows`` rows per forward: 2 x the micro-batch
    of pairs for padded batches, 1 for padding-free ones, see
    :func:`raydpo.logprobs.forward.sp_layout`).

    Returns (``mpu`` for ``deepspeed.initialize``, :class:`SequenceParallel`), or (None, None) for
    ``size`` 1. Call on every rank after the process group exists and before the first forward."""
    if size == 1:
        return None, None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from raydpo.observability.quiet import deepspeed_quietly

    with deepspeed_quietly():
        import deepspeed
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attn == "sdpa":
        # Ulysses captures the core attention registered under this name; ours rebuilds the masks.
        ALL_ATTENTION_FUNCTIONS["sdpa"] = document_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"])
    # disable_in_eval: evaluation runs each rank's own eval pairs whole, without the group.
    mpu = UlyssesSPAttentionHF.register_with_transformers(model, attn, size, rows, seq_length_is_variable=True,
                                                          disable_in_eval=True)
    return mpu, SequenceParallel(size, mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_group(),
                                 grad_scale(size, zero_stage))
