"""Token-budget batching for the reference pool (pure functions).

Fixed row counts pad every pair of a batch to its longest sequence; on data whose lengths vary ten
times (hh-rlhf: 40 to 512 tokens) most of a random batch is padding, and a batch of long pairs may
not fit in memory while a batch of short ones wastes the device. Instead, a bucket of pairs is sorted
by length and cut into forward batches whose padded size, ``2 x rows x longest`` tokens (chosen and
rejected go through together), stays within ``reference.max_tokens_per_batch``. Packed pairs
(:mod:`raydpo.data.shared`: one row of prompt + chosen + rejected) cost ``rows x longest``.
"""

from __future__ import annotations


def pair_lengths(prompt_lens: list[int], chosen_lens: list[int], rejected_lens: list[int], packed: bool = False) -> list[int]:
    """Row length each pair needs: its prompt plus the longer completion (two rows per pair), or
    prompt + chosen + rejected when ``packed`` (one row)."""
    if packed:
        return [p + c + r for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens)]
    return [p + max(c, r) for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens)]


def plan_batches(lengths: list[int], max_tokens: int, rows_per_pair: int = 2) -> list[list[int]]:
    """Indices of ``lengths`` grouped into forward batches, longest pairs first.

    Each group satisfies ``rows_per_pair * len(group) * max(lengths[i] for i in group) <= max_tokens``,
    except a single pair longer than the budget, which goes alone (it still has to be scored).
    Every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        # Sorted longest first, so the group's first pair sets its padded length.
        if groups and rows_per_pair * (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def padded_tokens(lengths: list[int], groups: list[list[int]], rows_per_pair: int = 2) -> int:
    """Tokens the forward passes process, padding included (for the benchmark's accounting)."""
    return sum(rows_per_pair * len(g) * max(lengths[i] for i in g) for g in groups)
