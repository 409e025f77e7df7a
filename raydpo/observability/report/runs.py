"""Reading run directories for reports: config.yaml, summary.json and metrics.jsonl, and labels
that tell runs apart by what differs in their configs (a beta sweep reads ``loss.beta=0.05``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import yaml

from raydpo import storage
from raydpo.config.schema import flatten
from raydpo.train.resume import RESUMABLE_CHANGES


def computes_the_same(key: str) -> bool:
    """Whether a dotted config key only says where or how a run ran or was watched, not what it
    computed (the keys a resumed run may change, plus where it writes): left out of comparisons."""
    section, _, name = key.partition(".")
    allowed = RESUMABLE_CHANGES.get(section, set())
    return allowed is None or name in allowed or section == "output" or key == "reference.cache_dir"


@dataclass
class Run:
    """One run directory's record."""

    path: str
    """The run directory (absolute)."""
    config: dict = field(default_factory=dict)
    """config.yaml (the resolved config), {} if absent."""
    summary: dict = field(default_factory=dict)
    """summary.json, {} if absent (a run still going, or one that failed before its end)."""
    train: list[dict] = field(default_factory=list)
    """metrics.jsonl's training rows (those with ``loss``), in step order."""
    eval: list[dict] = field(default_factory=list)
    """metrics.jsonl's evaluation rows (``eval/*``), in step order."""
    rounds: list[dict] = field(default_factory=list)
    """Online runs: metrics.jsonl's per-round rows (``kind`` ``round``, and ``final``), in round order."""
    notes: list[str] = field(default_factory=list)
    """What is missing or odd, said in the report."""
    label: str = ""
    """Short name in legends and table headers (set by :func:`label_runs`)."""


def _read_jsonl(text: str, notes: list[str]) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            notes.append(f"metrics.jsonl line {i} is not JSON (a run killed mid-write?); skipped")
    return rows


def _read(path: str) -> str | None:
    try:
        return storage.read_text(path)
    except FileNotFoundError:
        return None


def load_run(path: str) -> Run:
    """Read a run directory (a local path or URI). Raises FileNotFoundError when it holds none of
    raydpo's run files."""
    path = storage.normalize(path)
    names = {"config": "config.yaml", "summary": "summary.json", "metrics": "metrics.jsonl"}
    texts = {k: _read(storage.join(path, v)) for k, v in names.items()}
    if all(t is None for t in texts.values()):
        raise FileNotFoundError(f"{path} is not a raydpo run directory: it has none of {', '.join(names.values())}")
    run = Run(path)
    if texts["config"] is not None:
        run.config = yaml.safe_load(texts["config"]) or {}
    if texts["summary"] is not None:
        run.summary = json.loads(texts["summary"])
        if not run.summary.get("finished") and "steps" not in run.summary:
            run.notes.append("summary.json is from a data or reference stage only (validate-data / precompute), or the run has not finished")
    else:
        run.notes.append("no summary.json: the run has not finished (or failed); plots show what metrics.jsonl holds so far")
    if texts["metrics"] is not None:
        rows = _read_jsonl(texts["metrics"], run.notes)
        run.train = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
        run.eval = sorted((r for r in rows if "eval/loss" in r), key=lambda r: r["step"])
        run.rounds = sorted((r for r in rows if r.get("kind") in ("round", "final")), key=lambda r: r["round"])
    else:
        run.notes.append("no metrics.jsonl: no training in this directory")
    return run


def config_differences(runs: list[Run]) -> dict[str, list]:
    """Dotted config keys whose values differ between runs -> each run's value (keys that do not
    change the numbers left out, see :func:`computes_the_same`)."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return {k: [f.get(k) for f in flat] for k in keys
            if not computes_the_same(k) and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1}


def label_runs(runs: list[Run], max_keys: int = 3) -> None:
    """Name each run by its directory (with parents where names clash) plus up to ``max_keys``
    differing config values."""
    depth = 1
    while depth < 6:
        names = [os.sep.join(r.path.rstrip(os.sep).split(os.sep)[-depth:]) for r in runs]
        if len(set(names)) == len(names):
            break
        depth += 1
    # Keys every run's config has (an older raydpo wrote fewer), the numbers-changing sections first.
    order = ("loss.", "train.", "model.", "reference.", "data.")
    flat = [flatten(r.config) for r in runs]
    diffs = {k: v for k, v in config_differences(runs).items() if all(k in f for f in flat)}
    keys = sorted(diffs, key=lambda k: next((i for i, p in enumerate(order) if k.startswith(p)), len(order)))
    for i, (run, name) in enumerate(zip(runs, names)):
        shown = [f"{k}={diffs[k][i]}" for k in keys[:max_keys]]
        run.label = name + (f" ({', '.join(shown)})" if shown and len(runs) > 1 else "")
