"""Cache entries on disk: shards written as scored, resumable, verified, listed and pruned.

Layout under ``reference.cache_dir``::

    <key>.partial/data/shard-<id>.parquet   scored batches, each renamed into place when complete
    <key>/manifest.json                     key inputs, shards (rows, bytes, sha256), totals
    <key>/data/shard-<id>.parquet           the finished entry (the .partial directory renamed)

A shard's name is a hash of the rows it holds, so a batch retried after its actor died rewrites the
same file: never a duplicated pair. A run that stops midway leaves ``<key>.partial``; the next run
with the same key scores only the pairs no shard holds yet. An entry whose shard is missing, cut
short or altered (sha256 mismatch) is reopened as partial without that shard and completed again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 3
MANIFEST = "manifest.json"


def entry_dir(cache_dir: str, key: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), key)


def partial_dir(cache_dir: str, key: str) -> str:
    return entry_dir(cache_dir, key) + ".partial"


def shard_name(table: pa.Table) -> str:
    """A content address for a scored batch: the same rows give the same file name."""
    h = hashlib.blake2b(digest_size=12)
    for pid, digest in zip(table["pair_id"].to_pylist(), table["digest"].to_pylist()):
        h.update(pid.encode() + b"\0" + digest)
    return f"shard-{h.hexdigest()}.parquet"


def write_shard(data_dir: str, table: pa.Table) -> str:
    """Write ``table`` as one parquet shard, atomically (a reader sees all of it or nothing)."""
    os.makedirs(data_dir, exist_ok=True)
    final = os.path.join(data_dir, shard_name(table))
    tmp = os.path.join(data_dir, f".{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _shards(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        return []
    return sorted(f for f in os.listdir(data_dir) if f.startswith("shard-") and f.endswith(".parquet"))


def open_partial(cache_dir: str, key: str) -> tuple[str, collections.Counter, int]:
    """The partial directory for ``key`` (created if needed), the digests its readable shards already
    hold (a multiset: duplicate pairs count) and how many unreadable shards were dropped."""
    data = os.path.join(partial_dir(cache_dir, key), "data")
    os.makedirs(data, exist_ok=True)
    done: collections.Counter = collections.Counter()
    dropped = 0
    for name in os.listdir(data):
        path = os.path.join(data, name)
        if name.endswith(".tmp"):  # a write cut short by a crash
            os.remove(path)
            continue
        try:
            done.update(pq.read_table(path, columns=["digest"])["digest"].to_pylist())
        except (OSError, pa.ArrowException):
            os.remove(path)  # cut short or damaged: its pairs are scored again
            dropped += 1
    return partial_dir(cache_dir, key), done, dropped


def remaining(table: pa.Table, done: collections.Counter) -> pa.Table:
    """The rows of ``table`` whose digest ``done`` does not cover yet (consumes ``done``)."""
    keep = []
    for d in table["digest"].to_pylist():
        if done[d] > 0:
            done[d] -= 1
            keep.append(False)
        else:
            keep.append(True)
    return table.filter(pa.array(keep, pa.bool_()))


def finalize(cache_dir: str, key: str, inputs: dict, expected: collections.Counter, paths: dict | None = None) -> str:
    """Seal the partial entry: check that its shards hold exactly the ``expected`` digests, write the
    manifest and rename it into place. Returns the entry directory (another run's copy if it won)."""
    part, final = partial_dir(cache_dir, key), entry_dir(cache_dir, key)
    data = os.path.join(part, "data")
    got: collections.Counter = collections.Counter()
    shards = []
    for name in _shards(data):
        path = os.path.join(data, name)
        table = pq.read_table(path, columns=["digest"])
        got.update(table["digest"].to_pylist())
        shards.append({"file": name, "rows": table.num_rows, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
    if got != expected:
        missing, extra = sum((expected - got).values()), sum((got - expected).values())
        raise ValueError(f"reference cache {part}: the shards hold {missing} pairs too few and {extra} too many; "
                         "was another run scoring the same pairs? Remove that directory and run again")
    manifest = {"key": key, "format": FORMAT_VERSION, "created": time.time(), "inputs": inputs,
                "paths": paths or {}, "rows": sum(got.values()), "shards": shards}
    with open(os.path.join(part, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(os.path.join(part, MANIFEST + ".tmp"), os.path.join(part, MANIFEST))
    try:
        os.rename(part, final)
    except OSError:
        if not os.path.exists(os.path.join(final, MANIFEST)):
            raise
        shutil.rmtree(part)
    return final


def read_manifest(entry: str) -> dict:
    with open(os.path.join(entry, MANIFEST)) as f:
        return json.load(f)


def problems(entry: str, checksums: bool = True) -> list[str]:
    """What is wrong with a finished entry's shards: missing, wrong size, altered, or unlisted."""
    manifest = read_manifest(entry)
    data = os.path.join(entry, "data")
    found = []
    for shard in manifest.get("shards", []):
        path = os.path.join(data, shard["file"])
        if not os.path.exists(path):
            found.append(f"{shard['file']}: missing")
        elif os.path.getsize(path) != shard["bytes"]:
            found.append(f"{shard['file']}: {os.path.getsize(path)} bytes, expected {shard['bytes']}")
        elif checksums and sha256_file(path) != shard["sha256"]:
            found.append(f"{shard['file']}: contents changed (sha256 mismatch)")
    listed = {s["file"] for s in manifest.get("shards", [])}
    found += [f"{name}: not in the manifest" for name in _shards(data) if name not in listed]
    return found


def lookup(cache_dir: str, key: str) -> tuple[str | None, list[str]]:
    """(entry, []) for a sound finished entry; (None, problems) otherwise.

    A finished entry with damaged shards is reopened: it becomes ``<key>.partial`` without the bad
    shards, so the next scoring run redoes only their pairs.
    """
    entry = entry_dir(cache_dir, key)
    if not os.path.exists(os.path.join(entry, MANIFEST)):
        return None, []
    try:
        bad = problems(entry)
        manifest = read_manifest(entry)
    except (OSError, ValueError, KeyError) as e:
        bad, manifest = [f"{MANIFEST}: unreadable ({e})"], {}
    if not bad and manifest.get("format") == FORMAT_VERSION:
        return entry, []
    if manifest.get("format") not in (None, FORMAT_VERSION):
        bad.append(f"format {manifest.get('format')}, this raydpo writes {FORMAT_VERSION}")
        shutil.rmtree(entry)
        return None, bad
    listed = {s["file"]: s for s in manifest.get("shards", [])}
    part = partial_dir(cache_dir, key)
    os.makedirs(os.path.join(part, "data"), exist_ok=True)
    for name in _shards(os.path.join(entry, "data")):
        shard = listed.get(name)
        path = os.path.join(entry, "data", name)
        if shard and os.path.getsize(path) == shard["bytes"] and sha256_file(path) == shard["sha256"]:
            os.replace(path, os.path.join(part, "data", name))
    shutil.rmtree(entry)
    return None, bad


def list_entries(cache_dir: str) -> list[dict]:
    """One summary per entry (finished or partial), newest first."""
    root = os.path.abspath(os.path.expanduser(cache_dir))
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        row = {"key": name.split(".")[0], "status": "partial" if ".partial" in name else "complete",
               "path": path, "bytes": size, "created": os.path.getmtime(path)}
        if row["status"] == "complete" and os.path.exists(os.path.join(path, MANIFEST)):
            m = read_manifest(path)
            row |= {"created": m.get("created", row["created"]), "pairs": m.get("rows"), "files": m.get("paths", {}).get("files"),
                    "reference": m.get("paths", {}).get("reference"), "dtype": m.get("inputs", {}).get("dtype"),
                    "backend": m.get("inputs", {}).get("backend")}
        elif row["status"] == "complete":
            row["status"] = "stale"  # an old-format or interrupted directory
        out.append(row)
    return sorted(out, key=lambda r: -r["created"])


def prune(cache_dir: str, keys: list[str] | None = None, older_than_days: float | None = None,
          keep_last: int | None = None, dry_run: bool = False) -> list[dict]:
    """Remove entries: those named in ``keys``, those older than ``older_than_days``, all but the
    newest ``keep_last`` complete ones; partial and stale directories go whenever a rule is given
    that they match, or always when no rule is given. Returns what was (or would be) removed."""
    entries = list_entries(cache_dir)
    now = time.time()
    complete = [e for e in entries if e["status"] == "complete"]
    doomed = []
    for e in entries:
        rules = []
        if keys is not None:
            rules.append(e["key"] in keys)
        if older_than_days is not None:
            rules.append(now - e["created"] > older_than_days * 86400)
        if keep_last is not None:
            rules.append(e["status"] != "complete" or complete.index(e) >= keep_last)
        if (any(rules) if rules else e["status"] != "complete"):
            doomed.append(e)
    if not dry_run:
        for e in doomed:
            shutil.rmtree(e["path"], ignore_errors=True)
    return doomed
