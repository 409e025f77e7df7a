"""Prompts for the rounds: read from ``data.train`` / ``data.eval`` (or a ``ray.data.Dataset``),
rendered and tokenized as the data stage renders prompts, drawn per round from a seeded generator.

Any format the data stage reads works: a prompt-only row ``{prompt}`` (string or messages), a
standard or conversational pair (its completions are ignored) or an implicit pair (the prompt is the
shared start of chosen and rejected). A row without a usable prompt is quarantined with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

import numpy as np

from raydpo.data.tokenize import PROMPT_TOO_LONG, encode, pair_id
from raydpo.data.validate import Bad, messages, normalize

PromptValue = Union[str, list]


@dataclass
class Prompt:
    """One distinct prompt, ready for the generator."""

    value: PromptValue
    """As in the data: a string, or a list of ``{role, content}`` messages."""
    ids: list[int]
    """Token ids the policy sees (rendered, special tokens, ``data.max_prompt_length`` applied)."""


def prompt_of(row: dict, fmt: str = "auto", marker: str = "\n\nAssistant:") -> PromptValue:
    """The prompt of one parsed row (column mapping already applied), or raise Bad."""
    if "prompt" in row and not ("chosen" in row and "rejected" in row):
        value = row["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise Bad("empty_prompt")
            return value
        if value is None:
            raise Bad("missing_field: prompt")
        return messages(value, "prompt")
    return normalize(row, fmt, marker).prompt


def parse_prompt_rows(raw_rows: list[dict], columns: dict, fmt: str, marker: str) -> tuple[list[PromptValue], list[dict]]:
    """``{source, index, raw}`` rows -> (prompts in input order, quarantine entries)."""
    prompts, bad = [], []
    for r in raw_rows:
        try:
            row = json.loads(r["raw"])
            if not isinstance(row, dict):
                raise Bad(f"not_an_object: got {type(row).__name__}")
            if columns:
                renamed = {ours: row[theirs] for ours, theirs in columns.items() if theirs in row}
                row = {k: v for k, v in row.items() if k not in columns.values()} | renamed
            prompts.append(prompt_of(row, fmt, marker))
        except (Bad, ValueError) as e:
            bad.append({"stage": "prompts", "source": r["source"], "index": int(r["index"]), "reason": str(e),
                        "row": r["raw"].decode("utf-8", errors="backslashreplace") if isinstance(r["raw"], bytes) else str(r["raw"])})
    return prompts, bad


def distinct(prompts: list[PromptValue]) -> list[PromptValue]:
    """Prompts in first-seen order, each once (preference data repeats prompts across pairs)."""
    seen, out = set(), []
    for p in prompts:
        key = pair_id(p, "", "")
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def tokenize_prompts(tokenizer, prompts: list[PromptValue], max_length: int, max_prompt_length: int | None,
                     truncation_mode: str, chat_template: str | None) -> tuple[list[Prompt], list[tuple[PromptValue, str]]]:
    """Token ids for each prompt as :mod:`raydpo.data.tokenize` renders a pair's prompt (text with
    special tokens; messages through the chat template with the generation prompt). Returns (kept,
    [(prompt, reason)] filtered: a prompt of ``max_length`` tokens or more leaves no room to answer)."""
    texts = [p for p in prompts if isinstance(p, str)]
    chats = [p for p in prompts if not isinstance(p, str)]
    ids = dict(zip(map(id, texts), encode(tokenizer, texts, True))) if texts else {}
    if chats:
        rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, chat_template=chat_template)
                    for p in chats]
        ids |= dict(zip(map(id, chats), encode(tokenizer, rendered, False)))
    kept, filtered = [], []
    for p in prompts:
        t = ids[id(p)]
        if max_prompt_length is not None and len(t) > max_prompt_length:
            t = t[:max_prompt_length] if truncation_mode == "keep_start" else t[-max_prompt_length:]
        if len(t) >= max_length:
            filtered.append((p, PROMPT_TOO_LONG))
        else:
            kept.append(Prompt(p, list(t)))
    return kept, filtered


def round_prompts(prompts: list[Prompt], n: int, seed: int, round_: int) -> list[Prompt]:
    """``n`` prompts for round ``round_``: a seeded permutation (without replacement while the pool
    lasts, then again), the same on every run of the same config."""
    rng = np.random.default_rng([seed, round_])
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(-(-n // len(prompts)))])[:n]
    return [prompts[i] for i in order]


def read_rows(specs: list[str], dataset=None) -> list[dict]:
    """``{source, index, raw}`` rows of ``data.train``-style specs, or of a ``ray.data.Dataset``."""
    from raydpo.data.sources import from_ray, read_preferences

    ds = from_ray(dataset) if dataset is not None else read_preferences(specs)[0]
    return ds.take_all()


@dataclass
class PromptSets:
    """The run's prompts and what happened to the rows they came from (counts add up:
    ``rows_read = rows_used + rows_quarantined``; the used rows' ``distinct`` prompts are ``filtered``
    (too long), ``train``, ``eval`` or ``eval_unused`` (held-out prompts past ``online.eval_prompts``))."""

    train: list[Prompt]
    eval: list[Prompt]
    counts: dict
    quarantine: list[dict]


def load_prompts(cfg, tokenizer, train_ds=None, eval_ds=None) -> PromptSets:
    """Training and held-out prompts for ``cfg`` (``online.eval_prompts`` held out: from
    ``data.eval`` / ``eval_ds`` when given, else the last distinct training prompts set aside)."""
    d, n_eval = cfg.data, cfg.online.eval_prompts
    rows = read_rows(d.train, train_ds)
    values, bad = parse_prompt_rows(rows, d.columns, d.format, d.prompt_marker)
    eval_values, eval_rows = [], 0
    if n_eval and (eval_ds is not None or d.eval):
        erows = read_rows(d.eval, eval_ds)
        eval_rows = len(erows)
        ev, ebad = parse_prompt_rows(erows, d.columns, d.format, d.prompt_marker)
        bad += ebad
        eval_values = distinct(ev)
    unique = distinct(values)
    kept, filtered = tokenize_prompts(tokenizer, unique, d.max_length, d.max_prompt_length, d.truncation_mode, d.chat_template)
    held, unused = [], 0
    if eval_values:
        held, efiltered = tokenize_prompts(tokenizer, eval_values, d.max_length, d.max_prompt_length, d.truncation_mode, d.chat_template)
        filtered += efiltered
        held, unused = held[:n_eval], max(len(held) - n_eval, 0)
    elif n_eval:
        if len(kept) <= n_eval:
            raise ValueError(f"{len(kept)} distinct training prompts cannot spare online.eval_prompts={n_eval} held-out ones: "
                             "give data.eval, lower online.eval_prompts or set it to 0")
        kept, held = kept[:-n_eval], kept[-n_eval:]
    if not kept:
        raise ValueError(f"no usable training prompt in {d.train or 'the dataset'} ({len(rows)} rows, {len(bad)} quarantined, "
                         f"{len(filtered)} too long for data.max_length={d.max_length})")
    counts = {"rows_read": len(rows) + eval_rows, "rows_quarantined": len(bad), "rows_used": len(rows) + eval_rows - len(bad),
              "distinct": len(unique) + len(eval_values), "filtered": {PROMPT_TOO_LONG: len(filtered)} if filtered else {},
              "train": len(kept), "eval": len(held), "eval_unused": unused}
    return PromptSets(kept, held, counts, bad)
