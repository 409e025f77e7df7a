"""One forward of a collated batch -> the sum of completion-token log-probs of each sequence."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from raydpo.logprobs.chunked import chunked_token_logps
from raydpo.logprobs.full import log_sum_sq_probs, target_logps
from raydpo.logprobs.router import RouterLoss


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of a sequence-parallel forward (:mod:`raydpo.train.sequence_parallel`)."""

    size: int
    """Ranks in the sequence-parallel group."""
    rank: int
    """This rank's index in the group: it computes the ``rank``-th of ``size`` equal column ranges."""
    reduce: Callable[[torch.Tensor], torch.Tensor]
    """Sums per-sequence partial log-probs [S] over the sequence-parallel group (differentiable)."""


def sp_layout(batch: dict[str, torch.Tensor], multiple: int, keys=("input_ids", "position_ids")) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``position_ids`` (or other [R, W] ``keys``) as the sequence-parallel group
    computes them, right-padded with 0 (position 0, weight 0) to a width that is a multiple of
    ``multiple``: a padded batch keeps its [2B, T] rows (a fixed row count, as Ulysses needs);
    padding-free rows [R, W], R varying, are laid end to end as [1, R * W] (each starts at position 0,
    so they stay separate sequences for attention that reads sequence starts from the positions)."""
    flat = "sequence_ids" in batch
    return {key: torch.nn.functional.pad(v, (0, -v.shape[1] % multiple))
            for key, v in ((k, batch[k].reshape(1, -1) if flat else batch[k]) for k in keys)}


def scored_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The positions whose prediction is scored: ``rows``, ``cols`` (the predicting position),
    ``targets`` (the token it predicts) and ``seq`` (its sequence), each [N]; and S, the sequences.

    Position t predicts token t + 1, scored where ``completion_mask[:, t + 1]``; a padded batch's
    sequences are its rows, padding-free rows name theirs in ``sequence_ids``; a shared-prompt batch
    names both the sequence and the predicting column of each token (:mod:`raydpo.data.shared`)."""
    ids = batch["input_ids"]
    if "score_seq" in batch:  # row-major: each sequence's positions consecutive and in order
        n = batch["completion_tokens"].shape[0]
        rows, at = (batch["score_seq"] < n).nonzero(as_tuple=True)
        return rows, batch["pred_cols"][rows, at], ids[rows, at], batch["score_seq"][rows, at], n
    rows, cols = batch["completion_mask"][:, 1:].bool().nonzero(as_tuple=True)
    targets = ids[:, 1:][rows, cols]
    if "sequence_ids" in batch:
        return rows, cols, targets, batch["sequence_ids"][:, 1:][rows, cols], batch["completion_tokens"].shape[0]
    return rows, cols, targets, rows, ids.shape[0]


def sum_by_sequence(token: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """[N] token log-probs, [N] sequence index -> [n] float32 sums (an index n or above is dropped)."""
    sums = torch.zeros(n + 1, device=token.device, dtype=torch.float32)
    return sums.index_add(0, seq.clamp(max=n), token.float())[:n]


@dataclass
class SequenceScores:
    """What one forward of a batch gives: per-sequence sums, each [S] float32 (S = 2B, chosen
    sequences first, then rejected ones), and the batch's router loss."""

    logps: torch.Tensor
    """Sum of the completion tokens' log-probs; with ``ld_alpha`` the tokens past the pair's shorter
    completion count ``ld_alpha`` times (:func:`length_weights`)."""
    plain: torch.Tensor
    """The unweighted sums (``logps`` itself without ``ld_alpha``): TRL's ``sft`` term reads these."""
    aligned: Optional[torch.Tensor] = None
    """With ``sum_sq``: sum over the completion tokens of ``log p(token) - log sum_v p_v^2``, without
    gradient (WPO's weight is the exp of its per-token mean)."""
    aux_loss: Optional[torch.Tensor] = None
    """With ``router_logits``: the MoE load-balancing loss (0-d) the model's own forward computes on the
    padded two-row batch, in any layout (:mod:`raydpo.logprobs.router`)."""


def length_weights(completion_tokens: torch.Tensor, seq: torch.Tensor, n: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's weight of each scored position: 1 on the first ``min(chosen, rejected)`` scored
    tokens of each completion of a pair, ``ld_alpha`` on the rest (TRL's shared and tail masks).

    completion_tokens: [n] scored tokens per sequence (n = 2B, chosen then rejected); seq: [N] the
    scored positions' sequences, each sequence's positions consecutive and in order (the row-major
    order of :func:`scored_positions`) -> [N] float32."""
    b = n // 2
    shared = torch.minimum(completion_tokens[:b], completion_tokens[b:]).repeat(2)  # [2B]
    index = torch.arange(seq.shape[0], device=seq.device)
    first = torch.full((n,), seq.shape[0], device=seq.device).scatter_reduce(0, seq, index, "amin")
    rank = index - first[seq]  # the position's place among its sequence's scored tokens, from 0
    return torch.where(rank < shared[seq], 1.0, float(ld_alpha)).float()


def attention_mask(model, batch: dict[str, torch.Tensor]):
    """The mask the model is given: a padded batch's [2B, T] one, none for padding-free rows
    (positions restart per sequence), the shared-prompt rule for shared rows."""
    if "segments" in batch:
        from raydpo.logprobs.chunked import unwrap
        from raydpo.logprobs.masks import shared_attention_mask

        return shared_attention_mask(model, unwrap(model).config, batch)
    return None if "sequence_ids" in batch else batch["attention_mask"]


def shard_inputs(batch: dict[str, torch.Tensor], shard: SequenceShard, routed: Optional[torch.Tensor],
                 scored: tuple[torch.Tensor, ...]) -> tuple[dict, Optional[torch.Tensor], tuple[torch.Tensor, ...]]:
    """This rank's part of a batch under sequence parallelism: (the model's inputs, its columns of the
    [R, W] router weights ``routed``, the scored positions ``(rows, cols, targets, seq, weight)`` it
    holds, in its own columns). Masks are left to the SP attention."""
    if "segments" in batch:  # config.rules.share_prompt_issue refuses this before any stage
        raise ValueError("shared-prompt rows cannot be sharded for sequence parallelism")
    keys = ("input_ids", "position_ids") + (("routed",) if routed is not None else ())
    layout = sp_layout(batch | {"routed": routed}, shard.size, keys)
    width = layout["input_ids"].shape[1] // shard.size
    lo = shard.rank * width
    cut = {k: v[:, lo:lo + width] for k, v in layout.items()}
    routed = cut.pop("routed", None)
    rows, cols, targets, seq, weight = scored
    if "sequence_ids" in batch:  # rows end to end: position (r, c) is column r * W + c of the one row
        rows, cols = torch.zeros_like(rows), rows * batch["input_ids"].shape[1] + cols
    cols = cols - lo
    keep = (cols >= 0) & (cols < width)
    kept = (rows[keep], cols[keep], targets[keep], seq[keep], None if weight is None else weight[keep])
    return cut | {"attention_mask": None, "use_cache": False}, routed, kept


def forward_scores(model, batch: dict[str, torch.Tensor], chunk_tokens: Optional[int] = None,
                   shard: Optional[SequenceShard] = None, ld_alpha: Optional[float] = None, sum_sq: bool = False,
                   router_logits: bool = False) -> SequenceScores:
    """One forward of a collated batch -> :class:`SequenceScores` of its 2B sequences.

    A padded batch (:func:`raydpo.data.collate.collate_pairs`, [2B, T]), padding-free rows
    (:func:`raydpo.data.collate.collate_packed`, [R, W] with ``sequence_ids``: there the attention
    mask is left out so transformers builds a block-diagonal causal mask from the restarting
    position ids) or shared-prompt rows (:func:`raydpo.data.shared.collate_shared`, [R, W], each
    pair's prompt computed once under the mask of :func:`raydpo.logprobs.masks.shared_attention_mask`).

    ``chunk_tokens`` (``model.logits_chunk_tokens``): None scores the completion positions through the
    output head in automatically sized chunks (:mod:`raydpo.logprobs.chunked`), N > 0 in chunks of N,
    0 from the model's full ``[B, T, V]`` logits. With ``shard`` the model sees only its columns of
    the batch as the group lays it out (:func:`shard_inputs`) and the per-sequence sums are reduced
    over the group, so every rank returns the whole batch's sums.
    ``ld_alpha`` (``loss.ld_alpha``): weights as :func:`length_weights`, the same on every path;
    ``sum_sq`` (``loss.use_weighting``): also the WPO sums, from the same logits (chunk by chunk, no
    second head pass); ``router_logits``: also the MoE router loss, over exactly the tokens of the
    padded batch (:mod:`raydpo.logprobs.router`, :func:`raydpo.data.collate.token_weights`).
    """
    from raydpo.data.collate import token_weights  # data.collate builds on this package

    rows, cols, targets, seq, n = scored_positions(batch)
    # Before the shard's cut: a token's weight depends on its place in the whole sequence.
    weight = None if ld_alpha is None else length_weights(batch["completion_tokens"], seq, n, ld_alpha)
    routed = token_weights(batch) if router_logits else None  # [R, W]: the router loss's token counts
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": attention_mask(model, batch), "use_cache": False}
    if shard:
        inputs, routed, (rows, cols, targets, seq, weight) = shard_inputs(batch, shard, routed, (rows, cols, targets, seq, weight))
    router = RouterLoss(model) if router_logits else None
    with router.recording() if router else contextlib.nullcontext():
        inputs |= router.forward_kwargs() if router else {}
        scored = None if chunk_tokens == 0 else chunked_token_logps(model, inputs, rows, cols, targets, chunk_tokens, sum_sq)
        if scored is None:  # full logits: the head is not cut (chunk_tokens 0, or no head to cut)
            out = model(**inputs)
            logits = out.logits[rows, cols]  # [N, V]: the scored positions only
            token, sq = target_logps(logits, targets), log_sum_sq_probs(logits) if sum_sq else None
        else:
            token, sq, out = scored
    parts = [token] + ([token * weight] if weight is not None else []) + ([token.detach() - sq] if sum_sq else [])
    sums = torch.stack([sum_by_sequence(p, seq, n) for p in parts])  # [parts, n]
    if shard:
        sums = shard.reduce(sums)  # one collective for all the sums
    plain, rest = sums[0], list(sums[1:])
    aux = router.loss(out, routed, shard.reduce if shard else None) if router else None
    # WPO's sums leave the stack detached: stacked with the log-probs they would seem to carry a gradient.
    return SequenceScores(rest.pop(0) if weight is not None else plain, plain, rest.pop(0).detach() if sum_sq else None, aux)


def forward_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: Optional[int] = None,
                  shard: Optional[SequenceShard] = None, ld_alpha: Optional[float] = None) -> torch.Tensor:
    """One forward of a collated batch -> [2B] logps, chosen sequences first, then rejected ones
    (:func:`forward_scores`' ``logps``: the trainer, the reference actors and ``raydpo.DPO``)."""
    return forward_scores(model, batch, chunk_tokens, shard, ld_alpha).logps
