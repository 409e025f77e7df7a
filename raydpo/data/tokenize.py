"""Tokenization of standard preference rows with TRL's DPOTrainer convention (pure functions).

For each row ``{prompt, chosen, rejected}`` (strings):
1. EOS is appended to each completion that does not already end with it;
2. ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenized with special tokens
   (one batched tokenizer call for all three lists);
3. the prompt is the longest common token prefix of the tokenized prompt with *both* full
   sequences, so ``prompt_ids + chosen_ids`` is exactly the tokenization of prompt + chosen
   (a BPE merge across the boundary moves the merged token into the completions);
4. ``keep_start`` truncation: each ``prompt + completion`` is cut to ``max_length`` tokens; a pair
   whose prompt alone has ``max_length`` tokens or more is filtered (reason ``prompt_too_long``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

PROMPT_TOO_LONG = "prompt_too_long"


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides the tokenizer itself that decides the token ids (part of the cache key)."""

    max_length: int
    """Max tokens of prompt + completion per sequence."""
    truncation_mode: str = "keep_start"
    """Which end of an over-long sequence is kept."""
    add_eos: bool = True
    """Append EOS to completions that lack it (TRL does for standard rows)."""


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """Content address of a pair: the same strings give the same id on every run and machine."""
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def with_eos(text: str, eos: str | None) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def split_tokens(prompt: list[int], full_chosen: list[int], full_rejected: list[int]) -> tuple[list, list, list]:
    """(prompt_ids, chosen_ids, rejected_ids) from the three tokenizations, cut at the common prefix."""
    k = min(common_prefix_length(prompt, full_chosen), common_prefix_length(prompt, full_rejected))
    return full_chosen[:k], full_chosen[k:], full_rejected[k:]


def truncate(prompt_ids: list[int], completion: list[int], max_length: int) -> list[int]:
    """keep_start: the completion keeps what fits after the prompt in ``max_length`` tokens."""
    return completion[: max(0, max_length - len(prompt_ids))]


def tokenize_pairs(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], settings: TokenizeSettings):
    """Tokenize a batch of pairs.

    Returns one dict per pair: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of int,
    after truncation) and ``filtered`` (``None`` or the reason the pair is dropped).
    """
    eos = tokenizer.eos_token if settings.add_eos else None
    chosen = [with_eos(c, eos) for c in chosen]
    rejected = [with_eos(r, eos) for r in rejected]
    n = len(prompts)
    texts = list(prompts) + [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = []
    for i in range(n):
        p, c, r = split_tokens(ids[i], ids[n + i], ids[2 * n + i])
        if len(p) >= settings.max_length:
            out.append({"prompt_ids": p, "chosen_ids": [], "rejected_ids": [], "filtered": PROMPT_TOO_LONG})
            continue
        out.append(
            {
                "prompt_ids": p,
                "chosen_ids": truncate(p, c, settings.max_length),
                "rejected_ids": truncate(p, r, settings.max_length),
                "filtered": None,
            }
        )
    return out


def token_digest(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> bytes:
    """16-byte digest of exactly the tokens that will be scored (the data part of the cache key)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (prompt_ids, chosen_ids, rejected_ids):
        h.update(len(part).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in part))
    return h.digest()
