"""One row per pair, the prompt computed once: ``[prompt | chosen | rejected | pad]`` (pure torch).

The concatenated batch of :func:`raydpo.data.collate.collate_pairs` runs every prompt twice, once
before each completion; on multi-turn data the prompt is most of the tokens. Here each pair is one
row whose attention mask lets chosen tokens see the prompt and earlier chosen tokens, and rejected
tokens the prompt and earlier rejected tokens (never the chosen ones); rejected position ids restart
where the prompt ends. Each completion token is then computed in exactly the context it has in its own
sequence, so the log-probs equal the concatenated path's up to float rounding, for
``p + c + r`` tokens instead of ``2p + c + r``.
"""

from __future__ import annotations

import torch

from raydpo.data.collate import padded_width
from raydpo.families.rules import packed_attention_mask

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
#: Widest packed row the reference scores (its 4D mask is width x width per pair, 64 MiB as float32
#: at 4,096); wider pairs go through the concatenated rows instead.
PACKED_MAX_WIDTH = 4096


def pack_pairs(prompt_ids, chosen_ids, rejected_ids, pad_id: int, pad_to_multiple_of: int | None = None
               ) -> dict[str, torch.Tensor]:
    """B pairs -> ``input_ids``, ``position_ids``, ``segments`` [B, T] and ``attention_mask``
    [B, 1, T, T] (bool, True where a query may attend a key), T the longest packed pair (rounded up
    to a multiple of ``pad_to_multiple_of``)."""
    width = padded_width(max(len(p) + len(c) + len(r) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)),
                         pad_to_multiple_of)
    ids, pos, seg = [], [], []
    for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids):
        pad = width - len(p) - len(c) - len(r)
        ids.append(list(p) + list(c) + list(r) + [pad_id] * pad)
        pos.append(list(range(len(p) + len(c))) + list(range(len(p), len(p) + len(r))) + [0] * pad)
        seg.append([PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(r) + [PAD] * pad)
    segments = torch.tensor(seg)
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((k == PROMPT) | (k == q)) & (q != PAD)
    # A padding query attends only to itself, so no softmax row is empty (NaN); its output is unused.
    allowed |= torch.eye(width, dtype=torch.bool) & (q == PAD)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "segments": segments,
            "attention_mask": allowed[:, None]}


def packed_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The scored positions of a packed batch: ``rows``, ``cols`` (the predicting position),
    ``targets`` and ``seq`` (2 * row for chosen, 2 * row + 1 for rejected), each [N].

    Token t of a completion is predicted from position t - 1, except the first rejected token, which
    follows the prompt's last token (the chosen tokens sit in between in the row)."""
    ids, seg = batch["input_ids"], batch["segments"]
    width = ids.shape[1]
    pred = torch.arange(width, device=ids.device).expand_as(ids) - 1
    prompt_len = (seg == PROMPT).sum(1)
    first_rejected = (seg == REJECTED) & (torch.roll(seg, 1, dims=1) != REJECTED)
    pred = torch.where(first_rejected, (prompt_len - 1)[:, None].expand_as(pred), pred)
    # A completion token with no prompt before it has no prediction (as in collate_pairs).
    rows, at = (((seg == CHOSEN) | (seg == REJECTED)) & (pred >= 0)).nonzero(as_tuple=True)
    return rows, pred[rows, at], ids[rows, at], 2 * rows + (seg[rows, at] == REJECTED).long()


def packed_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a packed batch -> (chosen, rejected) sequence log-probs, each [B] float32.

    ``chunk_tokens`` as in :func:`raydpo.logprobs.forward_logps` (None: chunked, automatic size; 0:
    full logits). Plain sums only: with ``loss.ld_alpha`` the reference scores two rows per pair instead."""
    from raydpo.logprobs.chunked import chunked_token_logps
    from raydpo.logprobs.forward import sum_by_sequence
    from raydpo.logprobs.full import target_logps

    ids = batch["input_ids"]
    # An additive float mask: sdpa takes it as well as a boolean one, and eager attention only this.
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    additive = lambda allowed: torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(  # noqa: E731
        ~allowed, torch.finfo(dtype).min)
    # Sliding-window layers need the window inside the mask the model is given (one place for the
    # family rules: raydpo.families.rules).
    masks = packed_attention_mask(model.config, batch["attention_mask"], batch["position_ids"])
    mask = {kind: additive(m) for kind, m in masks.items()} if isinstance(masks, dict) else additive(masks)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": batch["position_ids"], "use_cache": False}
    rows, cols, targets, seq = packed_positions(batch)
    scored = None if chunk_tokens == 0 else chunked_token_logps(model, inputs, rows, cols, targets, chunk_tokens)
    token = scored[0] if scored is not None else None
    if token is None:
        token = target_logps(model(**inputs).logits[rows, cols], targets)  # via [N, V]
    sums = sum_by_sequence(token, seq, 2 * ids.shape[0]).view(-1, 2)
    return sums[:, 0], sums[:, 1]
