"""Token-budget batching: every pair once, each forward pass within the budget."""

import random

from raydpo.reference.batching import pair_lengths, padded_tokens, plan_batches


def test_groups_cover_every_pair_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
        budget = rng.randint(2, 4000)
        groups = plan_batches(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            longest = max(lengths[i] for i in g)
            assert 2 * len(g) * longest <= budget or len(g) == 1  # an over-long pair goes alone


def test_sorting_cuts_padding():
    lengths = [10, 500, 12, 480, 11, 490, 9, 510]
    fixed = [[0, 1, 2, 3], [4, 5, 6, 7]]
    planned = plan_batches(lengths, 4 * 2 * 510)
    assert padded_tokens(lengths, planned) < padded_tokens(lengths, fixed) * 0.6
    assert sorted(map(sorted, planned)) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_pair_length_is_prompt_plus_longer_completion():
    assert pair_lengths([5, 1], [3, 9], [4, 2]) == [9, 10]
