"""Tokenization follows TRL's DPOTrainer convention on standard rows."""

from raydpo.data.tokenize import PROMPT_TOO_LONG, TokenizeSettings, pair_id, split_tokens, tokenize_pairs


def one(tokenizer, prompt, chosen, rejected, max_length=64):
    (row,) = tokenize_pairs(tokenizer, [prompt], [chosen], [rejected], TokenizeSettings(max_length))
    return row


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_bos_prompt_and_eos_appended(tokenizer):
    row = one(tokenizer, "Count on from apple:", " tiger river", " river tiger")
    assert tokens(tokenizer, row["prompt_ids"]) == ["<s>", "Count", "Ġon", "Ġfrom", "Ġapple", ":"]
    assert tokens(tokenizer, row["chosen_ids"]) == ["Ġtiger", "Ġriver", "</s>"]
    assert tokens(tokenizer, row["rejected_ids"]) == ["Ġriver", "Ġtiger", "</s>"]
    assert row["filtered"] is None


def test_eos_not_doubled_when_present(tokenizer):
    row = one(tokenizer, "Count on from apple:", " tiger</s>", " river")
    assert tokens(tokenizer, row["chosen_ids"]) == ["Ġtiger", "</s>"]
    assert tokens(tokenizer, row["rejected_ids"]) == ["Ġriver", "</s>"]


def test_prompt_plus_completion_is_the_joint_tokenization(tokenizer):
    """A BPE merge across the boundary ("app" + "le" -> "Ġapple") moves into the completions."""
    prompt, chosen, rejected = "Count on from app", "le tiger", "le river"
    row = one(tokenizer, prompt, chosen, rejected)
    alone = tokenizer(prompt)["input_ids"]
    assert row["prompt_ids"] + row["chosen_ids"] == tokenizer(prompt + chosen + "</s>")["input_ids"]
    assert row["prompt_ids"] + row["rejected_ids"] == tokenizer(prompt + rejected + "</s>")["input_ids"]
    assert row["prompt_ids"] == alone[: len(row["prompt_ids"])] and len(row["prompt_ids"]) < len(alone)
    assert tokens(tokenizer, row["chosen_ids"])[0] == "Ġapple"


def test_split_uses_the_shorter_common_prefix():
    assert split_tokens([1, 5, 6, 7], [1, 5, 6, 9, 2], [1, 5, 8, 2]) == ([1, 5], [6, 9, 2], [8, 2])


def test_keep_start_truncation(tokenizer):
    row = one(tokenizer, "Count on from apple:", " tiger river cloud stone piano", " river", max_length=8)
    assert len(row["prompt_ids"]) == 6
    assert tokens(tokenizer, row["chosen_ids"]) == ["Ġtiger", "Ġriver"]  # cut to 8 tokens, start kept
    assert tokens(tokenizer, row["rejected_ids"]) == ["Ġriver", "</s>"]  # short enough: untouched


def test_prompt_at_max_length_is_filtered(tokenizer):
    row = one(tokenizer, "Count on from apple:", " tiger", " river", max_length=6)  # prompt has 6 tokens
    assert row["filtered"] == PROMPT_TOO_LONG
    assert one(tokenizer, "Count on from apple:", " tiger", " river", max_length=7)["filtered"] is None


def test_batched_equals_one_by_one(tokenizer):
    rows = [("Count on from apple:", " tiger", " river"), ("Hello", " a", " b"), ("", " x y", " y x")]
    batched = tokenize_pairs(tokenizer, *map(list, zip(*rows)), TokenizeSettings(64))
    assert batched == [one(tokenizer, *r) for r in rows]


def test_pair_id_is_content_addressed():
    assert pair_id("p", "c", "r") == pair_id("p", "c", "r")
    assert len({pair_id("p", "c", "r"), pair_id("p", "r", "c"), pair_id("pc", "", "r")}) == 3


def test_common_prefix_length_paths():
    from raydpo.data.tokenize import common_prefix_length

    a = list(range(100))
    assert common_prefix_length(a, a + [5]) == 100  # prefix
    assert common_prefix_length(a, a[:97] + [0, 0, 0, 0]) == 97  # boundary merge near the end
    assert common_prefix_length(a, a[:10] + [-1] * 90) == 10  # early divergence: the fallback scan
    assert common_prefix_length([], a) == 0 and common_prefix_length([1], [2]) == 0


def test_backend_encoding_equals_tokenizer_call(tokenizer):
    from raydpo.data.tokenize import encode

    texts = ["Count on from apple: tiger", "<s>hi</s> there", "", "Human: x\n\nAssistant: y"]
    for special in (True, False):
        assert encode(tokenizer, texts, special) == tokenizer(texts, add_special_tokens=special)["input_ids"]


def test_load_tokenizer_is_auto_tokenizer(tiny_model_dir):
    """The driver's tokenizer is AutoTokenizer's (class, pipeline, specials, template), loaded once."""
    from transformers import AutoTokenizer

    from raydpo.models import load_tokenizer

    ours, auto = load_tokenizer(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(ours) is type(auto)
    assert ours.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert (ours.special_tokens_map, ours.chat_template) == (auto.special_tokens_map, auto.chat_template)
    assert load_tokenizer(tiny_model_dir) is ours
