"""Passes over the data stage's row table (every row read, with its status and reason) as Ray tasks
where the blocks are (:mod:`raydpo.data.blocks`): the kept rows of a split, duplicates in input
order, the first quarantine reason of a kind, the quarantine file. The driver holds block refs and
the passes' small results, never rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from raydpo.data.blocks import map_blocks, reduce_blocks
from raydpo.data.summary import reason_kind
from raydpo.data.unpaired import example_order


def rows_with(t: pa.Table, status: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The rows of block ``t`` with ``status`` (and ``split``), ``columns`` only when given."""
    mask = pc.equal(t["status"], status)
    if split is not None:
        mask = pc.and_(mask, pc.equal(t["split"], split))
    t = t.filter(mask)
    return t.select(columns) if columns else t


def pick(processed, status: str, split: str | None = None, columns: list[str] | None = None):
    """The rows of a materialized dataset with ``status`` (and ``split``), as a materialized dataset
    (filtered by a task per block, where the block is: :mod:`raydpo.data.blocks`)."""
    return map_blocks(rows_with, processed, status, split, columns)


def input_order(tables, files: list[str]) -> list[tuple[str, str, int, bytes, int]]:
    """(pair_id, source, index, digest, part) of the kept pairs or examples of ``tables`` (blocks of
    every row read) sorted by input source order, then position (a split pair's halves as
    :func:`raydpo.data.unpaired.example_order` orders them). Runs in a task (O(pairs))."""
    rank = {f: i for i, f in enumerate(files)}
    rows = []
    names = ("pair_id", "source", "index", "digest", "part")
    for table in tables:
        batch = rows_with(table, "ok", columns=list(names))
        rows.extend(zip(*(batch[c].to_pylist() for c in names)))
    return sorted(rows, key=lambda r: example_order(rank.get(r[1], len(rank)), r[1], r[2], r[4]))


DUPLICATE = "duplicate"


def duplicates(tables, files: list[str]) -> set[tuple[str, int, int]]:
    """(source, index, part) of every kept pair whose content appeared earlier in input order."""
    seen, dups = set(), set()
    for pid, src, idx, _, part in input_order(tables, files):
        if pid in seen:
            dups.add((src, idx, part))
        seen.add(pid)
    return dups


def _relabel(t: pa.Table, dups: set) -> pa.Table:
    keys = zip(t["status"].to_pylist(), t["source"].to_pylist(), t["index"].to_pylist(), t["part"].to_pylist())
    mask = pa.array([st == "ok" and (s, i, part) in dups for st, s, i, part in keys], pa.bool_())
    status = pc.if_else(mask, pa.scalar("filtered"), t["status"])
    reason = pc.if_else(mask, pa.scalar(DUPLICATE), t["reason"])
    return t.set_column(t.schema.get_field_index("status"), "status", status).set_column(
        t.schema.get_field_index("reason"), "reason", reason)


def mark_duplicates(processed, files: list[str]):
    """Re-label every kept pair whose content appeared earlier in input order as filtered 'duplicate'
    (found by one task reading the blocks in turn, re-labelled by a task per block)."""
    import ray

    dups = reduce_blocks(duplicates, processed, files)
    return map_blocks(_relabel, processed, ray.put(dups)) if dups else processed


def _first_reason(tables, kind: str) -> str:
    for block in tables:
        for reason in rows_with(block, "quarantined", columns=["reason"])["reason"].to_pylist():
            if reason_kind(reason) == kind:
                return reason
    return kind


def first_reason(processed, kind: str) -> str:
    """The full text of the first quarantine reason of ``kind`` (e.g. the whole ``paired_row: ...`` advice)."""
    return reduce_blocks(_first_reason, processed, kind)


def _write_quarantine(tables, path: str) -> int:
    from raydpo import storage

    lines = []
    for block in tables:
        for row in rows_with(block, "quarantined", columns=["source", "index", "reason", "raw"]).to_pylist():
            row["row"] = row.pop("raw").decode("utf-8", errors="backslashreplace")
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    storage.write_text(path, "".join(lines))
    return len(lines)


def write_quarantine(processed, path: str) -> int:
    """Write every quarantined row (source, position, reason, the row itself) to ``path`` (a local
    path or URI, written whole in one step), from a task on the driver's node (a local path is the
    driver's disk); returns the rows written."""
    return reduce_blocks(_write_quarantine, processed, path, on_driver_node=True)


def status_counts(table: pa.Table) -> dict[str, int]:
    found = pc.value_counts(table["status"])
    return dict(zip(found.field("values").to_pylist(), found.field("counts").to_pylist()))
