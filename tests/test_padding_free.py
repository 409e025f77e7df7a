"""Padding-free micro-batches give the padded path's log-probs and gradients; length grouping."""

import numpy as np
import pytest
import torch

from raydpo.data.collate import collate_packed, collate_pairs
from raydpo.logprobs import forward_logps
from raydpo.train.batches import length_grouped, pair_lengths
from test_packing import random_pairs


def test_collate_packed_one_row_layout():
    b = collate_packed([[1, 2], [3]], [[4, 5], [6, 7, 8]], [[9], [10, 11]], one_row=True)
    assert b["input_ids"].tolist() == [[1, 2, 4, 5, 3, 6, 7, 8, 1, 2, 9, 3, 10, 11]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert b["sequence_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1]]
    assert b["completion_tokens"].tolist() == [2, 3, 1, 2]


def test_collate_packed_bounded_rows_layout():
    """Sequences of 4, 2, 3 and 2 tokens -> first-fit decreasing rows of width 4: [0], [2 + filler], [1, 3]."""
    b = collate_packed([[1, 2], [3]], [[4, 5], [6]], [[9], [10]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 4, 5], [1, 2, 9, 0], [3, 6, 3, 10]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert b["sequence_ids"].tolist() == [[0, 0, 0, 0], [2, 2, 2, 4], [1, 1, 3, 3]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 0, 1]]
    assert b["completion_tokens"].tolist() == [2, 1, 1, 1]


def test_pack_rows_never_overfills_and_places_every_sequence():
    from raydpo.data.collate import pack_rows

    lengths = np.random.default_rng(0).integers(1, 100, 64).tolist()
    rows = pack_rows(lengths, max(lengths))
    assert sorted(i for r in rows for i in r) == list(range(64))
    assert all(sum(lengths[i] for i in r) <= max(lengths) for r in rows)
    assert len(rows) <= 1.25 * sum(lengths) / max(lengths) + 1  # first-fit decreasing packs tightly


def test_empty_prompt_first_token_is_not_scored_in_either_layout():
    padded = collate_pairs([[]], [[4, 5, 6]], [[7, 8]], pad_id=0)
    packed = collate_packed([[]], [[4, 5, 6]], [[7, 8]])
    assert padded["completion_tokens"].tolist() == packed["completion_tokens"].tolist() == [2, 1]


@pytest.mark.parametrize("one_row", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_equals_padded(tiny_model_dir, tokenizer, attn, one_row):
    from raydpo.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, attn_implementation=attn)
    for seed in range(2):
        cols = random_pairs(8, seed, len(tokenizer))
        padded, packed = collate_pairs(*cols, tokenizer.pad_token_id), collate_packed(*cols, tokenizer.pad_token_id, one_row)
        assert packed["input_ids"].numel() < padded["input_ids"].numel()
        assert torch.equal(padded["completion_tokens"], packed["completion_tokens"])
        grads = []
        for batch in (padded, packed):
            model.zero_grad()
            logps = forward_logps(model, batch)
            logps.sum().backward()
            grads.append((logps.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
        (a, ga), (b, gb) = grads
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert torch.allclose(ga, gb, atol=1e-4, rtol=1e-3)


def test_length_grouped_micro_batches_hold_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=400)
    window = {"prompt_ids": np.array([[1] * n for n in lengths], dtype=object),
              "chosen_ids": np.array([[2]] * 400, dtype=object), "rejected_ids": np.array([[3]] * 400, dtype=object),
              "row": np.arange(400)}
    batches = list(length_grouped(window, 8, np.random.default_rng(1)))
    assert len(batches) == 50 and sorted(np.concatenate([b["row"] for b in batches]).tolist()) == list(range(400))
    spread = np.mean([np.ptp(pair_lengths(b)) for b in batches])
    assert spread < 10  # random micro-batches of 8 spread over ~150 tokens
    again = list(length_grouped(window, 8, np.random.default_rng(1)))
    assert all(np.array_equal(a["row"], b["row"]) for a, b in zip(batches, again))


@pytest.mark.parametrize("group", [False, True])
def test_epoch_order_is_a_replayable_permutation(group):
    """A restarted worker rebuilds exactly the same micro-batches from (seed, epoch) alone."""
    from raydpo.train.batches import epoch_order

    rng = np.random.default_rng(0)
    rows = {"prompt_ids": np.array([[1] * int(n) for n in rng.integers(1, 50, 1000)], dtype=object),
            "chosen_ids": np.array([[2]] * 1000, dtype=object), "rejected_ids": np.array([[3]] * 1000, dtype=object)}
    first = epoch_order(rows, 8, seed=3, epoch=1, group_by_length=group)
    again = epoch_order(rows, 8, seed=3, epoch=1, group_by_length=group)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and len(first) == len(again) == 125
    flat = np.concatenate(first)
    assert len(set(flat.tolist())) == 1000  # every pair once
    other = np.concatenate(epoch_order(rows, 8, seed=3, epoch=2, group_by_length=group))
    assert not np.array_equal(flat, other)
