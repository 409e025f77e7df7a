"""Preference pairs from judged samples (pure functions)."""

from __future__ import annotations

import pyarrow as pa

from raydpo.data.tokenize import pair_id, token_digest


def choose_pairs(ids: list[list[int]], rewards: list[float | None], pairing: str, margin: float) -> tuple[list[tuple[int, int]], int]:
    """(chosen index, rejected index) pairs among one prompt's samples, and the ties.

    Samples without a reward (the judge failed) and repeats of a completion already seen take no
    part. ``best_worst``: the best and the worst sample, when their gap exceeds ``margin`` (else one
    tie). ``margin``: every two distinct samples whose gap exceeds ``margin`` (each pair at or below it
    is a tie). Rewards of equal samples are equal, so a prompt whose samples all match is a tie too.
    """
    seen, valid = set(), []
    for i, (c, r) in enumerate(zip(ids, rewards)):
        if r is not None and tuple(c) not in seen:
            seen.add(tuple(c))
            valid.append(i)
    if len(valid) < 2:
        return [], 1 if valid else 0
    if pairing == "best_worst":
        best = max(valid, key=lambda i: rewards[i])
        worst = min(valid, key=lambda i: rewards[i])
        return ([(best, worst)], 0) if rewards[best] - rewards[worst] > margin else ([], 1)
    pairs, ties = [], 0
    for a_pos, a in enumerate(valid):
        for b in valid[a_pos + 1:]:
            hi, lo = (a, b) if rewards[a] >= rewards[b] else (b, a)
            if rewards[hi] - rewards[lo] > margin:
                pairs.append((hi, lo))
            else:
                ties += 1
    return pairs, ties


PAIR_SCHEMA = pa.schema([("pair_id", pa.string()), ("digest", pa.binary()), ("prompt_ids", pa.list_(pa.int32())),
                         ("chosen_ids", pa.list_(pa.int32())), ("rejected_ids", pa.list_(pa.int32()))])


def pair_table(rows: list[dict]) -> pa.Table:
    """``[{prompt, prompt_ids, chosen, chosen_ids, rejected, rejected_ids}]`` -> the columns the
    reference pool and the trainer read (``raydpo.reference.stage.CACHED_COLUMNS[:5]``)."""
    return pa.table({
        "pair_id": [pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in rows],
        "digest": [token_digest(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows],
        "prompt_ids": [r["prompt_ids"] for r in rows],
        "chosen_ids": [r["chosen_ids"] for r in rows],
        "rejected_ids": [r["rejected_ids"] for r in rows],
    }, schema=PAIR_SCHEMA)
