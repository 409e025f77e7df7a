"""Pad tokenized pairs into one concatenated chosen-then-rejected batch (pure, no Ray)."""

from __future__ import annotations

from typing import Sequence

import torch

from raydpo.logprobs import position_ids_from_mask, scored_tokens


def _pad(seqs: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B sequences (rows 0..B-1 chosen, B..2B-1 rejected).

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on completion tokens,
    aligned to ``input_ids``) and ``position_ids``, each [2B, T] with T the longest sequence, and
    ``completion_tokens`` [2B] (completion tokens scored per sequence).
    """
    seqs, masks = [], []
    for completions in (chosen_ids, rejected_ids):
        for p, c in zip(prompt_ids, completions):
            seqs.append(list(p) + list(c))
            masks.append([0] * len(p) + [1] * len(c))
    return padded_batch(_pad(seqs, pad_id, padding_side), _pad([[1] * len(s) for s in seqs], 0, padding_side),
                        _pad(masks, 0, padding_side))


def padded_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The padded batch's dict from its [2B, T] tensors (masks 0/1 long): adds ``position_ids`` [2B, T]
    and ``completion_tokens`` [2B]."""
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "completion_tokens": scored_tokens(completion_mask),
    }


def collate_packed(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
) -> dict[str, torch.Tensor]:
    """B pairs -> one padding-free row of all 2B sequences (chosen ones first), N tokens in total.

    Returns ``input_ids``, ``position_ids`` (restarting at 0 per sequence, which is how transformers
    detects the sequence boundaries and keeps attention within each) and ``completion_mask``, each
    [1, N]; ``sequence_ids`` [1, N] (which of the 2B sequences a token belongs to) and
    ``completion_tokens`` [2B]. The first token of each sequence is never scored: in the row it
    follows the previous sequence, not its own prefix.
    """
    ids, pos, mask, seq = [], [], [], []
    for i, (p, c) in enumerate((p, c) for completions in (chosen_ids, rejected_ids) for p, c in zip(prompt_ids, completions)):
        n = len(p) + len(c)
        ids += list(p) + list(c)
        pos += range(n)
        flags = [0] * len(p) + [1] * len(c)
        flags[0] = 0  # predicted from the previous sequence's last token: not scored (see above)
        mask += flags
        seq += [i] * n
    row = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    completion_mask, sequence_ids = row(mask), row(seq)
    counts = torch.zeros(2 * len(prompt_ids)).index_add_(0, sequence_ids[0, 1:], completion_mask[0, 1:].float())
    return {"input_ids": row(ids), "position_ids": row(pos), "completion_mask": completion_mask,
            "sequence_ids": sequence_ids, "completion_tokens": counts}


def collate_rows(batch: dict, pad_id: int, padding_side: str = "right", padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Collate a Ray Data numpy batch (columns of id arrays), padded or ``padding_free``; carries
    ``ref_*_logps`` when present."""
    cols = (batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
    out = collate_packed(*cols) if padding_free else collate_pairs(*cols, pad_id, padding_side)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch:
            out[key] = torch.as_tensor(batch[key], dtype=torch.float32)
    return out
