"""Micro-batches of one worker's shard: shuffled (Ray Data's local shuffle) or length-grouped."""

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


def micro_batches(shard, micro_batch_size: int, seed: int, group_by_length: bool) -> Iterator[dict]:
    """An epoch of micro-batches (numpy column dicts) from a Ray Train dataset shard."""
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
