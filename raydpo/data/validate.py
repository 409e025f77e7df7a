"""Parse and validate raw preference rows (pure functions).

A row either becomes a normalized ``(prompt, chosen, rejected)`` triple or gets a reason; the
reason goes to quarantine.jsonl with the row, so no row is ever dropped without a word.
"""

from __future__ import annotations

import json

FIELDS = ("prompt", "chosen", "rejected")


def parse_row(raw: bytes) -> tuple[tuple[str, str, str] | None, str | None]:
    """raw JSON bytes -> ((prompt, chosen, rejected), None) or (None, reason)."""
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
    for name in FIELDS:
        if name not in row:
            return None, f"missing_field: {name}"
        if not isinstance(row[name], str):
            return None, f"wrong_type: {name} is {type(row[name]).__name__}, expected str"
    prompt, chosen, rejected = (row[name] for name in FIELDS)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            return None, f"empty_completion: {name}"
    if chosen == rejected:
        return None, "identical_completions"
    return (prompt, chosen, rejected), None
