"""The in-process wrapper's tensors -> the batch the Ray trainer scores (pure functions).

:class:`raydpo.DPO` takes chosen and rejected sequences (prompt + completion) of any padding,
widths and masks, and turns them into exactly what :func:`raydpo.data.collate.collate_pairs` builds
from token lists: one right-padded [2B, T] batch, chosen rows first, with the completion mask aligned
to ``input_ids``. From there both paths share :func:`raydpo.logprobs.forward_logps` and
:func:`raydpo.objectives.preference_loss`, so they agree to the last bit on the same pairs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from raydpo.data.collate import padded_batch

Lengths = Union[torch.Tensor, Sequence[int]]


def token_mask(ids: torch.Tensor, mask: Optional[torch.Tensor], pad_id: Optional[int]) -> torch.Tensor:
    """Which positions hold real tokens: ``mask`` if given, else ``ids != pad_id``, else all.

    ids: [B, T] -> bool [B, T]. With ``pad_id`` equal to a token that also occurs inside sequences
    (EOS used as pad), pass the masks: ``ids != pad_id`` would drop those tokens too.
    """
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(f"a mask of shape {tuple(mask.shape)} for sequences of shape {tuple(ids.shape)}")
        return mask.bool()
    if pad_id is not None:
        return ids != pad_id
    return torch.ones_like(ids, dtype=torch.bool)


def right_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front, in order (left or mixed padding -> right padding).

    ids, mask: [B, T] -> ([B, T], [B, T]); the pad positions keep whatever id they had.
    """
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order), mask.gather(1, order)


def prompt_lengths_of(
    prompt_mask: Optional[torch.Tensor], prompt_lengths: Optional[Lengths], chosen_mask: torch.Tensor
) -> torch.Tensor:
    """Prompt tokens per pair ([B] long) from either ``prompt_lengths`` or ``prompt_mask``.

    prompt_mask: [B, Tc] marking the prompt tokens of the chosen sequences (x-transformers' form; the
    same tokens start the rejected ones). Only its count of real tokens per row is used.
    """
    if (prompt_mask is None) == (prompt_lengths is None):
        raise ValueError("pass exactly one of prompt_mask ([B, T], True on prompt tokens) or prompt_lengths ([B])")
    if prompt_lengths is not None:
        return torch.as_tensor(prompt_lengths, dtype=torch.long, device=chosen_mask.device).reshape(-1)
    if prompt_mask.shape != chosen_mask.shape:
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}; it marks the prompt tokens of "
                         f"chosen_ids, shape {tuple(chosen_mask.shape)} (or pass prompt_lengths)")
    return (prompt_mask.bool() & chosen_mask).sum(-1)


def pair_batch(
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    pad_id: Optional[int],
) -> dict[str, torch.Tensor]:
    """B pairs -> ``collate_pairs``' batch: input_ids, attention_mask, completion_mask, position_ids
    [2B, T] (T: the longest real sequence) and completion_tokens [2B].

    chosen_ids, chosen_mask: [B, Tc]; rejected_ids, rejected_mask: [B, Tr] (Tc and Tr may differ);
    prompt_lengths: [B]. The first ``prompt_lengths[i]`` real tokens of both sequences of pair i are its
    prompt, the rest its completion.
    """
    if chosen_ids.dim() != 2 or rejected_ids.dim() != 2 or chosen_ids.shape[0] != rejected_ids.shape[0]:
        raise ValueError(f"chosen_ids and rejected_ids must be [B, T] with the same B; got "
                         f"{tuple(chosen_ids.shape)} and {tuple(rejected_ids.shape)}")
    if prompt_lengths.shape != (chosen_ids.shape[0],):
        raise ValueError(f"one prompt length per pair: {chosen_ids.shape[0]} pairs, {tuple(prompt_lengths.shape)} lengths")
    width = max(chosen_ids.shape[1], rejected_ids.shape[1])
    rows, masks = [], []
    for ids, mask in ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)):
        ids, mask = right_align(ids, mask)
        fill = width - ids.shape[1]
        rows.append(torch.nn.functional.pad(torch.where(mask, ids, pad_id or 0), (0, fill), value=pad_id or 0))
        masks.append(torch.nn.functional.pad(mask, (0, fill), value=False))
    input_ids, attention_mask = torch.cat(rows), torch.cat(masks)
    used = int(attention_mask.sum(-1).max())  # drop all-padding columns: collate_pairs pads to the longest
    input_ids, attention_mask = input_ids[:, :used], attention_mask[:, :used]
    check_pairs(input_ids, attention_mask, prompt_lengths)
    positions = torch.arange(used, device=input_ids.device)
    completion_mask = attention_mask & (positions >= prompt_lengths.repeat(2)[:, None])
    return padded_batch(input_ids, attention_mask.long(), completion_mask.long())


def check_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> None:
    """Refuse pairs that would train on wrong numbers without a sound: a prompt of no tokens (its first
    token has nothing to be predicted from), a sequence with no completion token after its prompt, or
    chosen and rejected sequences that do not start with the same prompt tokens (a wrong split).

    input_ids, attention_mask: right-aligned [2B, T], chosen rows first; prompt_lengths: [B].
    """
    b = prompt_lengths.shape[0]
    lengths = attention_mask.sum(-1)
    in_prompt = torch.arange(input_ids.shape[1], device=input_ids.device) < prompt_lengths[:, None]  # [B, T]
    bad = torch.stack([
        prompt_lengths < 1,
        (lengths[:b] <= prompt_lengths) | (lengths[b:] <= prompt_lengths),
        ((input_ids[:b] != input_ids[b:]) & in_prompt).any(-1),
    ]).cpu()  # one device sync for all three checks
    reasons = ("has an empty prompt (prepend BOS: the first token has no prefix to be predicted from)",
               "has no completion token after its prompt (truncated, or a wrong prompt length)",
               "has different prompt tokens in its chosen and rejected sequences (a wrong prompt split)")
    for rule, reason in zip(bad, reasons):
        if rule.any():
            pairs = rule.nonzero().flatten().tolist()
            raise ValueError(f"pair {pairs[0]} {reason}" + (f"; also pairs {pairs[1:6]}" if len(pairs) > 1 else ""))
