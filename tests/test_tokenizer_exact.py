"""The data actors' tokenizer is AutoTokenizer's, for every model family (raydpo.data.tokenizer).

Each family's tiny directory names the tokenizer class its checkpoints ship, so AutoTokenizer
rebuilds that class's own pipeline (Qwen2 splits digits, Llama and Gemma are SentencePiece-style);
raydpo's ids must equal ``AutoTokenizer.from_pretrained(dir)``'s on hh-rlhf rows, through the real
Ray Data stage too.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import pytest

from conftest import SHARED_DATA, make_config
from raydpo.data.prompt_cut import special_prefix
from raydpo.data.tokenize import TokenizeSettings, tokenize_normalized
from raydpo.data.tokenizer import ShippedTokenizer, TokenizerMismatch, load_spec, tokenizer_spec
from raydpo.data.validate import Pair, parse_row
from raydpo.fixtures.families import FAMILIES, write_family_model

HH = os.path.join(SHARED_DATA, "harmless-base-test.jsonl.gz")
NUMBERS = "in 1999 there were 12345 cases"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {name: write_family_model(root / name, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def hh_pairs() -> list[Pair]:
    lines = [line for _, line in zip(range(600), gzip.open(HH, "rt"))]
    return [p for p, _ in (parse_row(line.encode()) for line in lines) if p is not None]


def auto(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def full_sequences(tok, pair: Pair, max_length: int) -> tuple[list[int], list[int]]:
    """TRL's sequences: prompt + completion + EOS, tokenized whole with special tokens, cut to max_length."""
    eos = tok.eos_token
    return tuple(tok(pair.prompt + c + ("" if c.endswith(eos) else eos))["input_ids"][:max_length]
                 for c in (pair.chosen, pair.rejected))


def test_auto_tokenizer_picks_the_family_class(family_dirs):
    """The fixture exercises what matters: classes that rebuild the pipeline, and the issue's case."""
    from transformers import PreTrainedTokenizerFast

    classes = {name: type(auto(d)).__name__ for name, d in family_dirs.items()}
    assert classes["qwen2"] == "Qwen2Tokenizer" and classes["llama"] == "LlamaTokenizer"
    assert classes["gemma2"] == "GemmaTokenizer" and classes["gpt_neox"] == "GPTNeoXTokenizer"
    # The generic class raydpo loaded before keeps multi-digit tokens where Qwen2Tokenizer splits digits.
    generic = PreTrainedTokenizerFast.from_pretrained(family_dirs["qwen2"])
    assert generic(NUMBERS)["input_ids"] != auto(family_dirs["qwen2"])(NUMBERS)["input_ids"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_ids_equal_auto_tokenizer_on_hh_rlhf(family_dirs, hh_pairs, name):
    path = family_dirs[name]
    reference = auto(path)
    spec = tokenizer_spec(path, tokenizer=reference)
    tok = load_spec(spec)
    assert isinstance(tok, ShippedTokenizer)  # these classes encode by their pipeline alone
    prefix, _ = special_prefix(tok)
    for max_length in (4096, 128):  # whole sequences, and keep_start truncation after the split
        rows = tokenize_normalized(tok, hh_pairs, TokenizeSettings(max_length), prefix)
        kept = [(p, r) for p, r in zip(hh_pairs, rows) if r["filtered"] is None and r["error"] is None]
        assert len(kept) > 0.2 * len(hh_pairs)
        for pair, row in kept:
            assert (row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"]) == \
                full_sequences(reference, pair, max_length), (name, pair.prompt[-80:])
    assert tok(NUMBERS)["input_ids"] == reference(NUMBERS)["input_ids"]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_chat_rows_render_as_auto_tokenizer(family_dirs, name):
    reference = auto(family_dirs[name])
    tok = load_spec(tokenizer_spec(family_dirs[name], tokenizer=reference))
    chat = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "It is 42."},
            {"role": "user", "content": "And in 1999?"}]
    for gen in (True, False):
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
            reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    pair = Pair(chat, [{"role": "assistant", "content": "2041."}], [{"role": "assistant", "content": "no"}], "chat")
    (row,) = tokenize_normalized(tok, [pair], TokenizeSettings(256), special_prefix(tok)[0])
    want = reference.apply_chat_template(chat + pair.chosen, tokenize=False)
    assert row["prompt_ids"] + row["chosen_ids"] == reference(want, add_special_tokens=False)["input_ids"]


def test_a_class_that_overrides_encoding_is_loaded_whole(family_dirs):
    """A class whose tokenizer(text) is more than its pipeline is not shipped: actors load it."""
    reference = auto(family_dirs["qwen2"])
    cls = type(reference)
    Custom = type("Custom", (cls,), {"tokenize": lambda self, text, **kw: cls.tokenize(self, text.lower(), **kw)})
    odd = Custom.__new__(Custom)
    odd.__dict__.update(reference.__dict__)
    spec = tokenizer_spec(family_dirs["qwen2"], tokenizer=odd)
    assert spec.backend_json is None and spec.class_name == "Custom"
    assert type(load_spec(spec)).__name__ == "Qwen2Tokenizer"  # each actor runs AutoTokenizer itself


def test_an_actor_that_disagrees_stops_with_the_text(family_dirs):
    spec = tokenizer_spec(family_dirs["gpt2"])
    text, ids = spec.probes[0]
    with pytest.raises(TokenizerMismatch, match="1999"):
        load_spec(dataclasses.replace(spec, probes=((text, ids[:-1]),)))


def test_data_stage_on_ray_gives_auto_tokenizer_ids(ray_cluster, family_dirs, tmp_path):
    """The real pipeline: Ray Data's tokenizer actors on hh-rlhf rows for the digit-splitting family."""
    import raydpo
    import ray.data

    lines = [json.loads(line) for _, line in zip(range(48), gzip.open(HH, "rt"))]
    lines.append({"chosen": f"\n\nHuman: {NUMBERS}?\n\nAssistant: 2024 had 366 days.",
                  "rejected": f"\n\nHuman: {NUMBERS}?\n\nAssistant: 12 or 13."})
    cfg = make_config(family_dirs["qwen2"], "unused.jsonl", tmp_path, data={"max_length": 1024})
    pairs = raydpo.tokenize_pairs(ray.data.from_items(lines), cfg).take_all()
    reference = auto(family_dirs["qwen2"])
    parsed = {p.chosen: p for p, _ in (parse_row(json.dumps(r).encode()) for r in lines)}
    assert len(pairs) >= 30  # some land in the eval split
    checked_numbers = False
    for row in pairs:
        p, c, r = (list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        pair = next(q for q in parsed.values() if reference(q.prompt + q.chosen + reference.eos_token)["input_ids"][:1024] == p + c)
        assert p + r == full_sequences(reference, pair, 1024)[1]
        checked_numbers |= NUMBERS in pair.prompt
    assert checked_numbers


def test_a_tokenizer_without_chat_template_quarantines_chat_rows(family_dirs):
    """As with transformers: no template renders nothing, and the row is bad input with its reason."""
    tok = load_spec(dataclasses.replace(tokenizer_spec(family_dirs["gpt2"]), chat_template=None))
    chat = Pair([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
                [{"role": "assistant", "content": "b"}], "chat")
    text = Pair("Hello", " a", " b", "text")
    bad, good = tokenize_normalized(tok, [chat, text], TokenizeSettings(64), special_prefix(tok)[0])
    assert bad["error"].startswith("template_error: ValueError") and "chat_template is not set" in bad["error"]
    assert good["error"] is None and good["chosen_ids"]


def test_both_caches_key_the_class_autotokenizer_picks(family_dirs, tmp_path):
    """What stands for "the tokenizer" in the tokenized-data and reference cache keys: the class and
    pipeline AutoTokenizer built, not the files alone. A qwen2 directory whose config.json is edited to
    qwen3 keeps its tokenizer files but gets the generic class: another key, at once (the driver's
    tokenizer memo follows config.json too)."""
    import shutil

    from raydpo.data.tokenizer import tokenizer_key
    from raydpo.reference.stage import cache_inputs

    path = str(tmp_path / "qwen2")
    shutil.copytree(family_dirs["qwen2"], path)
    cfg = make_config(path, [], tmp_path)
    before = tokenizer_key(path, False)
    assert before["class"] == "Qwen2Tokenizer" and cache_inputs(cfg, [], {})["tokenizer"] == before
    config = json.load(open(os.path.join(path, "config.json")))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config | {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, f)
    after = tokenizer_key(path, False)
    assert after["class"] == "TokenizersBackend" and after["files"] == before["files"] and after["spec"] != before["spec"]
    assert cache_inputs(cfg, [], {})["tokenizer"] == after
    assert tokenizer_key(family_dirs["qwen2"], False) == tokenizer_key(family_dirs["qwen2"], False)
