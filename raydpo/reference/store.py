"""Reference cache entries: scored batches as shards, resumable, shared by concurrent runs.

The layout, publication, verification, listing and pruning of entries are
:mod:`raydpo.storage.entries`'s. Here is what a reference shard holds and how a run fills an entry:

- every scored batch is one parquet shard under the run's own writer prefix, named by a hash of
  its pairs, so a batch retried after its actor died rewrites the same file: never a duplicate;
- a run first adopts the readable shards that earlier or concurrent writers of the key left (an
  interrupted run's, a damaged entry's sound ones) and scores only the pairs they do not hold;
- sealing checks that the adopted and the run's own shards hold exactly the expected pairs, then
  publishes the manifest; a run that loses the race removes its own unlisted shards.

These steps read shards, so the reference stage runs them as Ray tasks on the cluster
(:func:`raydpo.storage.remote.on_cluster`): the driver reads manifests, never shards.
"""

from __future__ import annotations

import collections
import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydpo.storage import entries, uri

#: 5: the key's tokenizer is its class and pipeline plus its files (4: the files alone); an entry of
#: another format is never a hit.
FORMAT_VERSION = 5
MANIFEST = entries.MANIFEST
LOGP_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]


def shard_name(table: pa.Table) -> str:
    """A content address for a scored batch: the same rows give the same file name."""
    h = hashlib.blake2b(digest_size=12)
    for pid, digest in zip(table["pair_id"].to_pylist(), table["digest"].to_pylist()):
        h.update(pid.encode() + b"\0" + digest)
    return f"shard-{h.hexdigest()}.parquet"


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_shard(writer_dir: str, table: pa.Table) -> str:
    """Write ``table`` as one parquet shard under ``writer_dir``, atomically; returns its location."""
    path = uri.join(writer_dir, shard_name(table))
    uri.write_bytes(path, table_bytes(table))
    return path


def read_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(data), columns=columns)


def scan(root: str, key: str, exclude: tuple = ()) -> tuple[list[tuple[str, list[bytes]]], list[str]]:
    """Every readable shard any writer left under ``key`` (in its ``w-*`` prefix) with its digests, and
    the unreadable ones (named, left in place). ``exclude``: shard files known to be damaged."""
    found, unreadable = [], []
    for e in uri.listing(entries.entry_path(root, key), recursive=True):
        writer, _, name = e.relative.rpartition("/")
        # Only writers' prefixes hold this format's shards: an older format's files are never adopted.
        if (e.is_dir or e.relative in exclude or not writer.startswith("w-")
                or not (name.startswith("shard-") and name.endswith(".parquet"))):
            continue
        try:
            found.append((e.relative, read_table(uri.read_bytes(e.path), ["digest"])["digest"].to_pylist()))
        except (OSError, pa.ArrowException) as err:
            unreadable.append(f"{e.relative}: {err}")
    return found, unreadable


def adopt(scanned: list[tuple[str, list[bytes]]], expected: collections.Counter) -> tuple[list[str], collections.Counter]:
    """The scanned shards a run takes over (each only if every one of its pairs is still needed) and
    the digests they hold (a multiset: duplicate pairs count)."""
    need, done, adopted = collections.Counter(expected), collections.Counter(), []
    for relative, digests in scanned:
        have = collections.Counter(digests)
        if all(need[d] >= n for d, n in have.items()):
            need.subtract(have)
            done.update(have)
            adopted.append(relative)
    return adopted, done


def scan_and_adopt(root: str, key: str, digests: list[bytes], exclude: tuple = ()) -> tuple[list[str], collections.Counter, list[str]]:
    """:func:`scan` then :func:`adopt` against ``digests`` (one task on the cluster): (adopted
    shards, digests they cover, unreadable shards)."""
    scanned, unreadable = scan(root, key, exclude)
    adopted, done = adopt(scanned, collections.Counter(digests))
    return adopted, done, unreadable


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


def finalize(root: str, key: str, writer: str, adopted: list[str], inputs: dict, digests: list[bytes],
             paths: dict | None = None, replacing: dict | None = None) -> dict:
    """Seal an entry: the adopted shards and ``writer``'s own must hold exactly ``digests``; then
    publish the manifest. Returns the published manifest (another writer's if it won; this writer's
    unlisted shards are then removed). ``replacing``: the damaged manifest this one supersedes."""
    published = entries.read_manifest(root, key) if replacing is None else None
    if published is not None:  # another writer finished first: its entry is this run's too
        entries.discard_unlisted(root, key, writer, published)
        return published
    own = [e.relative for e in uri.listing(entries.entry_path(root, key), recursive=True)
           if not e.is_dir and e.relative.startswith(writer + "/") and e.relative.endswith(".parquet")]
    got, shards = collections.Counter(), []
    try:
        for relative in sorted(adopted) + own:
            data = uri.read_bytes(uri.join(root, key, relative))
            table = read_table(data, ["digest"])
            got.update(table["digest"].to_pylist())
            shards.append(entries.shard_record(relative, data, table.num_rows))
    except FileNotFoundError:
        # An adopted shard's writer lost the race meanwhile and removed it: the winner has published.
        published = entries.read_manifest(root, key)
        if published is None or replacing is not None:
            raise
        entries.discard_unlisted(root, key, writer, published)
        return published
    expected = collections.Counter(digests)
    if got != expected:
        missing, extra = sum((expected - got).values()), sum((got - expected).values())
        raise ValueError(f"reference cache {uri.join(root, key)}: writer {writer}'s shards and the {len(adopted)} it "
                         f"adopted hold {missing} pairs too few and {extra} too many; run again (nothing was published)")
    manifest = {"key": key, "format": FORMAT_VERSION, "created": time.time(), "writer": writer, "inputs": inputs,
                "paths": paths or {}, "rows": sum(got.values()), "shards": shards}
    published, mine = entries.publish(root, key, manifest, replacing)
    if not mine:
        entries.discard_unlisted(root, key, writer, published)
    return published


def lookup(root: str, key: str) -> tuple[dict | None, pa.Table | None, list[str], tuple, dict | None]:
    """(manifest, its log-prob columns (:func:`load_logps`), [], (), None) for a sound published entry;
    otherwise (None, None, its problems, the damaged shard files, the damaged manifest) -- all empty
    when there is none. Sizes are checked from one listing, then each shard is read once, checked
    against its sha256 as it is read. Nothing is removed: a rebuild adopts the sound shards and
    publishes a manifest that replaces this one."""
    manifest = entries.read_manifest(root, key)
    if manifest is None:
        return None, None, [], (), None
    if manifest.get("format") != FORMAT_VERSION or not manifest.get("writer"):
        return None, None, [f"format {manifest.get('format')}, this raydpo writes {FORMAT_VERSION}"], (), manifest
    bad = entries.problems(root, key, manifest, checksums=False)
    # Every shard of the right size is still read and checked: a rebuild adopts only sound ones.
    sized = {b.split(":", 1)[0] for b in bad}
    logps, altered = _read_logps(root, key, {**manifest, "shards": [s for s in manifest["shards"] if s["file"] not in sized]})
    bad += altered
    if not bad:
        return manifest, logps, [], (), None
    return None, None, bad, tuple(b.split(":", 1)[0] for b in bad), manifest


def _read_logps(root: str, key: str, manifest: dict) -> tuple[pa.Table, list[str]]:
    """(:func:`load_logps`'s table, the shards that do not match the manifest)."""
    tables, bad = [], []
    for s in manifest["shards"]:
        try:
            tables.append(read_table(entries.read_shard(root, key, s), ["digest", *LOGP_COLUMNS]))
        except FileNotFoundError:
            bad.append(f"{s['file']}: missing")
        except ValueError:
            bad.append(f"{s['file']}: contents changed (sha256 mismatch)")
    return _distinct(tables), bad


def load_logps(root: str, key: str, manifest: dict) -> pa.Table:
    """``digest`` and the log-prob columns of every pair of a published entry, one row per distinct
    digest (pairs with equal token ids have equal log-probs), sorted by digest; each shard checked
    as it is read."""
    table, bad = _read_logps(root, key, manifest)
    if bad:
        raise ValueError(f"reference cache {uri.join(root, key)}: {'; '.join(bad[:3])}; run again to rebuild it")
    return table


#: Token digests are 16 bytes (:func:`raydpo.data.tokenize.token_digest`).
DIGEST = pa.binary(16)


def _distinct(tables: list) -> pa.Table:
    """One row per distinct digest, sorted by digest (fixed-width ``binary(16)``): a join then finds
    each pair's row by binary search (:func:`positions_of`) instead of hashing the whole table again
    for every block it serves. Sorted with numpy on the raw 16-byte keys (a fifth of the time of
    arrow's group-by at a million rows)."""
    if not tables:
        return pa.table({"digest": pa.array([], DIGEST), **{c: pa.array([], pa.float32()) for c in LOGP_COLUMNS}})
    table = pa.concat_tables(tables)
    table = table.set_column(table.schema.get_field_index("digest"), "digest", table["digest"].cast(DIGEST).combine_chunks())
    keys = _fixed(table["digest"])
    order = np.argsort(keys, kind="stable")
    first = np.ones(len(order), bool)
    first[1:] = keys[order[1:]] != keys[order[:-1]]  # equal digests, equal log-probs: keep one
    return table.select(["digest", *LOGP_COLUMNS]).take(order[first]).combine_chunks()


def _fixed(column) -> np.ndarray:
    """A digest column as a numpy ``S16`` array (one copy at most; none for an unchunked fixed-width one)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(DIGEST)
    if not len(arr):  # an empty array may have no data buffer at all
        return np.empty(0, "S16")
    return np.frombuffer(arr.buffers()[1], dtype="S16", count=len(arr), offset=arr.offset * 16)


def positions_of(digests, logps: pa.Table) -> tuple[np.ndarray, int]:
    """(each digest's row in ``logps`` (sorted by digest, :func:`load_logps`), how many are absent).
    ``digests``: a (chunked) binary array, shape (n,); O(n log m) with no table built per call."""
    keys, wanted = _fixed(logps["digest"]), _fixed(digests)
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    missing = len(wanted) if not len(keys) else int((keys[at] != wanted).sum())
    return at, missing


def list_entries(root: str) -> list[dict]:
    """:func:`raydpo.storage.entries.list_entries` with the reference inputs spelled out."""
    out = []
    for e in entries.list_entries(root):
        m = e.pop("manifest") or {}
        out.append(e | {"pairs": m.get("rows"), "files": m.get("paths", {}).get("files"),
                        "reference": m.get("paths", {}).get("reference"), "dtype": m.get("inputs", {}).get("dtype"),
                        "backend": m.get("inputs", {}).get("backend")})
    return out
