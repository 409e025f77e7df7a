"""The shared-prompt fast path gives exactly the ids of three full tokenizations, or is not taken."""

import gzip
import json
import os
import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from conftest import SHARED_DATA
from raydpo.data.prompt_cut import SAFE_PATTERNS, cut_point, special_prefix
from raydpo.data.tokenize import TokenizeSettings, tokenize_normalized
from raydpo.data.validate import Pair, parse_row

LLAMA3 = next(p for p in SAFE_PATTERNS if "{1,3}" in p)
HH = os.path.join(SHARED_DATA, "harmless-base-test.jsonl.gz")
# Pieces chosen to sit on every branch of the split regexes: contractions (any case), digit runs,
# non-ASCII letters, marks, whitespace runs with and without newlines, CRLF, punctuation runs,
# emoji and the special tokens' own text.
PIECES = ["Human", "Assistant", ":", " ", "  ", "\n", "\n\n", "\r\n", "\t", " \n", "'s", "'LL", "'t", "don", "12345",
          "3", "é", "e\u0301", "中文", "Ωmega", "?!", "...", "—", "🙂", "</s>", "<s>", "<|eot|>", "a", "Z", "x y"]


def corpus() -> list[str]:
    rows = [json.loads(line) for line in gzip.open(HH, "rt")]
    return [r["chosen"] for r in rows[:400]] + ["".join(PIECES) * 3]


def llama3_style(texts: list[str]) -> PreTrainedTokenizerFast:
    """A Llama 3 / Qwen style byte-level BPE: NFC, the Llama 3 split regex, BOS post-processor."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|bos|>", "<|eot|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eot|>", pad_token="<pad>")


def metaspace(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers_under_test(tokenizer, tmp_path_factory):
    """Including what the data actors really run for a Qwen2 checkpoint: AutoTokenizer's
    Qwen2Tokenizer (digits split, NFC), shipped to them (raydpo.data.tokenizer)."""
    from raydpo.data.tokenizer import load_spec, tokenizer_spec
    from raydpo.fixtures.families import write_family_model

    qwen2 = write_family_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2")
    return {"byte-level (GPT-2 regex)": tokenizer, "llama3-style (split regex, NFC)": llama3_style(corpus()),
            "qwen2 (AutoTokenizer's Qwen2Tokenizer, shipped)": load_spec(tokenizer_spec(qwen2))}


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


def both_paths(tok, pairs: list[Pair], max_length: int = 100_000):
    prefix, why = special_prefix(tok)
    assert prefix is not None, why
    settings = TokenizeSettings(max_length)
    return tokenize_normalized(tok, pairs, settings, prefix), tokenize_normalized(tok, pairs, settings, None)


def test_hh_rlhf_rows_give_identical_ids(tokenizers_under_test):
    pairs = [p for p, _ in (parse_row(line.encode()) for line in gzip.open(HH, "rt")) if p is not None]
    assert len(pairs) > 2200
    for name, tok in tokenizers_under_test.items():
        fast, plain = both_paths(tok, pairs)
        assert fast == plain, name
        fast, plain = both_paths(tok, pairs, max_length=256)  # truncation applies after the split
        assert fast == plain, name


def test_adversarial_strings_give_identical_ids(tokenizers_under_test):
    rng = random.Random(0)
    pairs = [Pair(random_text(rng, rng.randint(1, 30)), random_text(rng, rng.randint(1, 8)),
                  random_text(rng, rng.randint(1, 8)), "text") for _ in range(3000)]
    for name, tok in tokenizers_under_test.items():
        fast, plain = both_paths(tok, pairs)
        assert fast == plain, name


def test_chat_pairs_give_identical_ids(tokenizer):
    rng = random.Random(1)
    pairs = []
    for _ in range(300):
        turns = [{"role": r, "content": random_text(rng, rng.randint(1, 10))} for r in ("system", "user", "assistant", "user")]
        pairs.append(Pair(turns[: rng.randint(2, 4)] if rng.random() < 0.5 else turns[1:2],
                          [{"role": "assistant", "content": random_text(rng, 5)}],
                          [{"role": "assistant", "content": random_text(rng, 6)}], "chat"))
    fast, plain = both_paths(tokenizer, pairs)
    assert fast == plain


def test_cut_point_is_the_last_letter_before_whitespace():
    assert cut_point("Human: How are you?\n\nAssistant:") == len("Human: How are")
    assert cut_point("one\n") == 3
    assert cut_point("?!  12 3\n") == 0  # no ASCII letter before a whitespace: nothing is shared
    assert cut_point("word") == 0
    long = "a b" + "." * 1000
    assert cut_point(long) == 1  # found beyond the tail window too


def test_unsupported_tokenizers_take_the_plain_path(tokenizer):
    texts = corpus()
    prefix, why = special_prefix(metaspace(texts))
    assert prefix is None and "pre-tokenizer" in why and "Metaspace" in why

    appends = llama3_style(texts)
    eot = appends.convert_tokens_to_ids("<|eot|>")
    appends.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A <|eot|>", special_tokens=[("<|eot|>", eot)])
    assert special_prefix(appends) == (None, "the post-processor adds tokens after the text")

    lower = llama3_style(texts)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert special_prefix(lower)[1] == "normalizer Lowercase"

    spaced = llama3_style(texts)
    spaced.add_tokens(["New York"])
    assert "added token 'New York'" in special_prefix(spaced)[1]

    other_regex = llama3_style(texts)
    other_regex.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+\s?|\W"), behavior="isolated")
    assert special_prefix(other_regex)[0] is None

    assert special_prefix(tokenizer) == ([tokenizer.bos_token_id], "")


def test_truncation_saved_in_tokenizer_json_is_ignored(tokenizer):
    """raydpo truncates by its own rules; a tokenizer.json with truncation on must not cut silently."""
    pair = Pair("Count on from apple:" * 20, " tiger river", " river tiger", "text")
    (want,) = tokenize_normalized(tokenizer, [pair], TokenizeSettings(1000))
    tokenizer.backend_tokenizer.enable_truncation(8)
    try:
        (got,) = tokenize_normalized(tokenizer, [pair], TokenizeSettings(1000), special_prefix(tokenizer)[0])
    finally:
        tokenizer.backend_tokenizer.no_truncation()
    assert got == want and len(want["prompt_ids"]) > 8
