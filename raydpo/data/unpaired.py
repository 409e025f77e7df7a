"""Unpaired examples for KTO (pure functions): parse labelled rows, split pairs, build the KL pairing.

TRL's KTOTrainer conventions, step by step:

1. A row ``{prompt, completion, label}`` (strings, or a message list and assistant messages) is one
   example, desirable when ``label`` is true. A preference pair (any format the pair reader takes)
   becomes two: its chosen completion desirable, its rejected one undesirable
   (``unpair_preference_dataset``, which maps batches of 1,000 pairs: the chosen rows of a batch,
   then its rejected rows; :func:`example_order` reproduces that order).
2. Each example is tokenized as a pair's prompt and completion are (:mod:`raydpo.data.tokenize`).
3. The KL term is estimated on **mismatched** sequences: the kept examples of a split, in that order,
   are cut into groups of ``train.micro_batch_size`` (TRL's ``per_device_train_batch_size``) and
   within each group the completions are rotated by one (``KL_completion_ids = [c[-1]] + c[:-1]``),
   so example i's KL sequence is its prompt followed by example i-1's completion, truncated as its own
   sequence is. The pairing is a pure function of the data and the group size; the KL sequence's
   tokens are part of each example's token digest, hence of the reference cache key.

An example travels through the reference and train stages as a pair does: ``chosen_ids`` holds its
completion, ``rejected_ids`` its KL completion, plus ``label`` (1 desirable, 0 not).

Unlike TRL, whose KTOTrainer must read the data sequentially so that a batch's KL completions are the
batch's own, the trainer shuffles examples as it shuffles pairs: each example carries its KL sequence,
so any batch still averages the KL term over mismatched pairs. Kept whole, the groups of a split
pair set would be all desirable or all undesirable (TRL's unpairing order puts 1,000 chosen halves
first), which measurably slowed learning on the synthetic task.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raydpo.data.tokenize import TokenizeSettings, pair_id, token_digest, truncate_pair
from raydpo.data.validate import Bad, Pair, completion_messages, decode_row, messages, normalize, text_of

#: Pairs per batch of TRL's ``unpair_preference_dataset`` (``Dataset.map(batched=True)``'s default).
UNPAIR_BATCH = 1000
#: ``part`` of an example: a row that was unpaired in the input, or the chosen / rejected half of a pair.
UNPAIRED_ROW, CHOSEN_HALF, REJECTED_HALF = -1, 0, 1


def label_of(value: Any) -> bool:
    """``label`` -> desirable or not: true/false (TRL's bool), or 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Bad(f"invalid_label: label is {value!r}; expected true (desirable) or false (undesirable)")


def normalize_example(row: dict, fmt: str = "auto") -> Pair:
    """An unpaired row -> ``Pair(prompt, completion, completion, kind)`` (the tokenizer's shape), or raise Bad."""
    for name in ("prompt", "completion", "label"):
        if name not in row or row[name] is None:
            raise Bad(f"missing_field: {name}")
    label_of(row["label"])
    conversational = isinstance(row["prompt"], list) if fmt == "auto" else fmt == "conversational"
    if fmt == "implicit":
        raise Bad("wrong_format: data.format implicit needs chosen/rejected dialogues, not {prompt, completion, label} rows")
    if conversational:
        prompt, completion, kind = messages(row["prompt"], "prompt"), completion_messages(row["completion"], "completion"), "chat"
    else:
        for name in ("prompt", "completion"):
            if not isinstance(row[name], str):
                raise Bad(f"wrong_type: {name} is {type(row[name]).__name__}, expected str")
        prompt, completion, kind = row["prompt"], row["completion"], "text"
    if not text_of(completion).strip():
        raise Bad("empty_completion: completion")
    return Pair(prompt, completion, completion, kind)


def examples_of(row: dict, fmt: str, marker: str, unpair_pairs: bool) -> list[tuple[Pair, int, bool]]:
    """A decoded row -> its examples as ``(Pair(prompt, completion, completion, kind), part, desirable)``,
    or raise Bad (one reason for the whole row)."""
    if "chosen" not in row and "rejected" not in row:
        example = normalize_example(row, fmt)
        return [(example, UNPAIRED_ROW, label_of(row["label"]))]
    if not unpair_pairs:
        raise Bad("paired_row: a chosen/rejected pair, and data.unpair_pairs is false; give {prompt, completion, label} "
                  "rows or set data.unpair_pairs: true to split each pair into a desirable and an undesirable example")
    pair = normalize(row, fmt, marker)
    return [(Pair(pair.prompt, pair.chosen, pair.chosen, pair.kind), CHOSEN_HALF, True),
            (Pair(pair.prompt, pair.rejected, pair.rejected, pair.kind), REJECTED_HALF, False)]


def example_order(rank: int, source: str, index: int, part: int) -> tuple:
    """Sort key of an example: input order, a pair's halves as TRL's unpairing orders them (each
    batch of 1,000 pairs: the chosen halves, then the rejected ones)."""
    return rank, source, index // UNPAIR_BATCH, max(part, 0), index


def group_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``n`` ordered examples -> [start, end) of each KL group of ``size`` (the last may be smaller; a
    last group of one joins the one before it, as one example cannot be mismatched with itself)."""
    bounds = [(a, min(a + size, n)) for a in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def kl_completions(completions: list, bounds: list[tuple[int, int]]) -> list:
    """Each example's KL completion: the completions rotated by one within each group (TRL's
    ``[c[-1]] + c[:-1]``)."""
    out = [None] * len(completions)
    for a, b in bounds:
        group = completions[a:b]
        out[a:b] = group[-1:] + group[:-1]
    return out


def group_ids(bounds: list[tuple[int, int]], first: int = 0) -> np.ndarray:
    """The KL group index of every example (``first`` for the first group)."""
    return np.concatenate([np.full(b - a, first + g, np.int64) for g, (a, b) in enumerate(bounds)]) if bounds else np.zeros(0, np.int64)


def with_kl_sequences(table: pa.Table, order: list[int], group: int, settings: TokenizeSettings, first_group: int = 0,
                      kl: bool = True) -> pa.Table:
    """The kept examples of one split (``table``, in any order; ``order``: its row indices in
    :func:`example_order`) with ``rejected_ids`` set to each example's KL completion, truncated by the
    same rules as its own (``max_length``; with keep_end the shared prompt may lose its start), and
    ``digest`` and ``kl_group`` (from ``first_group``) recomputed. Rows come back in ``order``.
    ``kl`` False (a loss without a KL term): an empty KL completion, so only the prompt is computed."""
    t = table.take(pa.array(order, pa.int64())) if order else table
    prompts, completions = t["prompt_ids"].to_pylist(), t["chosen_ids"].to_pylist()
    bounds = group_bounds(len(completions), group)
    partners = kl_completions(completions, bounds) if kl else [[] for _ in completions]
    rows = [truncate_pair(p, c, other, settings)[:3] for p, c, other in zip(prompts, completions, partners)]
    ids = pa.list_(pa.int32())
    for name, values in (("prompt_ids", [r[0] for r in rows]), ("chosen_ids", [r[1] for r in rows]),
                         ("rejected_ids", [r[2] for r in rows])):
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, ids))
    t = t.set_column(t.schema.get_field_index("digest"), "digest", pa.array([token_digest(*r) for r in rows], pa.binary()))
    return t.set_column(t.schema.get_field_index("kl_group"), "kl_group", pa.array(group_ids(bounds, first_group), pa.int64()))


def parse_examples(raw: bytes, columns: dict | None, fmt: str, marker: str, unpair_pairs: bool) -> list[tuple]:
    """raw JSON bytes -> ``[(Pair, None, part, desirable), ...]`` (one per example), or
    ``[(None, reason, UNPAIRED_ROW, None)]`` for a bad row."""
    row, reason = decode_row(raw, columns)
    if row is None:
        return [(None, reason, UNPAIRED_ROW, None)]
    try:
        return [(pair, None, part, desirable) for pair, part, desirable in examples_of(row, fmt, marker, unpair_pairs)]
    except Bad as e:
        return [(None, str(e), UNPAIRED_ROW, None)]


def example_key(pair: Pair, desirable: bool) -> str:
    """Content address of an example: its prompt, completion and label."""
    return pair_id(pair.prompt, pair.chosen, "desirable" if desirable else "undesirable")
