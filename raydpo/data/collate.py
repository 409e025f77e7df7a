"""Pad tokenized pairs into one concatenated chosen-then-rejected batch (pure, no Ray)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from raydpo.logprobs import position_ids_from_mask, scored_tokens


def padded_width(width: int, multiple: Optional[int]) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (``train.pad_to_multiple_of``; None: as is)."""
    return width if not multiple else -(-width // multiple) * multiple


def _pad(seqs: list[list[int]], value: int, side: str, multiple: Optional[int] = None) -> torch.Tensor:
    width = padded_width(max(len(s) for s in seqs), multiple)
    rows = [([value] * (width - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B sequences (rows 0..B-1 chosen, B..2B-1 rejected).

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on completion tokens,
    aligned to ``input_ids``) and ``position_ids``, each [2B, T] with T the longest sequence (rounded
    up to a multiple of ``pad_to_multiple_of``, as TRL's ``DataCollatorForPreference``), and
    ``completion_tokens`` [2B] (completion tokens scored per sequence).
    """
    return collate_sequences(list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids), pad_id, padding_side,
                             pad_to_multiple_of)


def collate_sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
                      padding_side: str = "right", pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    """S sequences (prompt + completion each) -> a padded batch as :func:`collate_pairs`', [S, T]."""
    seqs, masks = [], []
    for p, c in zip(prompt_ids, completion_ids):
        seqs.append(list(p) + list(c))
        masks.append([0] * len(p) + [1] * len(c))
    m = pad_to_multiple_of
    return padded_batch(_pad(seqs, pad_id, padding_side, m), _pad([[1] * len(s) for s in seqs], 0, padding_side, m),
                        _pad(masks, 0, padding_side, m))


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
    pad_id: int = 0,
    one_row: bool = False,
) -> dict[str, torch.Tensor]:
    """B pairs -> padding-free rows of the 2B sequences (chosen ones first), N tokens in total.

    The sequences are packed first-fit-decreasing into R rows as wide as the longest sequence, W
    tokens, each row's tail filled by a filler sequence of ``pad_id`` that is never scored. Rows of
    bounded width keep attention (which transformers computes over a row's whole block-diagonal mask
    with sdpa or eager) at about N x W instead of N x N, while the linear layers see almost no padding.
    ``one_row``: all 2B sequences in one row of N tokens, for kernels that skip the masked blocks
    (flash-attention varlen).

    Returns ``input_ids``, ``position_ids`` (restarting at 0 per sequence, which is how transformers
    detects the sequence boundaries and keeps attention within each), ``completion_mask`` and
    ``sequence_ids`` (which of the 2B sequences a token belongs to; 2B for fillers), each [R, W], and
    ``completion_tokens`` [2B]. The first token of each sequence is never scored: in a row it follows
    the previous sequence, not its own prefix.
    """
    return collate_packed_sequences(list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids), pad_id, one_row)


def collate_packed_sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                             pad_id: int = 0, one_row: bool = False) -> dict[str, torch.Tensor]:
    """S sequences (prompt + completion each) -> padding-free rows as :func:`collate_packed`'s."""
    pieces = list(zip(prompt_ids, completion_ids))
    lengths = [len(p) + len(c) for p, c in pieces]
    rows = [list(range(len(pieces)))] if one_row else pack_rows(lengths, max(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    filler = len(pieces)
    ids, pos, mask, seq = ([[] for _ in rows] for _ in range(4))
    for r, row in enumerate(rows):
        for i in row:
            p, c = pieces[i]
            ids[r] += list(p) + list(c)
            pos[r] += range(lengths[i])
            flags = [0] * len(p) + [1] * len(c)
            flags[0] = 0  # predicted from whatever precedes it in the row: not scored (see above)
            mask[r] += flags
            seq[r] += [i] * lengths[i]
        tail = width - len(ids[r])
        ids[r] += [pad_id] * tail
        pos[r] += range(tail)
        mask[r] += [0] * tail
        seq[r] += [filler] * tail
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    completion_mask, sequence_ids = t(mask), t(seq)
    counts = torch.zeros(filler + 1).index_add_(0, sequence_ids[:, 1:].flatten(), completion_mask[:, 1:].flatten().float())
    return {"input_ids": t(ids), "position_ids": t(pos), "completion_mask": completion_mask,
            "sequence_ids": sequence_ids, "completion_tokens": counts[:filler]}


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices grouped into rows of at most ``width`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, free in enumerate(room) if free >= lengths[i]), None)
        if j is None:
            rows.append([])
            room.append(width)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


def collate_rows(batch: dict, pad_id: int, padding_side: str = "right", padding_free: bool = False,
                 one_row: bool = False, pad_to_multiple_of: Optional[int] = None,
                 share_prompt_width: int = 0, kl_apart: bool = False) -> dict[str, torch.Tensor]:
    """Collate a Ray Data numpy batch (columns of id arrays), padded (to a width that is a multiple of
    ``pad_to_multiple_of`` when set) or ``padding_free`` (``one_row``: see :func:`collate_packed`);
    with ``share_prompt_width`` one unit per pair, its prompt once (:func:`raydpo.data.shared.collate_shared`),
    when no pair is wider than that (a dense mask's limit; a wider batch goes as two rows per pair:
    the same numbers). Carries ``ref_*_logps`` and unpaired examples' ``label`` when present.

    ``kl_apart`` (unpaired examples): the B completions as the batch and the B KL sequences as its
    own batch under ``kl``, so that they can be scored without gradient (as TRL's KTOTrainer)."""
    from raydpo.data.shared import collate_shared

    cols = (batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
    if kl_apart and "label" in batch:
        apart = [(collate_packed_sequences(cols[0], c, pad_id, one_row) if padding_free
                  else collate_sequences(cols[0], c, pad_id, padding_side, pad_to_multiple_of)) for c in cols[1:]]
        out = apart[0] | {"kl": apart[1]}
    elif share_prompt_width and max(len(p) + len(c) + len(r) for p, c, r in zip(*cols)) <= share_prompt_width:
        out = collate_shared(*cols, pad_id, padding_free, pad_to_multiple_of)
    else:
        out = (collate_packed(*cols, pad_id, one_row) if padding_free
               else collate_pairs(*cols, pad_id, padding_side, pad_to_multiple_of))
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch:
            # A copy: Ray hands read-only arrays (zero-copy from its object store), which torch warns about.
            out[key] = torch.tensor(batch[key], dtype=torch.float32)
    if "label" in batch:  # unpaired examples: desirable (1) or not (0), [B]
        out["label"] = torch.tensor(batch["label"], dtype=torch.bool)
    return out


def computed_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the forward computes, padding excluded (0-d float32): a padded batch's mask sum,
    padding-free rows' tokens outside fillers (sequence id 2B), shared rows' tokens outside padding;
    plus an unpaired batch's KL sequences, scored apart."""
    from raydpo.data.shared import PAD

    kl = computed_tokens(batch["kl"]) if "kl" in batch else 0.0
    if "segments" in batch:
        return (batch["segments"] != PAD).sum().float() + kl
    if "sequence_ids" in batch:
        return (batch["sequence_ids"] < batch["completion_tokens"].shape[0]).sum().float() + kl
    return batch["attention_mask"].sum().float() + kl


def token_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many times the padded two-row batch (:func:`collate_pairs`) computes each token of this
    layout ([R, W] float32, the layout's rows): a padded batch's attention mask; padding-free rows'
    1 outside fillers; shared rows' 2 on a prompt (before each completion there), 1 on completions,
    0 on padding. What the MoE router loss weighs tokens by (:mod:`raydpo.logprobs.router`)."""
    from raydpo.data.shared import PAD, PROMPT

    if "segments" in batch:
        seg = batch["segments"]
        return (seg != PAD).float() + (seg == PROMPT).float()
    if "sequence_ids" in batch:
        return (batch["sequence_ids"] < batch["completion_tokens"].shape[0]).float()
    return batch["attention_mask"].float()


def sequence_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scored tokens of each of the batch's 2B sequences ([2B] float32): pairs' chosen then rejected,
    or unpaired completions then their KL sequences (collated apart or not)."""
    own = batch["completion_tokens"]
    return torch.cat([own, batch["kl"]["completion_tokens"]]) if "kl" in batch else own
