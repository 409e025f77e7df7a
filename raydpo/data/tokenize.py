"""Tokenization of normalized pairs with TRL's DPOTrainer convention (pure functions).

For each pair:
1. text pairs: EOS is appended to each completion that does not already end with it, and
   ``prompt``, ``prompt + chosen``, ``prompt + rejected`` are tokenized with special tokens;
   chat pairs: the prompt is rendered with the chat template and ``add_generation_prompt=True``,
   prompt + completion without it, and the rendered texts are tokenized without special tokens
   (the template writes them). One batched tokenizer call per kind. Where the tokenizer allows
   it (:mod:`raydpo.data.prompt_cut`) the prompt's head is tokenized once instead of three
   times, with the same ids.
2. The prompt is the longest common token prefix of the tokenized prompt with *both* full
   sequences, so ``prompt_ids + chosen_ids`` is exactly the tokenization of prompt + chosen
   (a BPE merge across the boundary moves the merged token into the completions).
3. Truncation (see :func:`truncate_pair`).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from dataclasses import dataclass

from raydpo.data.prompt_cut import cut_point

PROMPT_TOO_LONG = "prompt_too_long"
NO_COMPLETION = "empty_completion_tokens"


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides the tokenizer itself that decides the token ids (part of the cache key)."""

    max_length: int
    """Max tokens of prompt + completion per sequence."""
    truncation_mode: str = "keep_start"
    """Which end of an over-long sequence is kept: keep_start or keep_end."""
    max_prompt_length: int | None = None
    """Max prompt tokens (None: no separate prompt limit)."""
    add_eos: bool = True
    """Append EOS to text completions that lack it (TRL does for standard rows)."""
    chat_template: str | None = None
    """Chat template replacing the tokenizer's, or None."""


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists.

    Hot path of tokenization: the prompt is almost always a prefix of prompt + completion, or
    differs only in its last few tokens (a merge across the boundary), so slice comparisons (C
    speed) from the end come first and the element-wise scan is the fallback.
    """
    n = min(len(a), len(b))
    for k in range(n, max(n - 16, 0) - 1, -1):
        if a[:k] == b[:k]:
            return k
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pair_id(prompt, chosen, rejected) -> str:
    """Content address of a pair: the same strings give the same id on every run and machine."""
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def split_tokens(prompt: list[int], full_chosen: list[int], full_rejected: list[int]) -> tuple[list, list, list]:
    """(prompt_ids, chosen_ids, rejected_ids) from the three tokenizations, cut at the common prefix."""
    k = min(common_prefix_length(prompt, full_chosen), common_prefix_length(prompt, full_rejected))
    return full_chosen[:k], full_chosen[k:], full_rejected[k:]


def truncate_pair(p: list[int], c: list[int], r: list[int], settings: TokenizeSettings):
    """Apply ``max_prompt_length`` then ``max_length`` -> (p, c, r, filtered_reason or None).

    keep_start (TRL's default): the prompt keeps its first ``max_prompt_length`` tokens, each
    completion keeps what fits after the prompt; a pair whose prompt alone has ``max_length``
    tokens or more has no completion token left and is filtered (``prompt_too_long``).
    keep_end: the prompt keeps its last ``max_prompt_length`` tokens; when prompt + the longer
    completion exceed ``max_length``, the shared prompt loses its start (and a completion that
    alone exceeds ``max_length`` keeps its end). Unlike TRL, which cuts each sequence on its own,
    chosen and rejected keep the same prompt, so both are scored in the same context.
    """
    L, mpl, keep_start = settings.max_length, settings.max_prompt_length, settings.truncation_mode == "keep_start"
    if mpl is not None and len(p) > mpl:
        p = p[:mpl] if keep_start else p[-mpl:]
    if keep_start:
        if len(p) >= L:
            return p, [], [], PROMPT_TOO_LONG
        return p, c[: L - len(p)], r[: L - len(p)], None
    # At least one prompt token stays, so the first completion token is predicted from something.
    c, r = c[-(L - 1):], r[-(L - 1):]
    need = max(len(c), len(r))
    if len(p) + need > L:
        p = p[len(p) + need - L :]
    return p, c, r, None


def with_eos(text: str, eos: str | None) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def render(pair, tokenizer, settings: TokenizeSettings) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as text to tokenize."""
    if pair.kind == "text":
        eos = tokenizer.eos_token if settings.add_eos else None
        return pair.prompt, pair.prompt + with_eos(pair.chosen, eos), pair.prompt + with_eos(pair.rejected, eos)
    template = settings.chat_template
    apply = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen, chat_template=template
    )
    return apply(pair.prompt, True), apply(pair.prompt + pair.chosen, False), apply(pair.prompt + pair.rejected, False)


def encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of ``texts`` in one batched call.

    Fast tokenizers go straight to the Rust backend, which is what ``tokenizer(texts)`` calls too,
    minus the conversion of every encoding into a Python dict of lists (half of the time there).
    Truncation or padding saved in a ``tokenizer.json`` is switched off first, as
    ``tokenizer(texts)`` does: raydpo truncates by its own rules.
    """
    if getattr(tokenizer, "is_fast", False):
        backend = tokenizer.backend_tokenizer
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        # encode_batch_fast skips character offsets, which raydpo does not use (10-15% faster).
        batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def split_plain(tokenizer, rendered: list[tuple[str, str, str]], special: bool) -> list[tuple[list, list, list]]:
    """(prompt_ids, chosen_ids, rejected_ids) per rendered triple from three full tokenizations."""
    n = len(rendered)
    ids = encode(tokenizer, [t[0] for t in rendered] + [t[1] for t in rendered] + [t[2] for t in rendered], special)
    return [split_tokens(ids[j], ids[n + j], ids[2 * n + j]) for j in range(n)]


def split_shared(tokenizer, rendered: list[tuple[str, str, str]], prefix: list[int]) -> list[tuple[list, list, list]]:
    """Same result as :func:`split_plain`, tokenizing each prompt's head once (see
    :mod:`raydpo.data.prompt_cut`; valid only when ``special_prefix`` accepted the tokenizer and
    both full texts start with the prompt). ``prefix``: the special tokens prepended, or []."""
    n = len(rendered)
    cuts = [cut_point(p) for p, _, _ in rendered]
    texts = [p[:c] for (p, _, _), c in zip(rendered, cuts)]
    for part in range(3):
        texts += [t[part][c:] for t, c in zip(rendered, cuts)]
    ids = encode(tokenizer, texts, False)
    out = []
    for j in range(n):
        tail, tc, tr = ids[n + j], ids[2 * n + j], ids[3 * n + j]
        k = min(common_prefix_length(tail, tc), common_prefix_length(tail, tr))
        out.append((prefix + ids[j] + tc[:k], tc[k:], tr[k:]))
    return out


def tokenize_normalized(tokenizer, pairs: list, settings: TokenizeSettings, cut_prefix: list[int] | None = None) -> list[dict]:
    """Tokenize normalized :class:`raydpo.data.validate.Pair` s (text and chat mixed).

    ``cut_prefix``: what :func:`raydpo.data.prompt_cut.special_prefix` returned for this tokenizer
    (the fast path, same ids), or None for three full tokenizations per pair.
    Returns one dict per pair: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (after
    truncation), ``filtered`` (None or why a valid pair is dropped) and ``error`` (None or why the
    row is bad input, e.g. the chat template rejects it; such rows are quarantined).
    """
    out: list[dict | None] = [None] * len(pairs)
    for kind, special in (("text", True), ("chat", False)):
        rendered: dict[int, tuple[str, str, str]] = {}
        for i, pair in enumerate(pairs):
            if pair.kind != kind:
                continue
            try:
                rendered[i] = render(pair, tokenizer, settings)
            except Exception as e:  # a template that rejects this conversation: quarantine the row
                out[i] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "filtered": None,
                          "error": f"template_error: {type(e).__name__}: {e}"}
        # A chat template may render the prompt differently alone: such pairs take the plain path.
        shared = [i for i, (p, c, r) in rendered.items() if cut_prefix is not None and c.startswith(p) and r.startswith(p)]
        plain = sorted(rendered.keys() - set(shared))
        results = {}
        if shared:
            results.update(zip(shared, split_shared(tokenizer, [rendered[i] for i in shared], cut_prefix if special else [])))
        if plain:
            results.update(zip(plain, split_plain(tokenizer, [rendered[i] for i in plain], special)))
        for i, triple in results.items():
            p, c, r, why = truncate_pair(*triple, settings)
            if why is None and (not c or not r):
                why = NO_COMPLETION  # e.g. a chat template that drops the completion
            out[i] = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "filtered": why, "error": None}
    return out


def tokenize_pairs(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], settings: TokenizeSettings,
                   cut_prefix: list[int] | None = None):
    """Tokenize standard text pairs given as three lists (see :func:`tokenize_normalized`)."""
    from raydpo.data.validate import Pair

    pairs = [Pair(p, c, r, "text") for p, c, r in zip(prompts, chosen, rejected)]
    return tokenize_normalized(tokenizer, pairs, settings, cut_prefix)


def pair_key(pair) -> str:
    """Content address of a normalized pair (text or messages)."""
    return pair_id(pair.prompt, pair.chosen, pair.rejected)


def token_digest(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> bytes:
    """16-byte digest of exactly the tokens that will be scored (the data part of the cache key)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (prompt_ids, chosen_ids, rejected_ids):
        h.update(len(part).to_bytes(4, "little"))
        h.update(np.asarray(part, dtype=np.int32).tobytes())
    return h.digest()
