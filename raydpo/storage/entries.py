"""Content-addressed cache entries that several writers may fill at once, on any storage.

Layout under a cache root (a local path, NFS or an object-store URI)::

    <key>/manifest.json          the published entry: written last, in one atomic step
    <key>/<writer>/...           one writer's shard files, under its own prefix (w-<time>-<random>)

Rules that keep concurrent writers and readers safe where there is no rename (S3):

- a writer writes only under its own prefix; a shard file appears whole or not at all;
- an entry exists once its manifest does; the first complete manifest wins (on an object store a
  writer racing in the same instant may overwrite it with its own, equally complete one);
- a writer whose manifest lost removes its own files that the winner does not list; nobody else
  removes anything but ``raydpo cache prune``, which leaves files younger than an hour alone;
- readers trust only what a published manifest lists, checked by size and sha256; a read error is
  retried and then reported, and never leads to a deletion.

The manifest lists each shard as ``{file, rows, bytes, sha256}`` with ``file`` relative to the entry.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from raydpo.storage import uri

MANIFEST = "manifest.json"
#: Writers' files younger than this are left alone by ``raydpo cache prune`` unless told otherwise:
#: they may belong to a run still writing.
MIN_AGE_S = 3600.0


def new_writer() -> str:
    """A writer's own prefix name: unique across processes and hosts, ordered by start time."""
    return f"w-{int(time.time())}-{uuid.uuid4().hex[:12]}"


def entry_path(root: str, key: str) -> str:
    return uri.join(root, key)


def writer_path(root: str, key: str, writer: str) -> str:
    return uri.join(root, key, writer)


def read_manifest(root: str, key: str) -> dict | None:
    """The published manifest of ``key``, or None when there is none (retried; an unreadable one raises)."""
    try:
        data = uri.read_bytes(uri.join(root, key, MANIFEST))
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as e:  # written in one atomic step, so this is not a write cut short
        raise ValueError(f"{uri.join(root, key, MANIFEST)} is not a raydpo manifest: {e}") from None


def shard_record(relative: str, data: bytes, rows: int) -> dict:
    """The manifest's line for a shard whose bytes are ``data``."""
    return {"file": relative, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def publish(root: str, key: str, manifest: dict, replacing: dict | None = None) -> tuple[dict, bool]:
    """Publish ``manifest`` unless another writer's is there first; returns (the published manifest,
    whether it is this one). ``replacing``: a damaged manifest this one supersedes (a rebuild): it
    is overwritten if it is still the published one."""
    path = uri.join(root, key, MANIFEST)
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if replacing is not None:
        current = read_manifest(root, key)
        if current is None or _same(current, replacing):
            uri.write_bytes(path, data)
            return manifest, True
    elif uri.create_exclusive(path, data):
        return manifest, True
    won = read_manifest(root, key)
    if won is None:  # the winner's manifest vanished (a prune): publish this one after all
        return publish(root, key, manifest)
    return won, _same(won, manifest)


def _same(a: dict, b: dict) -> bool:
    return (a.get("writer"), a.get("created")) == (b.get("writer"), b.get("created"))


def discard_unlisted(root: str, key: str, writer: str, manifest: dict) -> int:
    """Remove this writer's files that ``manifest`` does not list (a writer that lost the race);
    returns how many. Only ever called by the writer itself, on its own prefix."""
    listed = {s["file"] for s in manifest.get("shards", [])}
    removed = 0
    for e in uri.listing(writer_path(root, key, writer), recursive=True):
        if not e.is_dir and f"{writer}/{e.relative}" not in listed:
            uri.delete_file(e.path)
            removed += 1
    return removed


def problems(root: str, key: str, manifest: dict, checksums: bool = True) -> list[str]:
    """What is wrong with a published entry's shards: missing, wrong size or altered (sha256).
    Transient read errors are retried, then raised (never reported as damage)."""
    found = {e.relative: e for e in uri.listing(entry_path(root, key), recursive=True) if not e.is_dir}
    out = []
    for shard in manifest.get("shards", []):
        e = found.get(shard["file"])
        if e is None:
            out.append(f"{shard['file']}: missing")
        elif e.size != shard["bytes"]:
            out.append(f"{shard['file']}: {e.size} bytes, expected {shard['bytes']}")
        elif checksums and uri.sha256_of(e.path) != shard["sha256"]:
            out.append(f"{shard['file']}: contents changed (sha256 mismatch)")
    return out


def read_shard(root: str, key: str, shard: dict) -> bytes:
    """A listed shard's bytes, checked against the manifest (ValueError naming it when they differ)."""
    path = uri.join(root, key, shard["file"])
    data = uri.read_bytes(path)
    if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise ValueError(f"{path}: {len(data)} bytes that do not match the manifest (damaged)")
    return data


def list_entries(root: str) -> list[dict]:
    """One row per key under ``root``, newest first: ``complete`` (published), ``partial`` (only
    writers' files, no manifest yet) or ``stale`` (another format of raydpo's). Each row has
    ``key``, ``status``, ``path``, ``bytes``, ``created``, ``modified``, ``n_files``, ``unlisted`` (bytes of
    files no manifest lists: a losing or interrupted writer's) and the manifest when complete."""
    by_key: dict[str, list] = {}
    for e in uri.listing(root, recursive=True):
        if not e.is_dir:
            key, _, rest = e.relative.partition("/")
            if rest:
                by_key.setdefault(key, []).append((rest, e))
    out = []
    for key, files in by_key.items():
        manifest = None
        if any(rest == MANIFEST for rest, _ in files):
            try:
                manifest = read_manifest(root, key)
            except ValueError:
                manifest = {}
        listed = {s["file"] for s in (manifest or {}).get("shards", [])}
        status = "partial" if manifest is None else "complete" if manifest.get("writer") else "stale"
        newest = max(e.mtime for _, e in files)
        out.append({
            "key": key, "status": status, "path": entry_path(root, key), "bytes": sum(e.size for _, e in files),
            "created": (manifest or {}).get("created", newest), "modified": newest, "n_files": len(files),
            "unlisted": sum(e.size for rest, e in files if rest != MANIFEST and rest not in listed),
            "manifest": manifest,
        })
    return sorted(out, key=lambda r: -r["created"])


def prune(root: str, keys: list[str] | None = None, older_than_days: float | None = None,
          keep_last: int | None = None, min_age_s: float = MIN_AGE_S, dry_run: bool = False) -> list[dict]:
    """Remove whole entries: those named in ``keys``, those created longer ago than
    ``older_than_days``, all but the newest ``keep_last`` complete ones; with no rule, only the
    unfinished: partial and stale entries, and the unlisted files of complete ones. Anything with a
    file modified in the last ``min_age_s`` seconds is skipped (a writer may be at work). A complete
    entry loses its manifest first, so no reader trusts it while its shards go. Returns what was (or
    would be) removed, each row with ``removed``: ``entry`` or ``unlisted``."""
    now = time.time()
    entries = list_entries(root)
    complete = [e for e in entries if e["status"] == "complete"]
    doomed = []
    for e in entries:
        if now - e["modified"] < min_age_s:
            continue
        rules = []
        if keys is not None:
            rules.append(e["key"] in keys)
        if older_than_days is not None:
            rules.append(now - e["created"] > older_than_days * 86400)
        if keep_last is not None:
            rules.append(e["status"] != "complete" or complete.index(e) >= keep_last)
        if any(rules) if rules else e["status"] != "complete":
            doomed.append(e | {"removed": "entry"})
        elif not rules and e["unlisted"]:
            doomed.append(e | {"removed": "unlisted", "bytes": e["unlisted"]})
    for e in doomed if not dry_run else ():
        if e["removed"] == "entry":
            uri.delete_file(uri.join(e["path"], MANIFEST))
            uri.delete_dir(e["path"])
        else:
            _remove_unlisted(root, e["key"], e["manifest"])
    return doomed


def _remove_unlisted(root: str, key: str, manifest: dict) -> None:
    listed = {s["file"] for s in manifest.get("shards", [])} | {MANIFEST}
    for e in uri.listing(entry_path(root, key), recursive=True):
        if not e.is_dir and e.relative not in listed:
            uri.delete_file(e.path)
