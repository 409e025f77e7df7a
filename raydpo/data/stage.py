"""The data stage on Ray Data: read, validate, tokenize, split, account for every row.

read_preferences -> map_batches(Preprocess) on an actor pool (one tokenizer per actor, one
batched tokenizer call per batch) -> a materialized table where every input row is ``ok``,
``quarantined`` (bad input, with its reason) or ``filtered`` (valid but unusable, e.g. the prompt
alone exceeds max_length). Counts always add up: read = used + quarantined + filtered.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from raydpo.data.tokenize import TokenizeSettings, pair_id, token_digest, tokenize_pairs
from raydpo.data.validate import parse_row

IDS = pa.list_(pa.int32())
OUT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source", pa.string()),
        ("index", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.binary()),
        ("prompt_ids", IDS),
        ("chosen_ids", IDS),
        ("rejected_ids", IDS),
        ("digest", pa.binary()),
        ("split", pa.string()),
    ]
)
#: Columns of a kept pair, as the reference and train stages consume them.
PAIR_COLUMNS = ["pair_id", "source", "index", "prompt_ids", "chosen_ids", "rejected_ids", "digest"]


def eval_bucket(pid: str, eval_fraction: float) -> bool:
    """Deterministic content split: the same pair lands in the same split on every run and machine."""
    return int(pid[:8], 16) / 0x1_0000_0000 < eval_fraction


class Preprocess:
    """Ray Data callable: raw rows -> validated, tokenized rows with a status (one tokenizer per actor)."""

    def __init__(self, tokenizer_path: str, settings: TokenizeSettings, split: str, eval_fraction: float = 0.0):
        from raydpo.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.settings = settings
        self.split = split
        self.eval_fraction = eval_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = {name: batch.column(name).to_pylist() for name in ("source", "index", "raw")}
        parsed = [parse_row(raw) for raw in rows["raw"]]
        good = [i for i, (triple, _) in enumerate(parsed) if triple is not None]
        tokens = tokenize_pairs(
            self.tokenizer,
            [parsed[i][0][0] for i in good],
            [parsed[i][0][1] for i in good],
            [parsed[i][0][2] for i in good],
            self.settings,
        ) if good else []
        tokenized = dict(zip(good, tokens))
        out = {name: [] for name in OUT_SCHEMA.names}
        for i, (triple, reason) in enumerate(parsed):
            tok = tokenized.get(i)
            if triple is None:
                status, pid = "quarantined", ""
            else:
                pid = pair_id(*triple)
                status, reason = ("filtered", tok["filtered"]) if tok["filtered"] else ("ok", "")
            ok = status == "ok"
            split = self.split
            if ok and self.split == "train" and self.eval_fraction > 0 and eval_bucket(pid, self.eval_fraction):
                split = "eval"
            ids = (tok["prompt_ids"], tok["chosen_ids"], tok["rejected_ids"]) if ok else ([], [], [])
            values = {
                "pair_id": pid,
                "source": rows["source"][i],
                "index": rows["index"][i],
                "status": status,
                "reason": reason or "",
                "raw": b"" if ok else rows["raw"][i],
                "prompt_ids": ids[0],
                "chosen_ids": ids[1],
                "rejected_ids": ids[2],
                "digest": token_digest(*ids) if ok else b"",
                "split": split,
            }
            for name, value in values.items():
                out[name].append(value)
        return pa.table(out, schema=OUT_SCHEMA)


def where(ds, column: str, value: str):
    """Rows of ``ds`` whose ``column`` equals ``value`` (vectorized, keeps order)."""
    return ds.map_batches(lambda t: t.filter(pc.equal(t[column], value)), batch_format="pyarrow", zero_copy_batch=True)


@dataclass
class DataSummary:
    """What happened to every row read; ``read == used + quarantined + filtered``."""

    read: int = 0
    used: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        q, f, u = sum(self.quarantined.values()), sum(self.filtered.values()), sum(self.used.values())
        return {
            "rows_read": self.read,
            "rows_used": u,
            "rows_used_by_split": dict(self.used),
            "rows_quarantined": q,
            "quarantined_by_reason": dict(self.quarantined),
            "rows_filtered": f,
            "filtered_by_reason": dict(self.filtered),
            "counts_add_up": self.read == u + q + f,
        }


def reason_kind(reason: str) -> str:
    """'wrong_type: chosen is int, expected str' -> 'wrong_type' (the countable part)."""
    return reason.split(":", 1)[0]


def summarize(processed) -> DataSummary:
    """Count rows by status, split and reason kind in one aggregation pass."""
    summary = DataSummary()
    counts = processed.select_columns(["status", "reason", "split"]).to_pandas()
    summary.read = len(counts)
    for (status, reason, split), n in counts.groupby(["status", "reason", "split"]).size().items():
        if status == "ok":
            summary.used[split] = summary.used.get(split, 0) + int(n)
        else:
            bucket = summary.quarantined if status == "quarantined" else summary.filtered
            kind = reason_kind(reason)
            bucket[kind] = bucket.get(kind, 0) + int(n)
    return summary


def write_quarantine(processed, path: str) -> int:
    """Append every quarantined row (source, position, reason, the row itself) to ``path``."""
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for batch in where(processed, "status", "quarantined").iter_batches(batch_format="pyarrow"):
            for row in batch.select(["source", "index", "reason", "raw"]).to_pylist():
                row["row"] = row.pop("raw").decode("utf-8", errors="backslashreplace")
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    return n


@dataclass
class PreparedData:
    """The data stage's result: kept pairs per split (materialized) and the accounting."""

    train: object
    """``ray.data.Dataset`` of kept training pairs (``PAIR_COLUMNS``)."""
    eval: object | None
    """Kept eval pairs, or None when there is no eval split."""
    n_train: int
    n_eval: int
    summary: DataSummary
    files: list[str]
    """Resolved input files, train then eval: the 'input order' of exports."""
    processed: object
    """Every row read with its status (for exports and statistics)."""
    settings: TokenizeSettings


def tokenize_settings(cfg) -> TokenizeSettings:
    return TokenizeSettings(max_length=cfg.data.max_length)


def _process(paths: list[str], split: str, cfg, num_actors: int):
    import ray.data

    from raydpo.data.sources import read_preferences

    return read_preferences(paths).map_batches(
        Preprocess,
        fn_constructor_kwargs={
            "tokenizer_path": cfg.model.name_or_path,
            "settings": tokenize_settings(cfg),
            "split": split,
            "eval_fraction": cfg.data.eval_fraction if not cfg.data.eval else 0.0,
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=cfg.data.tokenize_batch_size,
        batch_format="pyarrow",
    )


def prepare(cfg, quarantine_path: str) -> PreparedData:
    """Read, validate and tokenize ``data.train`` (and ``data.eval``); write the quarantine file.

    Raises ValueError when the quarantined fraction exceeds ``data.max_bad_fraction`` (after the
    quarantine file is written, so the user can see why) or when no training pair is left.
    """
    from raydpo.data.sources import resolve_paths

    if not cfg.data.train:
        raise ValueError("data.train is empty: give at least one preference data file")
    train_files = resolve_paths(cfg.data.train)
    eval_files = resolve_paths(cfg.data.eval) if cfg.data.eval else []
    ds = _process(train_files, "train", cfg, cfg.data.num_workers)
    if eval_files:
        ds = ds.union(_process(eval_files, "eval", cfg, cfg.data.num_workers))
    processed = ds.materialize()
    summary = summarize(processed)
    write_quarantine(processed, quarantine_path)
    bad = sum(summary.quarantined.values())
    if summary.read and bad / summary.read > cfg.data.max_bad_fraction:
        raise ValueError(
            f"{bad} of {summary.read} rows ({bad / summary.read:.2%}) are malformed, more than "
            f"data.max_bad_fraction={cfg.data.max_bad_fraction}; see {quarantine_path} for each row and its reason"
        )
    kept = where(processed, "status", "ok")
    train = where(kept, "split", "train").select_columns(PAIR_COLUMNS).materialize()
    n_train = summary.used.get("train", 0)
    if n_train == 0:
        raise ValueError(f"no usable training pair in {summary.read} rows read; see {quarantine_path}")
    n_eval = summary.used.get("eval", 0)
    evals = where(kept, "split", "eval").select_columns(PAIR_COLUMNS).materialize() if n_eval else None
    return PreparedData(train, evals, n_train, n_eval, summary, train_files + eval_files, processed, tokenize_settings(cfg))
