"""Pad tokenized pairs into one concatenated chosen-then-rejected batch (pure, no Ray)."""

from __future__ import annotations

from typing import Sequence

import torch

from raydpo.logprobs import position_ids_from_mask


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
    aligned to ``input_ids``) and ``position_ids``, each [2B, T] with T the longest sequence.
    """
    seqs, masks = [], []
    for completions in (chosen_ids, rejected_ids):
        for p, c in zip(prompt_ids, completions):
            seqs.append(list(p) + list(c))
            masks.append([0] * len(p) + [1] * len(c))
    input_ids = _pad(seqs, pad_id, padding_side)
    attention_mask = _pad([[1] * len(s) for s in seqs], 0, padding_side)
    completion_mask = _pad(masks, 0, padding_side)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "position_ids": position_ids_from_mask(attention_mask),
    }


def collate_rows(batch: dict, pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Collate a Ray Data numpy batch (columns of id arrays); carries ``ref_*_logps`` when present."""
    out = collate_pairs(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], pad_id, padding_side)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch:
            out[key] = torch.as_tensor(batch[key], dtype=torch.float32)
    return out
