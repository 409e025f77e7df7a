"""One forward of a collated batch -> the sum of completion-token log-probs of each sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from raydpo.logprobs.chunked import chunked_token_logps
from raydpo.logprobs.full import target_logps, token_logps


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of a sequence-parallel forward (:mod:`raydpo.train.sequence_parallel`)."""

    size: int
    """Ranks in the sequence-parallel group."""
    rank: int
    """This rank's index in the group: it computes the ``rank``-th of ``size`` equal column ranges."""
    reduce: Callable[[torch.Tensor], torch.Tensor]
    """Sums per-sequence partial log-probs [S] over the sequence-parallel group (differentiable)."""


def sp_layout(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``position_ids`` as the sequence-parallel group computes them, right-padded
    (position 0) to a width that is a multiple of ``multiple``: a padded batch keeps its [2B, T] rows
    (a fixed row count, as Ulysses needs); padding-free rows [R, W], R varying, are laid end to end as
    [1, R * W] (each starts at position 0, so they stay separate sequences for attention that reads
    sequence starts from the positions)."""
    flat = "sequence_ids" in batch
    return {key: torch.nn.functional.pad(v, (0, -v.shape[1] % multiple))
            for key, v in ((k, batch[k].reshape(1, -1) if flat else batch[k]) for k in ("input_ids", "position_ids"))}


def scored_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The positions whose prediction is scored: ``rows``, ``cols`` (the predicting position),
    ``targets`` (the token it predicts) and ``seq`` (its sequence), each [N]; and S, the sequences.

    Position t predicts token t + 1, scored where ``completion_mask[:, t + 1]``; a padded batch's
    sequences are its rows, padding-free rows name theirs in ``sequence_ids``."""
    ids = batch["input_ids"]
    rows, cols = batch["completion_mask"][:, 1:].bool().nonzero(as_tuple=True)
    targets = ids[:, 1:][rows, cols]
    if "sequence_ids" in batch:
        return rows, cols, targets, batch["sequence_ids"][:, 1:][rows, cols], batch["completion_tokens"].shape[0]
    return rows, cols, targets, rows, ids.shape[0]


def sum_by_sequence(token: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    """[N] token log-probs, [N] sequence index -> [n] float32 sums (an index n or above is dropped)."""
    sums = torch.zeros(n + 1, device=token.device, dtype=torch.float32)
    return sums.index_add(0, seq.clamp(max=n), token.float())[:n]


def forward_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: Optional[int] = None,
                  shard: Optional[SequenceShard] = None) -> torch.Tensor:
    """One forward of a collated batch -> [2B] logps, chosen sequences first, then rejected ones.

    A padded batch (:func:`raydpo.data.collate.collate_pairs`, [2B, T]) or padding-free rows
    (:func:`raydpo.data.collate.collate_packed`, [R, W] with ``sequence_ids``): there the attention
    mask is left out so transformers builds a block-diagonal causal mask from the restarting
    position ids.

    ``chunk_tokens`` (``model.logits_chunk_tokens``): None scores the completion positions through the
    output head in automatically sized chunks (:mod:`raydpo.logprobs.chunked`), N > 0 in chunks of N,
    0 from the model's full ``[B, T, V]`` logits. With ``shard`` the model sees only columns
    its columns of the batch as the group lays it out (:func:`sp_layout`; masks are left to the SP attention)
    and the per-sequence sums are reduced over the group, so every rank returns the whole batch's
    log-probs.
    """
    packed = "sequence_ids" in batch
    rows, cols, targets, seq, n = scored_positions(batch)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": None if packed else batch["attention_mask"], "use_cache": False}
    if shard:
        layout = sp_layout(batch, shard.size)
        width = layout["input_ids"].shape[1] // shard.size
        lo = shard.rank * width
        inputs = {k: v[:, lo:lo + width] for k, v in layout.items()} | {"attention_mask": None, "use_cache": False}
        if packed:  # rows end to end: position (r, c) is column r * W + c of the one row
            rows, cols = torch.zeros_like(rows), rows * batch["input_ids"].shape[1] + cols
        cols = cols - lo
        keep = (cols >= 0) & (cols < width)
        rows, cols, targets, seq = rows[keep], cols[keep], targets[keep], seq[keep]
    token = None if chunk_tokens == 0 else chunked_token_logps(model, inputs, rows, cols, targets, chunk_tokens)
    if token is None:  # full logits: the head is not cut (chunk_tokens 0, or no head to cut)
        logits = model(**inputs).logits
        if shard:
            token = target_logps(logits[rows, cols], targets)  # via [N, V]
        else:
            per_token = token_logps(logits, batch["input_ids"]) * batch["completion_mask"][:, 1:].float()  # [., T-1]
            if not packed:
                return per_token.sum(-1)
            token, seq = per_token.flatten(), batch["sequence_ids"][:, 1:].flatten()
    sums = sum_by_sequence(token, seq, n)
    return shard.reduce(sums) if shard else sums
