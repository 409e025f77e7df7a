"""One forward of a collated batch -> the sum of completion-token log-probs of each sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from raydpo.logprobs.chunked import chunked_token_logps
from raydpo.logprobs.full import token_logps


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of a sequence-parallel forward (:mod:`raydpo.train.sequence_parallel`)."""

    size: int
    """Ranks in the sequence-parallel group."""
    rank: int
    """This rank's index in the group: it computes the ``rank``-th of ``size`` equal column ranges."""
    reduce: Callable[[torch.Tensor], torch.Tensor]
    """Sums per-sequence partial log-probs [S] over the sequence-parallel group (differentiable)."""


def one_row(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``position_ids`` [R, W] laid end to end as [1, R * W], right-padded (position
    0) to a multiple of ``multiple``. Each row starts at position 0, so the rows stay separate
    sequences for attention that reads sequence starts from the positions (Ulysses' core attention)."""
    out = {}
    for key in ("input_ids", "position_ids"):
        flat = batch[key].reshape(1, -1)
        out[key] = torch.nn.functional.pad(flat, (0, -flat.shape[1] % multiple))
    return out


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
    its part of the batch laid out as one row (:func:`one_row`; masks are left to the SP attention)
    and the per-sequence sums are reduced over the group, so every rank returns the whole batch's
    log-probs.
    """
    packed = "sequence_ids" in batch
    rows, cols, targets, seq, n = scored_positions(batch)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": None if packed else batch["attention_mask"], "use_cache": False}
    if shard:
        flat = one_row(batch, shard.size)
        width = flat["input_ids"].shape[1] // shard.size
        lo = shard.rank * width
        inputs = {k: v[:, lo:lo + width] for k, v in flat.items()} | {"attention_mask": None, "use_cache": False}
        cols = rows * batch["input_ids"].shape[1] + cols - lo
        keep = (cols >= 0) & (cols < width)
        rows, cols, targets, seq = torch.zeros_like(rows[keep]), cols[keep], targets[keep], seq[keep]
    token = None if chunk_tokens == 0 else chunked_token_logps(model, inputs, rows, cols, targets, chunk_tokens)
    if token is None:  # full logits: the head is not cut (chunk_tokens 0, or no head to cut)
        logits = model(**inputs).logits
        if shard:
            picked = logits[rows, cols].float()  # [N, V]
            token = picked.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
        else:
            per_token = token_logps(logits, batch["input_ids"]) * batch["completion_mask"][:, 1:].float()  # [., T-1]
            if not packed:
                return per_token.sum(-1)
            token, seq = per_token.flatten(), batch["sequence_ids"][:, 1:].flatten()
    sums = sum_by_sequence(token, seq, n)
    return shard.reduce(sums) if shard else sums
