"""Row formats: standard, conversational, implicit prompt (text and messages), column mapping."""

import gzip
import json
import os

import pytest

from conftest import SHARED_DATA
from raydpo.data.tokenize import TokenizeSettings, tokenize_normalized, truncate_pair
from raydpo.data.validate import Pair, normalize, parse_row, split_text

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def parse(row, **kw):
    return parse_row(json.dumps(row).encode(), **kw)


def test_standard_and_conversational_are_detected():
    pair, _ = parse({"prompt": "p", "chosen": " a", "rejected": " b"})
    assert pair == Pair("p", " a", " b", "text")
    conv = {"prompt": [{"role": "system", "content": "s"}, U("q"), A("x"), U("q2")], "chosen": [A("a")], "rejected": [A("b")]}
    pair, _ = parse(conv)
    assert pair.kind == "chat" and pair.prompt[0]["role"] == "system" and pair.chosen == [A("a")]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": [U("q")], "chosen": [{"role": "robot", "content": "a"}], "rejected": [A("b")]}, "unknown_role: chosen[0] has role 'robot'"),
        ({"prompt": [U(["q"])], "chosen": [A("a")], "rejected": [A("b")]}, "wrong_type: prompt[0].content is list"),
        ({"prompt": [U("q")], "chosen": [U("a")], "rejected": [A("b")]}, "bad_message: chosen must start with an assistant"),
        ({"prompt": [U("q")], "chosen": [A(" ")], "rejected": [A("b")]}, "empty_completion: chosen"),
        ({"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("a")]}, "identical_completions"),
        ({"prompt": [U("q")], "chosen": "a", "rejected": [A("b")]}, "wrong_type"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: yo\n\nAssistant: b"}, "no_prompt"),
        ({"chosen": [U("q"), A("a")], "rejected": [U("r"), A("b")]}, "no_prompt"),
        ({"prompt": "p", "chosen": " a"}, "missing_field: rejected"),
    ],
)
def test_bad_rows_get_reasons(row, reason):
    pair, why = parse(row)
    assert pair is None and why.startswith(reason), why


def test_column_mapping():
    pair, _ = parse({"question": "p", "response_j": " a", "response_k": " b"},
                    columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert pair == Pair("p", " a", " b", "text")


def test_implicit_text_uses_marker_inside_common_prefix():
    """Both responses start with the same words, and the chosen one quotes the marker."""
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant:"
    chosen = prompt + " The answer is 4.\n\nAssistant: (quoting)"
    rejected = prompt + " The answer is 5."
    p, c, r = split_text(chosen, rejected, "\n\nAssistant:")
    assert (p, c, r) == (prompt, " The answer is 4.\n\nAssistant: (quoting)", " The answer is 5.")


def test_implicit_messages_cut_back_to_last_assistant_turn():
    chosen = [U("q"), A("x"), U("q2"), A("good")]
    rejected = [U("q"), A("x"), U("q2"), A("bad")]
    pair = normalize({"chosen": chosen, "rejected": rejected})
    assert pair.prompt == chosen[:3] and pair.chosen == [A("good")] and pair.kind == "chat"


HH = os.path.join(SHARED_DATA, "harmless-base-test.jsonl.gz")


@pytest.mark.skipif(not os.path.exists(HH), reason="../shared/data (hh-rlhf) is not present in this checkout")
def test_hh_rlhf_every_row_splits_exactly():
    rows = [json.loads(l) for l in gzip.open(HH, "rt")]
    assert len(rows) == 2312
    empty, traps_ok = [], 0
    for i, row in enumerate(rows):
        p, c, r = split_text(row["chosen"], row["rejected"], "\n\nAssistant:")
        assert p + c == row["chosen"] and p + r == row["rejected"], i
        assert p.endswith("\n\nAssistant:")
        naive = row["chosen"][: row["chosen"].rfind("\n\nAssistant:")]
        if i in (1254, 1688, 1950, 1952, 2036):
            # Splitting each string at its own last marker gives chosen and rejected different prompts here.
            assert naive != row["rejected"][: row["rejected"].rfind("\n\nAssistant:")]
            traps_ok += 1
        pair, why = parse_row(json.dumps(row).encode())
        if pair is None:
            empty.append((i, why))
    assert traps_ok == 5
    assert empty == [(i, "empty_completion: chosen") for i in (86, 516, 925, 1103)]


def test_chat_tokenization_follows_trl(tokenizer):
    prompt = [U("Count on from apple")]
    pair = Pair(prompt, [A("tiger river")], [A("river tiger")], "chat")
    (row,) = tokenize_normalized(tokenizer, [pair], TokenizeSettings(64))
    gen = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [A("tiger river")], tokenize=False)
    assert row["prompt_ids"] == tokenizer(gen, add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"] + row["chosen_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"][0] == tokenizer.bos_token_id and row["prompt_ids"].count(tokenizer.bos_token_id) == 1
    assert row["chosen_ids"][-2] == tokenizer.eos_token_id  # the template closes the turn: EOS then newline
    # A template given in the config replaces the tokenizer's.
    (other,) = tokenize_normalized(tokenizer, [pair], TokenizeSettings(64, chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}"))
    assert tokenizer.decode(other["prompt_ids"] + other["chosen_ids"]) == "Count on from apple|tiger river|"


@pytest.mark.parametrize(
    "mode, mpl, expect",
    [
        ("keep_start", None, ([1, 2, 3, 4], [10, 11], [20], None)),
        ("keep_start", 2, ([1, 2], [10, 11, 12, 13], [20], None)),
        ("keep_end", None, ([3, 4], [10, 11, 12, 13], [20], None)),
        ("keep_end", 3, ([3, 4], [10, 11, 12, 13], [20], None)),
    ],
)
def test_truncation_modes(mode, mpl, expect):
    s = TokenizeSettings(max_length=6, truncation_mode=mode, max_prompt_length=mpl)
    assert truncate_pair([1, 2, 3, 4], [10, 11, 12, 13], [20], s) == expect


def test_keep_end_long_completion_and_keep_start_filter():
    s = TokenizeSettings(max_length=3, truncation_mode="keep_end")
    # A completion longer than max_length keeps its end, and one prompt token stays as its context.
    assert truncate_pair([1, 2], [10, 11, 12, 13], [20], s) == ([2], [12, 13], [20], None)
    assert truncate_pair([1, 2, 3], [10], [20], TokenizeSettings(max_length=3))[3] == "prompt_too_long"


def test_column_swap_and_user_turn_in_completion():
    pair, _ = parse({"prompt": "p", "chosen": " bad", "rejected": " good"}, columns={"chosen": "rejected", "rejected": "chosen"})
    assert pair == Pair("p", " good", " bad", "text")
    pair, why = parse({"chosen": [U("q"), A("x"), U("q2"), A("a")], "rejected": [U("q"), A("x"), U("q3"), A("b")]})
    assert pair is None and why.startswith("bad_message: the chosen completion holds a non-assistant turn")


def test_template_error_and_empty_completion_tokens(tokenizer):
    raising = "{{ raise_exception('roles must alternate') }}"
    drops = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    pair = Pair([U("q")], [A("a")], [A("b")], "chat")
    text = Pair("p", " a", " b", "text")
    bad, ok = tokenize_normalized(tokenizer, [pair, text], TokenizeSettings(64, chat_template=raising))
    assert bad["error"].startswith("template_error") and "roles must alternate" in bad["error"]
    assert ok["error"] is None and ok["chosen_ids"]
    (empty,) = tokenize_normalized(tokenizer, [pair], TokenizeSettings(64, chat_template=drops))
    assert empty["filtered"] == "empty_completion_tokens"
