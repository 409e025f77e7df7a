"""Parse, validate and normalize raw preference rows (pure functions).

Every format becomes one of two normalized shapes:
- text: ``prompt``, ``chosen``, ``rejected`` strings (standard rows, and implicit-prompt dialogues
  such as hh-rlhf split at the last assistant marker inside their common prefix);
- chat: ``prompt`` a list of messages, ``chosen`` / ``rejected`` lists of assistant messages
  (conversational rows, and implicit-prompt message lists split at their common messages).
A row that fits none gets a reason instead; the reason goes to quarantine.jsonl with the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")

Messages = list[dict[str, str]]
Part = Union[str, Messages]


@dataclass(frozen=True)
class Pair:
    """A normalized pair; ``kind`` is 'text' (strings) or 'chat' (message lists)."""

    prompt: Part
    chosen: Part
    rejected: Part
    kind: str


class Bad(Exception):
    """A row that cannot be used; ``str(self)`` is the quarantine reason ('kind: detail')."""


def messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise Bad(f"wrong_type: {name} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Bad(f"bad_message: {name}[{i}] must be an object with role and content")
        if m["role"] not in ROLES:
            raise Bad(f"unknown_role: {name}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise Bad(f"wrong_type: {name}[{i}].content is {type(m['content']).__name__}, expected str")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def common_prefix_chars(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings.

    Binary search over slice comparisons (memcmp speed): a per-character Python loop over two
    dialogues of ~1,000 characters cost more than a tenth of all tokenization time.
    """
    lo, hi = 0, min(len(a), len(b))  # invariant: a[:lo] == b[:lo]; the answer is <= hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_text(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    """Implicit prompt of two whole dialogues: their common prefix cut back to the end of the last
    ``marker`` inside it. A plain character-level prefix would cut inside the responses whenever
    both begin with the same words; ``chosen.rfind(marker)`` alone breaks on responses that quote
    the marker. ``prompt + response`` rebuilds each string exactly."""
    n = common_prefix_chars(chosen, rejected)
    cut = chosen.rfind(marker, 0, n)
    # The marker must lie wholly inside the common prefix.
    while cut >= 0 and cut + len(marker) > n:
        cut = chosen.rfind(marker, 0, cut)
    if cut < 0:
        raise Bad(f"no_prompt: no {marker!r} inside the common prefix of chosen and rejected")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def split_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Implicit prompt of two message lists: their common messages, cut back to the start of the last
    assistant turn (the completions must start with the assistant)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant":
        k -= 1
    if k == 0:
        raise Bad("no_prompt: chosen and rejected share no prompt messages")
    for name, rest in (("chosen", chosen[k:]), ("rejected", rejected[k:])):
        if any(m["role"] != "assistant" for m in rest):
            raise Bad(f"bad_message: the {name} completion holds a non-assistant turn (the pair diverges before its last assistant turn)")
    return chosen[:k], chosen[k:], rejected[k:]


def completion_messages(value: Any, name: str) -> Messages:
    msgs = messages(value, name)
    if msgs[0]["role"] != "assistant":
        raise Bad(f"bad_message: {name} must start with an assistant message, got {msgs[0]['role']!r}")
    return msgs


def _detect(row: dict) -> str:
    if "prompt" not in row:
        return "implicit"
    return "conversational" if isinstance(row["prompt"], list) else "standard"


def normalize(row: dict, fmt: str = "auto", marker: str = "\n\nAssistant:") -> Pair:
    """A parsed JSON object (already column-mapped) -> Pair, or raise Bad."""
    fmt = _detect(row) if fmt == "auto" else fmt
    if "completion" in row and "label" in row and "chosen" not in row:
        raise Bad("unpaired_row: a {prompt, completion, label} row; unpaired data trains with loss.type: kto")
    needed = ("chosen", "rejected") if fmt == "implicit" else FIELDS
    for name in needed:
        if name not in row or row[name] is None:
            raise Bad(f"missing_field: {name}")
    if fmt == "standard":
        for name in FIELDS:
            if not isinstance(row[name], str):
                raise Bad(f"wrong_type: {name} is {type(row[name]).__name__}, expected str")
        pair = Pair(row["prompt"], row["chosen"], row["rejected"], "text")
    elif fmt == "conversational":
        pair = Pair(messages(row["prompt"], "prompt"), completion_messages(row["chosen"], "chosen"),
                    completion_messages(row["rejected"], "rejected"), "chat")
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        if row["chosen"] == row["rejected"]:
            raise Bad("identical_completions")
        pair = Pair(*split_text(row["chosen"], row["rejected"], marker), "text")
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        c, r = messages(row["chosen"], "chosen"), messages(row["rejected"], "rejected")
        if c == r:
            raise Bad("identical_completions")
        pair = Pair(*split_messages(c, r), "chat")
    else:
        raise Bad("wrong_type: chosen and rejected must both be strings or both be message lists")
    _check_completions(pair)
    return pair


def text_of(part: Part) -> str:
    return part if isinstance(part, str) else "".join(m["content"] for m in part)


def _check_completions(pair: Pair) -> None:
    for name in ("chosen", "rejected"):
        if not text_of(getattr(pair, name)).strip():
            raise Bad(f"empty_completion: {name}")
    if pair.chosen == pair.rejected:
        raise Bad("identical_completions")


def decode_row(raw: bytes, columns: dict[str, str] | None = None) -> tuple[dict | None, str | None]:
    """raw JSON bytes -> (the row as a dict with ``columns`` renamed to raydpo's names, None) or
    (None, reason)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"undecodable_bytes: {e.reason} at byte {e.start}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid_json: {e.msg} at column {e.colno}"
    if not isinstance(row, dict):
        return None, f"not_an_object: got {type(row).__name__}"
    if columns:
        # One pass from the original row, so swaps like {chosen: rejected, rejected: chosen} work.
        renamed = {ours: row[theirs] for ours, theirs in columns.items() if theirs in row}
        row = {k: v for k, v in row.items() if k not in columns.values()} | renamed
    return row, None


def parse_row(raw: bytes, columns: dict[str, str] | None = None, fmt: str = "auto",
              marker: str = "\n\nAssistant:") -> tuple[Pair | None, str | None]:
    """raw JSON bytes -> (Pair, None) or (None, reason)."""
    row, reason = decode_row(raw, columns)
    if row is None:
        return None, reason
    try:
        return normalize(row, fmt, marker), None
    except Bad as e:
        return None, str(e)
