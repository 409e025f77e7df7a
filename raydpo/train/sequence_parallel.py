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
computes what the mask said from the gathered position ids where causal attention is not enough
(:func:`needs_mask`): padding-free rows' sequences (positions restart) and sliding windows shorter
than the row. It does so without a [T, T] mask (:func:`document_attention`: causal sdpa per
sequence, windows in blocks under a [w, 2w] band), so memory stays linear in T and sdpa keeps its
flash / memory-efficient kernels; :func:`sequence_mask` is the dense mask it equals (the tests'
reference). Flash attention reads packed sequences from the position ids itself.
"""

from __future__ import annotations

from typing import Optional

import torch


def needs_mask(pos: torch.Tensor, window: Optional[int]) -> bool:
    """Whether plain causal attention over the rows of position ids [B, T] is not exact (see
    :func:`sequence_mask`): a sequence starts after another in a row, or a window is shorter than it."""
    t = pos.shape[1]
    restarts = bool(((pos[:, 1:-1] == 0) & (pos[:, 2:] == 1)).any()) if t > 2 else False
    return restarts or bool(window and t > window)


def sequence_mask(pos: torch.Tensor, window: Optional[int]) -> Optional[torch.Tensor]:
    """The attention a batch's position ids [B, T] imply, as a boolean [B, 1, T, T] mask (True:
    visible): causal, within the query's sequence (one starts where positions do not increase) and,
    with ``window``, within it. None where plain causal attention is already exact: no sequence
    starts after another in a row (a pad at position 0 followed by 1 would be one) and no window
    shorter than the row, so sdpa keeps its memory-efficient causal kernels for padded batches.

    The reference for :func:`document_attention`, which computes the same attention without it."""
    if not needs_mask(pos, window):
        return None
    t = pos.shape[1]
    doc = sequence_starts(pos).long().cumsum(-1)  # [B, T]
    allowed = torch.ones(t, t, dtype=torch.bool, device=pos.device).tril() & (doc[:, None, :, None] == doc[:, None, None, :])
    if window:
        allowed = allowed & ((pos[:, None, :, None] - pos[:, None, None, :]) < window)
    return allowed


def sequence_starts(pos: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids -> [B, T] bool: where a sequence starts (the row's first token, and every
    token whose position does not exceed the previous one's)."""
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] <= pos[:, :-1]
    return starts


def document_attention(core, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor,
                       window: Optional[int]) -> torch.Tensor:
    """The attention :func:`sequence_mask`'s mask describes, without a [T, T] mask.

    ``core(q, k, v, mask)``: causal attention (``mask`` None) or masked attention of q [b, H, t, D]
    on k, v [b, Hkv, s, D], returning [b, t, H, D] (transformers' sdpa). ``pos``: [B, T] position ids.
    Returns [B, T, H, D]. Each row is cut at its sequence starts (``split``, whose backward is one
    concatenation) and each sequence runs causally on its own slice, so sdpa keeps its flash /
    memory-efficient kernels and memory stays O(T); runs of one-token sequences (pads at position 0)
    go as one call with the tokens in the batch dimension. A sequence longer than ``window`` goes in
    query blocks of ``window`` tokens, each on its 2 x ``window`` keys under one shared band mask
    (:func:`windowed_attention`): O(window^2) mask, O(T) activations. Rows with equal position ids go
    together, others one by one."""
    if pos.shape[0] == 1 or bool((pos == pos[:1]).all()):
        return row_attention(core, query, key, value, pos[0], window)
    rows = zip(query.split(1), key.split(1), value.split(1), pos)
    return torch.cat([row_attention(core, q, k, v, p, window) for q, k, v, p in rows])


def row_attention(core, query, key, value, pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """:func:`document_attention` for rows that share the position ids ``pos`` [T]."""
    starts = sequence_starts(pos[None])[0].nonzero().flatten().tolist() + [pos.shape[0]]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    # Consecutive one-token sequences merge into one piece (negative length: a run of singletons).
    pieces: list[int] = []
    for n in lengths:
        if n == 1 and pieces and pieces[-1] < 0:
            pieces[-1] -= 1
        else:
            pieces.append(-1 if n == 1 else n)
    sizes = [abs(n) for n in pieces]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    outs = []
    for n, a, q, k, v in zip(pieces, bounds, query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)):
        if n < 0:  # one-token sequences, each attending to itself only: the tokens as a batch
            b, r = q.shape[0], -n
            flat = lambda x: x.transpose(1, 2).reshape(b * r, x.shape[1], 1, x.shape[3])  # noqa: E731
            outs.append(core(flat(q), flat(k), flat(v), None).reshape(b, r, *q.shape[1:2], q.shape[3]))
        elif window and n > window:
            outs.append(windowed_attention(core, q, k, v, pos[a:a + n], window))
        else:
            outs.append(core(q, k, v, None))
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0]


def windowed_attention(core, q, k, v, pos: torch.Tensor, w: int) -> torch.Tensor:
    """One sequence of L > ``w`` tokens (q [b, H, L, D], k, v [b, Hkv, L, D], positions ``pos`` [L])
    under a sliding window: query i sees keys j <= i with pos[i] - pos[j] < w. With L = h + n w
    (1 <= h <= w): the first h + w queries on their keys under a local mask of at most 2w x 2w, then
    the other n - 1 blocks of w queries as one batch, each block on the 2w keys before its end under
    one [w, 2w] band mask. Positions that do not count up by one (not from raydpo's collation) get
    the sequence's own dense [L, L] mask instead."""
    length, dev = q.shape[2], q.device
    if not bool((pos[1:] - pos[:-1] == 1).all()):
        mask = torch.ones(length, length, dtype=torch.bool, device=dev).tril() & ((pos[:, None] - pos[None, :]) < w)
        return core(q, k, v, mask[None, None])
    n = (length - 1) // w
    first = length - (n - 1) * w  # h + w
    i = torch.arange(first, device=dev)
    local = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :]) < w)
    head = core(q[:, :, :first], k[:, :, :first], v[:, :, :first], local[None, None])
    if n == 1:
        return head
    b, heads, _, d = q.shape
    blocks = n - 1
    qb = q[:, :, first:].unflatten(2, (blocks, w)).transpose(1, 2).reshape(b * blocks, heads, w, d)

    def keys(x):  # block j's queries are tokens first + j w ...; its keys start w earlier: first - w + j w
        windows = x[:, :, first - w:].unfold(2, 2 * w, w)  # [b, Hkv, blocks, D, 2w]
        return windows.permute(0, 2, 1, 4, 3).reshape(b * blocks, x.shape[1], 2 * w, d)

    j, m = torch.arange(w, device=dev)[:, None], torch.arange(2 * w, device=dev)[None, :]
    band = (m <= j + w) & (m > j)  # key m is token (block start - w + m): causal, within w
    rest = core(qb, keys(k), keys(v), band[None, None]).reshape(b, blocks * w, heads, d)
    return torch.cat([head, rest], 1)


def document_sdpa(sdpa):
    """transformers' sdpa attention for the gathered sequence whose mask Ulysses dropped: where plain
    causal attention is not exact (:func:`needs_mask`), :func:`document_attention` over the
    (gathered) position ids, causal per sequence, without a [T, T] mask. ``position_bias`` (an
    additive bias over the whole [T, T]) keeps the dense mask of :func:`sequence_mask`.
    Soft-capping (Gemma 2) is not sdpa's: transformers' sdpa ignores ``softcap`` either way."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        pos = kwargs.get("position_ids")
        if attention_mask is None and pos is not None and query.shape[2] > 1:
            pos = pos.to(query.device)
            # Mistral passes its window as an argument; Gemma's layers hold theirs.
            window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
            if needs_mask(pos, window):
                # An additive bias over [T, T], or is_causal passed by position: the dense mask.
                if kwargs.get("position_bias") is not None or len(args) > 2:
                    return sdpa(module, query, key, value, sequence_mask(pos, window), *args, **kwargs)
                causal = kwargs | {"is_causal": True}  # as the mask: causal whatever the module says
                core = lambda q, k, v, mask: sdpa(module, q, k, v, mask, *args, **causal)[0]  # noqa: E731
                return document_attention(core, query, key, value, pos, window), None
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


_NO_LOCAL_MASKS: dict[int, tuple] = {}  # id(config) -> (weakref to the config, weakref to the SP model)


def skip_local_masks(model) -> None:
    """Stop transformers building ``model``'s own sdpa masks while it trains under Ulysses.

    Each rank's forward sees its T/P columns, whose position ids restart (padding-free rows), so
    transformers builds a dense [B, 1, T/P, T/P] packed-sequence mask (and temporaries) per forward,
    which Ulysses then drops: quadratic in T for nothing (measured: 3 GB per rank at T = 64k, SP 2).
    While ``model`` trains, transformers' sdpa mask function returns None for its config (None is
    what it returns for plain causal batches too); in eval (Ulysses off, ``disable_in_eval``) and
    for every other model it builds the masks as before."""
    import weakref

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        _NO_LOCAL_MASKS[id(config)] = (weakref.ref(config), weakref.ref(model))
    build = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(build, "raydpo_sp", False):
        return

    def sdpa_mask(*args, config=None, **kwargs):
        config_ref, model_ref = _NO_LOCAL_MASKS.get(id(config), (lambda: None, lambda: None))
        sp_model = model_ref()
        if config is not None and config_ref() is config and sp_model is not None and sp_model.training:
            return None
        return build(*args, config=config, **kwargs)

    sdpa_mask.raydpo_sp = True
    ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = sdpa_mask


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

        # DeepSpeed's view of the group Ray Train made (NCCL for GPU workers, gloo for CPU ones).
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attn == "sdpa":
        # Ulysses captures the core attention registered under this name; ours rebuilds the masks.
        ALL_ATTENTION_FUNCTIONS["sdpa"] = document_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"])
        skip_local_masks(model)
    # disable_in_eval: evaluation runs each rank's own eval pairs whole, without the group.
    mpu = UlyssesSPAttentionHF.register_with_transformers(model, attn, size, rows, seq_length_is_variable=True,
                                                          disable_in_eval=True)
    return mpu, SequenceParallel(size, mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_group(),
                                 grad_scale(size, zero_stage))
