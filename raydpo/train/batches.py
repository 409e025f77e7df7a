"""Micro-batches of one worker's shard, in an order that a restarted worker can replay exactly.

Each worker holds its equal, contiguous split of the (input-ordered) training pairs in memory, token
ids only, and derives every epoch's order from ``(seed, epoch)`` alone: a restarted worker rebuilds
the same micro-batches and skips the ones its checkpoint already consumed, so recovery repeats and
skips no pair. The streaming reference mode feeds Ray Data's lazy shard instead (no exact replay).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

#: Pairs per length-sorting window, in micro-batches: wide enough to group lengths well, narrow
#: enough that a window still mixes data from across the shard order.
WINDOW_MICRO_BATCHES = 100


def pair_lengths(batch: dict) -> np.ndarray:
    """Tokens of each pair's longer sequence, the padded width it forces ([B])."""
    p = np.array([len(x) for x in batch["prompt_ids"]])
    c = np.array([len(x) for x in batch["chosen_ids"]])
    r = np.array([len(x) for x in batch["rejected_ids"]])
    return p + np.maximum(c, r)


def take(batch: dict, index: np.ndarray) -> dict:
    return {k: v[index] for k, v in batch.items()}


def length_grouped(window: dict, micro_batch_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """One window of pairs (numpy columns) -> its full micro-batches of similar lengths, in random order.

    The window is shuffled first, so that ties and the micro-batch order vary with the seed; a
    trailing partial micro-batch is dropped (as ``drop_last``)."""
    n = len(window["prompt_ids"])
    order = rng.permutation(n)
    order = order[np.argsort(pair_lengths(take(window, order)), kind="stable")]
    chunks = [order[i : i + micro_batch_size] for i in range(0, n - n % micro_batch_size, micro_batch_size)]
    for j in rng.permutation(len(chunks)):
        yield take(window, chunks[j])


def load_rows(split) -> dict:
    """A worker's split (a materialized ``ray.data.Dataset``) as numpy columns, in its row order."""
    parts = list(split.iter_batches(batch_size=4096, batch_format="numpy"))
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def epoch_order(rows: dict, micro_batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """Every full micro-batch of one epoch (row indices into ``rows``), a pure function of its arguments.

    A seeded permutation of the worker's rows, or with ``group_by_length`` length-sorted windows of
    ``WINDOW_MICRO_BATCHES`` micro-batches whose batches come in random order."""
    n = len(rows["prompt_ids"]) if rows else 0
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if not group_by_length:
        return [order[i : i + micro_batch_size] for i in range(0, n - n % micro_batch_size, micro_batch_size)]
    width = WINDOW_MICRO_BATCHES * micro_batch_size
    out = []
    for start in range(0, n, width):
        window = order[start : start + width]
        out.extend(window[b["_row"]] for b in length_grouped(take(rows, window) | {"_row": np.arange(len(window))}, micro_batch_size, rng))
    return out


def micro_batches(shard, micro_batch_size: int, seed: int, group_by_length: bool) -> Iterator[dict]:
    """An epoch of micro-batches (numpy column dicts) from a streaming Ray Train dataset shard
    (reference.mode streaming: pairs arrive as the pool scores them)."""
    if not group_by_length:
        yield from shard.iter_batches(
            batch_size=micro_batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=max(4 * micro_batch_size, 64),
            local_shuffle_seed=seed,
        )
        return
    rng = np.random.default_rng(seed)
    # Windows are multiples of the micro-batch, so only the shard's last one can leave a remainder.
    for window in shard.iter_batches(batch_size=WINDOW_MICRO_BATCHES * micro_batch_size, batch_format="numpy"):
        yield from length_grouped(window, micro_batch_size, rng)
