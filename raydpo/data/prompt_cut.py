"""Tokenize a pair's prompt once instead of three times, with exactly the same token ids.

TRL's convention needs T(prompt), T(prompt + chosen) and T(prompt + rejected); on multi-turn data
the prompt is most of the characters (79% of what is tokenized on hh-rlhf), so it dominates the
cost. For the tokenizers described below a prompt can be cut at a position ``c`` where
``prompt[c-1]`` is an ASCII letter and ``prompt[c]`` an ASCII whitespace, and for every string
``s`` that starts with ``prompt[:c+1]``:

    T(s) == specials + T_plain(s[:c]) + T_plain(s[c:])

so the head ``prompt[:c]`` is tokenized once per pair and only the short tail (usually the last
words of the user turn and the assistant marker) is tokenized with each completion.

Why the identity holds, step by step of the Hugging Face ``tokenizers`` pipeline:
- added tokens are split out first: none holds "letter then whitespace" (so none spans ``c``), none
  ending in a letter strips whitespace to its right, and none is ``single_word`` (which looks at its
  neighbours);
- the normalizer is none, NFC or NFKC: a whitespace is a starter that composes with nothing before it;
- the first pre-tokenizer is a regex split scanned left to right, with no look-behind, whose pattern
  is one of :data:`SAFE_PATTERNS` (GPT-2's ByteLevel regex, Llama 3's, Qwen 2's): in each, the only
  alternatives that can hold a letter end in a letter, so the match holding ``s[c-1]`` ends at ``c``
  whatever follows ``s[c]``, and the scan restarts at ``c`` as it does on ``s[c:]``;
- later pre-tokenizers and the model (BPE without dropout, WordPiece, Unigram, WordLevel) work on
  each split on its own, so they never join the two sides;
- the post-processor only prepends special tokens (checked by probing).
Every other tokenizer (SentencePiece/Metaspace prefixes, unknown regexes, BPE dropout, lowercasing,
a post-processor that appends) takes the plain path: three full tokenizations. ``data.shared_prompt``
turns the fast path off by hand.
"""

from __future__ import annotations

import json
import re

#: Pre-tokenizer regexes for which a "letter | whitespace" position is always a split point.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SAFE_PATTERNS = frozenset({
    GPT2_PATTERN,
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # Qwen 2 / 2.5 / 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
})
SAFE_NORMALIZERS = (None, "NFC", "NFKC")
#: Pre-tokenizers that only split each piece further (allowed after the first, splitting one).
PER_PIECE = ("Digits", "Punctuation", "Split", "Whitespace", "WhitespaceSplit", "ByteLevel")
LETTER_SPACE = re.compile(r"[A-Za-z][ \t\n\r]")
TAIL_WINDOW = 256


def _first_split_is_safe(step: dict) -> bool:
    if step.get("type") == "ByteLevel":
        return step.get("use_regex", True) and not step.get("add_prefix_space", False)
    if step.get("type") == "Split":
        pattern = step.get("pattern", {})
        return pattern.get("Regex") in SAFE_PATTERNS and not step.get("invert", False)
    return False


def _later_step_is_safe(step: dict) -> bool:
    if step.get("type") not in PER_PIECE:
        return False
    return not (step.get("type") == "ByteLevel" and step.get("add_prefix_space", False))


def _pipeline_issue(spec: dict) -> str | None:
    """Why the tokenizer pipeline in ``tokenizer.json`` form is not cut-safe, or None."""
    norm = spec.get("normalizer")
    if (norm or {}).get("type") not in SAFE_NORMALIZERS:
        return f"normalizer {norm.get('type')}"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or not _first_split_is_safe(steps[0]) or not all(_later_step_is_safe(s) for s in steps[1:]):
        return "pre-tokenizer " + json.dumps(pre)[:120]
    model = spec.get("model") or {}
    if model.get("type") not in ("BPE", "WordPiece", "Unigram", "WordLevel") or model.get("dropout"):
        return f"model {model.get('type')} (dropout {model.get('dropout')})"
    for tok in spec.get("added_tokens", []):
        content = tok["content"]
        if LETTER_SPACE.search(content) or tok.get("single_word") or (tok.get("rstrip") and content[-1:].isalpha()):
            return f"added token {content!r}"
    return None


def special_prefix(tokenizer) -> tuple[list[int] | None, str]:
    """(ids the tokenizer prepends with special tokens, "") when prompts can be cut exactly,
    else (None, why not). ``tokenizer``: a transformers fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        return None, "not a fast tokenizer"
    backend = tokenizer.backend_tokenizer
    issue = _pipeline_issue(json.loads(backend.to_str()))
    if issue:
        return None, issue
    prefixes = set()
    for probe in ("Hello world", "a\n\nb: c"):
        full = backend.encode(probe, add_special_tokens=True).ids
        plain = backend.encode(probe, add_special_tokens=False).ids
        if full[len(full) - len(plain):] != plain:
            return None, "the post-processor adds tokens after the text"
        prefixes.add(tuple(full[: len(full) - len(plain)]))
    if len(prefixes) != 1:
        return None, "the post-processor's prefix depends on the text"
    return list(prefixes.pop()), ""


def cut_point(prompt: str) -> int:
    """The last ``c`` with ``prompt[c-1]`` an ASCII letter and ``prompt[c]`` an ASCII whitespace
    (so ``0 < c < len(prompt)``), or 0 when there is none (the whole prompt goes with each completion)."""
    for start in (max(0, len(prompt) - TAIL_WINDOW), 0):
        last = None
        for last in LETTER_SPACE.finditer(prompt, start):
            pass
        if last is not None:
            return last.start() + 1
        if start == 0:
            break
    return 0
