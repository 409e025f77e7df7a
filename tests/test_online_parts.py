"""The online package's pure parts: pair making, prompts, reward values, LoRA merging, checks."""

from __future__ import annotations

import pytest
import torch

from raydpo.online.generate import cut_completion
from raydpo.online.judge import reward_value
from raydpo.online.pairs import choose_pairs, pair_table
from raydpo.online.prompts import distinct, prompt_of, round_prompts, tokenize_prompts


def test_best_and_worst_pair_ties_and_failures():
    ids = [[1], [2], [3], [4]]
    assert choose_pairs(ids, [0.5, 2.0, -1.0, 1.0], "best_worst", 0.0) == ([(1, 2)], 0)
    assert choose_pairs(ids, [1.0, 1.0, 1.0, 1.0], "best_worst", 0.0) == ([], 1)  # all tie
    assert choose_pairs(ids, [1.0, 1.2, 1.1, 1.0], "best_worst", 0.5) == ([], 1)  # gap within the margin
    assert choose_pairs(ids, [None, 3.0, None, 1.0], "best_worst", 0.0) == ([(1, 3)], 0)  # failed samples skipped
    assert choose_pairs(ids, [None, 3.0, None, None], "best_worst", 0.0) == ([], 1)
    assert choose_pairs(ids, [None] * 4, "best_worst", 0.0) == ([], 0)
    # The same completion twice is one sample: it cannot be paired with itself.
    assert choose_pairs([[7], [7], [7]], [1.0, 1.0, 1.0], "best_worst", 0.0) == ([], 1)


def test_margin_pairs_every_gap_above_the_margin():
    pairs, ties = choose_pairs([[1], [2], [3]], [0.0, 1.0, 3.0], "margin", 1.0)
    assert sorted(pairs) == [(2, 0), (2, 1)] and ties == 1  # 1.0 - 0.0 is not above the margin


def test_pair_table_has_the_cached_columns():
    from raydpo.data.tokenize import token_digest
    from raydpo.reference.stage import CACHED_COLUMNS

    t = pair_table([{"prompt": "p", "prompt_ids": [1, 2], "chosen": "a", "chosen_ids": [3, 9], "rejected": "b", "rejected_ids": [4]}])
    assert t.column_names == CACHED_COLUMNS[:5]
    assert t["digest"].to_pylist() == [token_digest([1, 2], [3, 9], [4])]


def test_cut_completion_keeps_the_first_eos_and_drops_padding():
    assert cut_completion([5, 6, 2, 7, 2], eos_id=2, pad_id=0, limit=10) == [5, 6, 2]
    assert cut_completion([5, 6, 0, 0], eos_id=2, pad_id=0, limit=10) == [5, 6]
    assert cut_completion([5, 6, 7, 8], eos_id=2, pad_id=2, limit=3) == [5, 6, 7]


@pytest.mark.parametrize("value, expect", [(1, 1.0), (2.5, 2.5), (torch.tensor(0.25), 0.25)])
def test_reward_values(value, expect):
    assert reward_value(value) == expect


@pytest.mark.parametrize("value", ["3.0", None, True, float("nan"), float("inf"), [1.0], torch.ones(2)])
def test_non_numbers_are_refused(value):
    with pytest.raises(ValueError, match="judge_not_a_number"):
        reward_value(value)


def test_prompts_from_every_format():
    from raydpo.data.validate import Bad

    assert prompt_of({"prompt": "Hi"}) == "Hi"
    assert prompt_of({"prompt": [{"role": "user", "content": "Hi"}]}) == [{"role": "user", "content": "Hi"}]
    assert prompt_of({"prompt": "Q:", "chosen": " a", "rejected": " b"}) == "Q:"
    assert prompt_of({"chosen": "Human: hi\n\nAssistant: yes", "rejected": "Human: hi\n\nAssistant: no"}) == "Human: hi\n\nAssistant:"
    for bad in ({"prompt": "  "}, {"prompt": None}, {"text": "x"}):
        with pytest.raises(Bad):
            prompt_of(bad)


def test_prompt_tokens_match_the_data_stage(tokenizer):
    """A prompt's ids are those the data stage gives the prompt of a pair (text and chat)."""
    from raydpo.data.stage import tokenize_settings
    from raydpo.data.tokenize import tokenize_normalized
    from raydpo.data.validate import Pair
    from raydpo.config import from_dict

    settings = tokenize_settings(from_dict({"model": {"name_or_path": "x"}, "data": {"max_length": 64}}))
    chat = [{"role": "user", "content": "Count on from apple:"}]
    for prompt, kind, chosen, rejected in (("Count on from apple:", "text", " tiger", " river"),
                                           (chat, "chat", [{"role": "assistant", "content": "tiger"}], [{"role": "assistant", "content": "no"}])):
        (row,) = tokenize_normalized(tokenizer, [Pair(prompt, chosen, rejected, kind)], settings)
        (kept,), _ = tokenize_prompts(tokenizer, [prompt], 64, None, "keep_start", None)
        assert kept.ids == list(row["prompt_ids"])
    kept, filtered = tokenize_prompts(tokenizer, ["word " * 80], 64, None, "keep_start", None)
    assert not kept and filtered[0][1] == "prompt_too_long"


def test_round_prompts_are_seeded_and_cover_the_pool():
    pool = list(range(10))
    a, b = round_prompts(pool, 25, seed=0, round_=3), round_prompts(pool, 25, seed=0, round_=3)
    assert a == b and a != round_prompts(pool, 25, seed=0, round_=4)
    assert sorted(a[:10]) == pool and len(a) == 25  # without replacement while the pool lasts
    assert distinct(["a", "b", "a", [{"role": "user", "content": "a"}]]) == ["a", "b", [{"role": "user", "content": "a"}]]


def test_lora_merge_matches_peft(tiny_model_dir):
    """The weights the generators get from a LoRA policy equal peft's merge_and_unload."""
    from peft import LoraConfig, get_peft_model

    from raydpo.models import load_causal_lm
    from raydpo.online.weights import lora_layout, max_difference, merge_lora_state

    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # adapters that changed the model
    scaling, fifo = lora_layout(model)
    merged = merge_lora_state({k: v.detach().clone() for k, v in model.state_dict().items()}, scaling, fifo)
    want = model.merge_and_unload().state_dict()
    assert set(merged) == set(want) and max_difference(merged, want) < 1e-5


@pytest.mark.parametrize("online, expect", [
    ({"judge": {"reward_fn": "a:b", "reward_model": "x"}}, "exactly one of reward_fn"),
    ({"judge": {"reward_fn": "nocolon"}}, "module:function"),
    ({"generator": {"samples_per_prompt": 1}, "judge": {"reward_fn": "a:b"}}, "samples_per_prompt must be >= 2"),
    ({"steps_per_round": 0, "judge": {"reward_fn": "a:b"}}, "set online.steps_per_round"),
])
def test_online_config_rules(online, expect):
    from raydpo.config import ConfigError, from_dict
    from raydpo.online.run import preflight

    raw = {"model": {"name_or_path": "x"}, "train": {"lr_scheduler": "cosine"}, "online": {"steps_per_round": 4, **online}}
    with pytest.raises(ConfigError, match=expect):
        preflight(from_dict(raw))
