"""The shared-prompt layout: each pair as one unit ``[prompt | chosen | rejected]`` (pure torch).

The concatenated batch of :func:`raydpo.data.collate.collate_pairs` runs every prompt twice, once
before each completion; on hh-rlhf the prompt is about three times a response, on multi-turn data
most of the tokens. Here each pair is one unit whose attention lets chosen tokens see the prompt and
earlier chosen tokens, and rejected tokens the prompt and earlier rejected tokens (never the chosen
ones); rejected position ids restart where the prompt ends. Each completion token is then computed
in exactly the context it has in its own sequence, so the log-probs (and their gradients) equal the
concatenated path's up to float rounding, for ``p + c + r`` tokens instead of ``2p + c + r``.

Units go one per row (padded) or several per row, first-fit decreasing (padding-free); attention
never crosses units. The mask is the model's business (:mod:`raydpo.logprobs.masks`: a dense
``[T, T]`` mask per row for sdpa and eager, a flex-attention block mask); here are its inputs,
``segments`` and ``units``, and the rule itself (:func:`allowed`), written once for both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from raydpo.data.collate import pack_rows, padded_width

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
#: Widest row a dense mask is built for (its [T, T] mask per row is 64 MiB as float32 at 4,096);
#: wider batches go through the concatenated rows instead (the same numbers, no mask to build).
DENSE_MAX_WIDTH = 4096


def _unit(p: Sequence[int], c: Sequence[int], r: Sequence[int], i: int, b: int) -> tuple[list, ...]:
    """One pair's ids, positions, segments, scored sequence and predicting offset (within the unit).

    A completion token is scored (sequence ``i`` chosen, ``b + i`` rejected; ``2b``: not scored) when
    something precedes it in its own sequence, as in the concatenated rows; the first rejected token
    is predicted from the prompt's last token, not from the chosen tokens in between."""
    np_, nc = len(p), len(c)
    ids = list(p) + list(c) + list(r)
    pos = list(range(np_ + nc)) + list(range(np_, np_ + len(r)))
    seg = [PROMPT] * np_ + [CHOSEN] * nc + [REJECTED] * len(r)
    seq = [2 * b] * np_ + [i] * nc + [b + i] * len(r)
    pred = [t - 1 for t in range(np_ + nc)] + [np_ - 1 if j == 0 else np_ + nc + j - 1 for j in range(len(r))]
    seq = [s if q >= 0 else 2 * b for s, q in zip(seq, pred)]
    return ids, pos, seg, seq, pred


def collate_shared(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                   rejected_ids: Sequence[Sequence[int]], pad_id: int, padding_free: bool = False,
                   pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    """B pairs -> rows of shared-prompt units, each [R, W]:

    - ``input_ids``, ``position_ids`` (restarting at 0 per unit; rejected ones after the prompt);
    - ``segments`` (PROMPT, CHOSEN, REJECTED or PAD) and ``units`` (the pair of each token; B for
      padding): the mask's inputs;
    - ``score_seq``: the sequence a token's log-prob counts toward (i: pair i's chosen, B + i its
      rejected, 2B: not scored) and ``pred_cols``: the column whose logits predict it;

    and ``completion_tokens`` [2B] (scored tokens per sequence, chosen ones first). Padded: one unit
    per row (R = B), W the longest unit (rounded up to a multiple of ``pad_to_multiple_of``);
    ``padding_free``: units packed first-fit decreasing into rows as wide as the longest unit."""
    b = len(prompt_ids)
    units = [_unit(p, c, r, i, b) for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids))]
    lengths = [len(u[0]) for u in units]
    rows = pack_rows(lengths, max(lengths)) if padding_free else [[i] for i in range(b)]
    width = max(sum(lengths[i] for i in row) for row in rows)
    width = width if padding_free else padded_width(width, pad_to_multiple_of)
    cols = {k: [] for k in ("input_ids", "position_ids", "segments", "units", "score_seq", "pred_cols")}
    for row in rows:
        line = {k: [] for k in cols}
        for i in row:
            ids, pos, seg, seq, pred = units[i]
            start = len(line["input_ids"])
            line["input_ids"] += ids
            line["position_ids"] += pos
            line["segments"] += seg
            line["units"] += [i] * len(ids)
            line["score_seq"] += seq
            line["pred_cols"] += [start + q if q >= 0 else 0 for q in pred]
        tail = width - len(line["input_ids"])
        for k, fill in (("input_ids", pad_id), ("position_ids", 0), ("segments", PAD), ("units", b),
                        ("score_seq", 2 * b), ("pred_cols", 0)):
            line[k] += [fill] * tail
        for k in cols:
            cols[k].append(line[k])
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()}
    seq = out["score_seq"].flatten()
    out["completion_tokens"] = torch.zeros(2 * b + 1).index_add_(0, seq, torch.ones(seq.shape[0]))[: 2 * b]
    return out


def allowed(seg_q, seg_k, unit_q, unit_k, q, k):
    """Whether query token ``q`` may attend key token ``k`` (elementwise on broadcastable tensors:
    their segments, units and column indices). Causal within a unit, the prompt seen by both
    completions, a completion never seeing the other; a padding query sees itself alone (so no
    softmax row is empty); its output is never scored."""
    ok = (k <= q) & (unit_q == unit_k) & ((seg_k == PROMPT) | (seg_k == seg_q)) & (seg_q != PAD)
    return ok | ((seg_q == PAD) & (k == q))


def dense_mask(batch: dict[str, torch.Tensor], window: Optional[int] = None) -> torch.Tensor:
    """The rule as a boolean [R, 1, W, W] mask (True: may attend), with a sliding ``window`` on the
    position ids (transformers' ``q - k < window``) where given."""
    seg, unit, pos = batch["segments"], batch["units"], batch["position_ids"]
    col = torch.arange(seg.shape[1], device=seg.device)
    ok = allowed(seg[:, :, None], seg[:, None, :], unit[:, :, None], unit[:, None, :], col[:, None], col[None, :])
    if window:
        ok = ok & ((pos[:, :, None] - pos[:, None, :]) < window)
    return ok[:, None]
