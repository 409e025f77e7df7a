"""Cache entries on a local disk and on S3 (moto's server): content-addressed shards, writers under
their own prefixes, publication by manifest (first wins), resume from other writers' shards, damage
detected and rebuilt without deleting anything, concurrent writers in separate processes, transient
network errors retried and reported, list and prune. No Ray needed: these are the storage layer's
own functions (the stages run them as Ray tasks)."""

import collections
import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydpo import storage
from raydpo.cli import main
from raydpo.reference import store
from raydpo.storage import entries


def scored(ids, dup: int | None = None) -> pa.Table:
    rows = list(ids) + ([dup] if dup is not None else [])
    return pa.table({
        "pair_id": [f"p{i}" for i in rows],
        "digest": [i.to_bytes(16, "little") for i in rows],
        "ref_chosen_logps": pa.array([-float(i) for i in rows], pa.float32()),
        "ref_rejected_logps": pa.array([-2.0 * i for i in rows], pa.float32()),
    })


def digests(table: pa.Table) -> list[bytes]:
    return table["digest"].to_pylist()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A cache root on the local disk, or under a fresh prefix of a bucket on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "cache")
    server = request.getfixturevalue("s3_server")
    return f"{server.bucket('store-tests')}/{uuid.uuid4().hex[:8]}/cache"


def fill(root: str, key: str, table: pa.Table, batch: int = 4, adopted=(), replacing=None, everything=None) -> dict:
    """One writer scoring ``table`` in batches of ``batch`` into its own prefix, then finalizing the
    entry of ``everything`` (default ``table``; the rest is in the ``adopted`` shards)."""
    writer = entries.new_writer()
    for i in range(0, table.num_rows, batch):
        store.write_shard(entries.writer_path(root, key, writer), table.slice(i, batch))
    return store.finalize(root, key, writer, list(adopted), {"x": 1}, digests(everything or table), {"reference": "/m"}, replacing)


def test_shards_are_content_addressed_and_atomic(root):
    w = storage.join(root, "k0", "w-1-aaaaaaaaaaaa")
    first = store.write_shard(w, scored(range(4)))
    again = store.write_shard(w, scored(range(4)))  # a retried batch rewrites the same file
    other = store.write_shard(w, scored(range(4, 8)))
    assert first == again != other
    assert [e.relative for e in storage.listing(w)] == sorted(storage.basename(p) for p in (first, other))


def test_a_run_adopts_what_an_interrupted_writer_left(root):
    key, everything = "k1", scored(range(10), dup=3)  # pair 3 twice: both rows count
    dead = entries.new_writer()
    store.write_shard(entries.writer_path(root, key, dead), scored(range(0, 4)))  # killed after one batch
    cut = storage.join(entries.writer_path(root, key, dead), "shard-cut.parquet")
    storage.write_bytes(cut, b"PAR1 cut short")  # damaged: not adopted, and not deleted either
    adopted, done, unreadable = store.scan_and_adopt(root, key, digests(everything))
    assert len(adopted) == 1 and sum(done.values()) == 4 and unreadable[0].startswith(f"{dead}/shard-cut.parquet")
    todo = store.remaining(everything, done)
    assert todo["pair_id"].to_pylist() == ["p4", "p5", "p6", "p7", "p8", "p9", "p3"]
    manifest = fill(root, key, todo, batch=10, adopted=adopted, everything=everything)
    assert manifest["rows"] == 11 and len(manifest["shards"]) == 2
    assert {s["file"].split("/")[0] for s in manifest["shards"]} == {dead, manifest["writer"]}
    hit, logps, *rest = store.lookup(root, key)
    assert hit == manifest and rest == [[], (), None]
    assert storage.exists(cut)
    assert logps.equals(store.load_logps(root, key, manifest))
    assert logps.num_rows == 10 and sorted(logps["ref_chosen_logps"].to_pylist()) == sorted(-float(i) for i in range(10))


def test_finalize_refuses_missing_or_duplicated_pairs(root):
    writer = entries.new_writer()
    store.write_shard(entries.writer_path(root, "k2", writer), scored(range(0, 5)))
    with pytest.raises(ValueError, match="1 pairs too few and 0 too many"):
        store.finalize(root, "k2", writer, [], {}, digests(scored(range(6))))
    store.write_shard(entries.writer_path(root, "k2", writer), scored(range(3, 6)))  # 3 and 4 twice
    with pytest.raises(ValueError, match="0 pairs too few and 2 too many"):
        store.finalize(root, "k2", writer, [], {}, digests(scored(range(6))))
    assert entries.read_manifest(root, "k2") is None  # nothing was published


@pytest.mark.parametrize("damage", ["altered", "truncated", "deleted"])
def test_a_damaged_entry_is_rebuilt_and_nothing_is_deleted(root, damage):
    key, everything = "k3", scored(range(8))
    first = fill(root, key, everything)
    victim = storage.join(root, key, first["shards"][1]["file"])
    data = storage.read_bytes(victim)
    if damage == "altered":  # bit rot: same size, other bytes
        storage.write_bytes(victim, data[: len(data) // 2] + b"\xff" * 8 + data[len(data) // 2 + 8:])
    elif damage == "truncated":
        storage.write_bytes(victim, data[: len(data) // 2])
    else:
        storage.delete_file(victim)
    before = {e.relative for e in storage.listing(storage.join(root, key), recursive=True)}
    manifest, _, problems, bad, damaged = store.lookup(root, key)
    assert manifest is None and len(problems) == 1 and bad == (first["shards"][1]["file"],) and damaged == first
    assert {e.relative for e in storage.listing(storage.join(root, key), recursive=True)} == before  # nothing removed
    adopted, done, _ = store.scan_and_adopt(root, key, digests(everything), bad)
    left = store.remaining(everything, done)
    assert left["pair_id"].to_pylist() == ["p4", "p5", "p6", "p7"]  # only the damaged shard's pairs
    rebuilt = fill(root, key, left, adopted=adopted, replacing=damaged, everything=everything)
    assert store.lookup(root, key)[0] == rebuilt and rebuilt["writer"] != first["writer"]
    if damage != "deleted":
        assert storage.exists(victim)  # unlisted now, for `raydpo cache prune`; never deleted by a reader


def test_an_altered_shard_beside_a_truncated_one_is_not_adopted(root):
    """The size check finds the truncated shard; the altered one (same size) must still be found by
    its sha256, or a rebuild would adopt it and publish wrong log-probs as sound."""
    key, everything = "k6", scored(range(12))
    first = fill(root, key, everything)
    cut, rot = (storage.join(root, key, s["file"]) for s in first["shards"][:2])
    storage.write_bytes(cut, storage.read_bytes(cut)[:50])
    data = storage.read_bytes(rot)
    storage.write_bytes(rot, data[: len(data) // 2] + b"\xff" * 8 + data[len(data) // 2 + 8:])
    manifest, _, problems, bad, _ = store.lookup(root, key)
    assert manifest is None and set(bad) == {first["shards"][0]["file"], first["shards"][1]["file"]}, problems
    adopted, done, _ = store.scan_and_adopt(root, key, digests(everything), bad)
    assert adopted == [first["shards"][2]["file"]] and sum(done.values()) == 4


def test_an_entry_of_an_older_format_is_rebuilt_never_read(root):
    """A format-3 entry (``data/`` shards, no writer prefixes) under the same key: not a hit, none of
    its shards adopted (their log-probs may mean something else), rebuilt in full, nothing deleted."""
    key, everything = "k7", scored(range(6))
    old = scored(range(6)).set_column(2, "ref_chosen_logps", pa.array([0.5] * 6, pa.float32()))
    old_shard = storage.join(root, key, "data", store.shard_name(old))
    storage.write_bytes(old_shard, store.table_bytes(old))
    data = storage.read_bytes(old_shard)
    stale = {"key": key, "format": 3, "created": time.time(), "inputs": {"x": 1}, "rows": 6,
             "shards": [{"file": "data/" + storage.basename(old_shard), "rows": 6, "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()}]}
    storage.write_json(storage.join(root, key, "manifest.json"), stale)
    manifest, logps, problems, _, damaged = store.lookup(root, key)
    assert manifest is None and logps is None and problems == [f"format 3, this raydpo writes {store.FORMAT_VERSION}"]
    assert damaged == stale
    adopted, done, unreadable = store.scan_and_adopt(root, key, digests(everything))
    assert adopted == [] and not done and unreadable == []
    rebuilt = fill(root, key, everything, replacing=damaged)
    hit, logps, *_ = store.lookup(root, key)
    assert hit == rebuilt and sorted(logps["ref_chosen_logps"].to_pylist()) == sorted(-float(i) for i in range(6))
    assert storage.exists(old_shard)  # left for `raydpo cache prune`


def test_an_entry_keyed_on_the_tokenizer_files_alone_is_never_a_hit(root):
    """Format 4 keyed the tokenizer by its files only (issue 39): such an entry, complete and sound,
    is not read even under the new key."""
    everything = scored(range(6))
    published = fill(root, "k8", everything)
    assert store.FORMAT_VERSION == 5 and published["format"] == 5
    storage.write_json(storage.join(root, "k8", "manifest.json"), published | {"format": 4})
    manifest, logps, problems, _, damaged = store.lookup(root, "k8")
    assert manifest is None and logps is None and problems == ["format 4, this raydpo writes 5"] and damaged["format"] == 4


def _race(root: str, key: str, n: int, start_at: float, out) -> None:
    """One of several processes filling the same key at once (after scanning what is there)."""
    everything = scored(range(n))
    while time.time() < start_at:
        time.sleep(0.001)
    adopted, done, _ = store.scan_and_adopt(root, key, digests(everything))
    todo = store.remaining(everything, done)
    manifest = fill(root, key, todo, batch=3, adopted=adopted, everything=everything)
    out.put((manifest["writer"], store.load_logps(root, key, manifest).to_pydict()))


def _collect(out, procs, timeout: float) -> list:
    """One result per process; fails at once (not after ``timeout``) when one of them died."""
    results, deadline = [], time.time() + timeout
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a writer died (exit codes {dead}); its traceback is in the captured stderr"
            assert time.time() < deadline, f"{len(results)} of {len(procs)} writers answered in {timeout} s"
    return results


def test_concurrent_writers_publish_one_entry(root):
    ctx = multiprocessing.get_context("spawn")
    out, start_at = ctx.Queue(), time.time() + 3.0
    procs = [ctx.Process(target=_race, args=(root, "k4", 40, start_at, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = _collect(out, procs, timeout=180)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    published = entries.read_manifest(root, "k4")
    # Every writer ended with the published entry and its log-probs.
    assert {w for w, _ in results} == {published["writer"]}
    assert all(logps == results[0][1] for _, logps in results) and len(results[0][1]["digest"]) == 40
    listed = {s["file"] for s in published["shards"]}
    files = {e.relative for e in storage.listing(storage.join(root, "k4"), recursive=True) if not e.is_dir}
    assert files == listed | {entries.MANIFEST}  # the losers removed their own unlisted shards


def _churn(path: str, started, stop) -> None:
    started.set()
    while not stop.is_set():
        os.makedirs(path, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)


def test_listing_a_directory_another_process_is_creating_does_not_fail(tmp_path):
    """pyarrow's local listing raises FileNotFoundError (despite allow_not_found) when the directory
    appears between its failed open and its second look: a writer creating an entry's directory while
    another scans it. Without the re-listing, about 1% of these listings fail here."""
    ctx = multiprocessing.get_context("spawn")
    path, started, stop = str(tmp_path / "k"), ctx.Event(), ctx.Event()
    churn = ctx.Process(target=_churn, args=(path, started, stop))
    churn.start()
    try:
        assert started.wait(timeout=60)
        for _ in range(5000):
            storage.listing(path, recursive=True)
    finally:
        stop.set()
        churn.join(timeout=30)


def test_create_exclusive_has_one_winner_under_a_race(root):
    """Eight writers create one manifest at the same instant, many times over: exactly one wins each
    time and the file holds its bytes (a check-then-PUT on S3 lets several "win" here)."""
    for trial in range(5):
        path, won, gate = storage.join(root, f"race{trial}", "manifest.json"), [], threading.Barrier(8)

        def create(i):
            gate.wait()
            if storage.create_exclusive(path, f"writer {i}".encode()):
                won.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and storage.read_bytes(path) == f"writer {won[0]}".encode()


def test_a_transient_network_error_is_retried_then_reported_and_deletes_nothing(s3_server, monkeypatch):
    root = f"{s3_server.bucket('flaky')}/cache"
    manifest = fill(root, "k5", scored(range(8)))
    keys = s3_server.keys("flaky")
    # The network is gone for longer than the retries last (one attempt of ours, each already retried
    # for seconds inside the AWS client: the default of 4 would take a minute here).
    monkeypatch.setenv("RAYDPO_STORAGE_READ_ATTEMPTS", "1")
    s3_server.proxy.down()
    try:
        with pytest.raises(OSError, match=r"s3://flaky/cache/k5"):
            store.lookup(root, "k5")
    finally:
        s3_server.proxy.up()
    assert s3_server.keys("flaky") == keys
    # A blip shorter than the retries: the read goes through and finds the entry whole.
    monkeypatch.delenv("RAYDPO_STORAGE_READ_ATTEMPTS")
    s3_server.proxy.down()
    threading.Timer(0.4, s3_server.proxy.up).start()
    assert store.lookup(root, "k5")[0] == manifest
    assert s3_server.proxy.refused > 0 and s3_server.keys("flaky") == keys


def test_list_and_prune_from_the_cli(root, capsys):
    for key, ids in (("aaa", range(3)), ("bbb", range(3, 5))):
        fill(root, key, scored(ids))
    store.write_shard(entries.writer_path(root, "ccc", entries.new_writer()), scored(range(2)))  # an interrupted run
    old = entries.read_manifest(root, "aaa") | {"created": time.time() - 10 * 86400}  # ten days old
    storage.write_json(storage.join(root, "aaa", entries.MANIFEST), old)

    assert main(["cache", "list", "--cache-dir", root, "--json"]) == 0
    listed = {e["key"]: e for e in json.loads(capsys.readouterr().out) if e["kind"] == "reference"}
    assert listed["aaa"]["pairs"] == 3 and listed["bbb"]["pairs"] == 2 and listed["ccc"]["status"] == "partial"
    assert listed["bbb"]["reference"] == "/m"

    keys = lambda: sorted({e.relative.split("/")[0] for e in storage.listing(root, recursive=True)})  # noqa: E731
    assert main(["cache", "prune", "--cache-dir", root, "--older-than-days", "5", "--min-age-minutes", "0", "--dry-run"]) == 0
    assert "would remove aaa" in capsys.readouterr().out and keys() == ["aaa", "bbb", "ccc"]
    assert main(["cache", "prune", "--cache-dir", root]) == 0  # written in the last hour: left alone
    assert keys() == ["aaa", "bbb", "ccc"]
    assert main(["cache", "prune", "--cache-dir", root, "--min-age-minutes", "0"]) == 0  # no rule: unfinished only
    assert keys() == ["aaa", "bbb"]
    assert main(["cache", "prune", "--cache-dir", root, "--keep-last", "1", "--min-age-minutes", "0"]) == 0
    assert keys() == ["bbb"]
    assert main(["cache", "prune", "--cache-dir", root, "--key", "bbb", "--min-age-minutes", "0"]) == 0
    assert keys() == []


def test_uris_and_bad_locations(tmp_path, s3_server):
    bucket = s3_server.bucket("uris")
    storage.write_text(f"{bucket}/a/b.txt", "hi")
    assert storage.read_text(f"{bucket}/a/b.txt") == "hi" and storage.kind(f"{bucket}/a") == "dir"
    assert storage.create_exclusive(f"{bucket}/a/c", b"1") and not storage.create_exclusive(f"{bucket}/a/c", b"2")
    assert storage.read_bytes(f"{bucket}/a/c") == b"1"
    assert storage.create_exclusive(str(tmp_path / "c"), b"1") and not storage.create_exclusive(str(tmp_path / "c"), b"2")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket}/nothing")
    with pytest.raises(storage.MissingFilesystem, match="adlfs"):
        storage.resolve("abfs://container/path")
    from raydpo.train.preflight import check_writable

    with pytest.raises(OSError, match="s3://no-such-bucket/x.*not writable"):
        check_writable("s3://no-such-bucket/x", "reference.cache_dir")
    with pytest.raises(FileNotFoundError, match=r"no file matches 's3://uris/\*\.jsonl'"):
        from raydpo.data.sources import resolve_paths

        resolve_paths([f"{bucket}/*.jsonl"])
    assert hashlib.sha256(b"1").hexdigest() == entries.shard_record("x", b"1", 1)["sha256"]
    assert pq.read_table(pa.BufferReader(store.table_bytes(scored(range(2))))).num_rows == 2
    assert collections.Counter(digests(scored(range(2), dup=1)))[(1).to_bytes(16, "little")] == 2
    assert os.path.isabs(storage.normalize("~/x")) and storage.join("s3://b/p/", "q") == "s3://b/p/q"
    with pytest.raises(ValueError, match=r"s3://\*\*\*@bucket/\.\.\.: credentials in a URI") as e:
        storage.normalize("s3://AKIA:hunter2@bucket/x")
    assert "hunter2" not in str(e.value)


def test_sha256_of_reads_in_chunks_and_equals_a_whole_read(root):
    """The chunked hash (input files for the tokenized cache's key, shard checks) is the whole file's."""
    path = storage.join(root, "big.bin")
    data = os.urandom(10_000) + b"\x00" * 5
    storage.write_bytes(path, data)
    assert storage.sha256_of(path, chunk_bytes=4096) == storage.sha256_of(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        storage.sha256_of(storage.join(root, "missing.bin"))
