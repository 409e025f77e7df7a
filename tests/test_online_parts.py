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
    from raydpo.train.weights import lora_layout, max_difference, merge_lora_state

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
    ({"keep": "best", "eval_prompts": 0, "judge": {"reward_fn": "a:b"}}, "online.eval_prompts must be > 0"),
    ({"keep": "worst", "judge": {"reward_fn": "a:b"}}, "keep"),
])
def test_online_config_rules(online, expect):
    from raydpo.config import ConfigError, from_dict
    from raydpo.online.run import preflight

    raw = {"model": {"name_or_path": "x"}, "train": {"lr_scheduler": "cosine"}, "online": {"steps_per_round": 4, **online}}
    with pytest.raises(ConfigError, match=expect):
        preflight(from_dict(raw))


def test_a_fall_of_more_than_half_the_gain_is_reported():
    from raydpo.online.progress import Fall, reward_fall

    # The shipped example before its fix: rounds 1-4, then the final held-out reward.
    assert reward_fall([-0.13, -0.32, 7.89, 8.27, -0.65]) == Fall(first=-0.13, best=8.27, best_at=3, current=-0.65)
    assert reward_fall([-0.13, -0.32, 7.89, 8.27]) is None  # still climbing
    assert reward_fall([0.0, 4.0, 2.0]) is None  # half the gain given back: not more
    assert reward_fall([0.0, 4.0, 1.99]) == Fall(0.0, 4.0, 1, 1.99)
    assert reward_fall([0.0, 4.0, 6.0, 2.9]) == Fall(0.0, 6.0, 2, 2.9)  # the best so far, not the latest
    assert reward_fall([1.0, 0.5, 0.0]) is None and reward_fall([1.0, 1.0, 0.0]) is None  # no gain: nothing to give back
    assert reward_fall([]) is None and reward_fall([1.0]) is None and reward_fall([0.0, 4.0]) is None
    # Missing measures (no judged held-out sample) take no part; a missing current one says nothing.
    assert reward_fall([None, 0.0, None, 4.0, 1.0]) == Fall(0.0, 4.0, 3, 1.0)
    assert reward_fall([0.0, 4.0, None]) is None


def test_the_warning_names_when_the_best_was_measured():
    from raydpo.online.progress import Fall, describe_fall, when

    assert when(0, 4) == "at the start of round 1" and when(3, 4) == "at the start of round 4" and when(4, 4) == "after the last round"
    text = describe_fall(Fall(-0.13, 8.27, 3, -0.65), 4, "last")
    assert "warning" in text and "-0.65" in text and "8.27 at the start of round 4" in text and "online.keep: best" in text
    assert "online.keep" not in describe_fall(Fall(-0.13, 8.27, 3, -0.65), 4, "best")


def test_best_weights_keep_the_highest_reward_and_later_ties():
    from raydpo.online.progress import INITIAL, BestWeights, Kept, describe_kept

    best = BestWeights(hold=True)
    assert best.offer(0, -0.13, INITIAL) and best.best == Kept(0, -0.13, INITIAL)
    assert not best.offer(1, -0.32, "ref1") and best.best.round == 0
    assert not best.offer(2, None, "ref2")  # not measured: not a candidate
    assert best.offer(3, 8.27, "ref3") and best.offer(4, 8.27, "ref4")  # equal: the later (more trained) weights
    assert not best.offer(5, -0.65, "ref5") and best.best == Kept(4, 8.27, "ref4")
    unheld = BestWeights(hold=False)  # keep: last: which round was best, but no ref outlives its round
    unheld.offer(0, 1.0, INITIAL)
    unheld.offer(1, 2.0, "ref1")
    assert unheld.best == Kept(1, 2.0, None)
    assert BestWeights(hold=True).best is None
    assert "after round 3" in describe_kept(Kept(3, 8.27), 4, -0.65) and "-0.650" in describe_kept(Kept(3, 8.27), 4, -0.65)
    assert "initial model" in describe_kept(Kept(0, 0.5), 4, -0.65) and "last round's weights" in describe_kept(Kept(4, 9.0), 4, 9.0)


def test_the_kept_model_replaces_the_export(tiny_model_dir, tmp_path):
    """online.keep: best's writer (called here directly, as its Ray task does): the state dict as a
    model of the policy's architecture; nothing of the export it replaces stays; None: the initial model."""
    from safetensors.torch import load_file

    from raydpo.models import load_causal_lm
    from raydpo.online.keep import adopt_checked, write_model
    from raydpo.train.weights import max_difference

    initial = load_causal_lm(tiny_model_dir).state_dict()
    state = {k: v + 0.5 for k, v in initial.items()}
    out = tmp_path / "model"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # e.g. the trainer's adapter-only export
    assert adopt_checked(state) == (state, True)
    write_model(state, tiny_model_dir, "float32", False, str(out))
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    assert max_difference(load_causal_lm(str(out)).state_dict(), state) == 0.0
    write_model(None, tiny_model_dir, "float32", False, str(out))
    assert max_difference(load_file(str(out / "model.safetensors")), load_file(f"{tiny_model_dir}/model.safetensors")) == 0.0
