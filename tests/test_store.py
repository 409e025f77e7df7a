"""Cache entries on disk: atomic shards, resume, damage detection, list and prune (no Ray needed)."""

import collections
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydpo.cli import main
from raydpo.reference import store


def scored(ids: range, dup: int | None = None) -> pa.Table:
    rows = list(ids) + ([dup] if dup is not None else [])
    return pa.table({
        "pair_id": [f"p{i}" for i in rows],
        "digest": [i.to_bytes(16, "little") for i in rows],
        "ref_chosen_logps": [-float(i) for i in rows],
    })


def expected(*tables) -> collections.Counter:
    return collections.Counter(d for t in tables for d in t["digest"].to_pylist())


def test_shards_are_content_addressed_and_atomic(tmp_path):
    first = store.write_shard(str(tmp_path), scored(range(4)))
    again = store.write_shard(str(tmp_path), scored(range(4)))  # a retried batch
    other = store.write_shard(str(tmp_path), scored(range(4, 8)))
    assert first == again != other
    assert sorted(os.listdir(tmp_path)) == sorted({os.path.basename(first), os.path.basename(other)})


def test_resume_scores_only_what_is_missing(tmp_path):
    cache = str(tmp_path)
    part, done, dropped = store.open_partial(cache, "k1")
    assert not done and dropped == 0
    store.write_shard(os.path.join(part, "data"), scored(range(0, 4)))
    with open(os.path.join(part, "data", "shard-cut.parquet"), "wb") as f:
        f.write(b"PAR1 cut short")  # a damaged shard
    open(os.path.join(part, "data", ".x.tmp"), "w").close()  # a write that never finished
    all_pairs = scored(range(10), dup=3)  # pair 3 appears twice: both rows must be scored
    part, done, dropped = store.open_partial(cache, "k1")
    assert dropped == 1 and sum(done.values()) == 4
    todo = store.remaining(all_pairs, done)
    assert todo["pair_id"].to_pylist() == ["p4", "p5", "p6", "p7", "p8", "p9", "p3"]
    store.write_shard(os.path.join(part, "data"), todo)
    entry = store.finalize(cache, "k1", {"x": 1}, expected(all_pairs))
    manifest = store.read_manifest(entry)
    assert manifest["rows"] == 11 and len(manifest["shards"]) == 2
    assert not os.path.exists(store.partial_dir(cache, "k1"))
    assert store.lookup(cache, "k1") == (entry, [])


def test_finalize_refuses_missing_or_duplicated_pairs(tmp_path):
    part, _, _ = store.open_partial(str(tmp_path), "k2")
    store.write_shard(os.path.join(part, "data"), scored(range(0, 5)))
    with pytest.raises(ValueError, match="1 pairs too few and 0 too many"):
        store.finalize(str(tmp_path), "k2", {}, expected(scored(range(6))))
    store.write_shard(os.path.join(part, "data"), scored(range(3, 6)))  # overlaps: 3 and 4 twice
    with pytest.raises(ValueError, match="0 pairs too few and 2 too many"):
        store.finalize(str(tmp_path), "k2", {}, expected(scored(range(6))))


@pytest.mark.parametrize("damage", ["altered", "truncated", "deleted", "stray"])
def test_damaged_entry_is_reopened_without_the_bad_shard(tmp_path, damage):
    cache = str(tmp_path)
    part, _, _ = store.open_partial(cache, "k3")
    good = store.write_shard(os.path.join(part, "data"), scored(range(0, 4)))
    bad = store.write_shard(os.path.join(part, "data"), scored(range(4, 8)))
    entry = store.finalize(cache, "k3", {}, expected(scored(range(8))))
    bad = os.path.join(entry, "data", os.path.basename(bad))
    if damage == "altered":  # same size, other values
        table = pq.read_table(bad)
        pq.write_table(table.set_column(2, "ref_chosen_logps", pa.array([1.0, 2.0, 3.0, 4.0])), bad)
    elif damage == "truncated":
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    elif damage == "deleted":
        os.remove(bad)
    else:
        store.write_shard(os.path.join(entry, "data"), scored(range(100, 102)))
    found, problems = store.lookup(cache, "k3")
    assert found is None and len(problems) == 1, problems
    part, done, _ = store.open_partial(cache, "k3")
    left = store.remaining(scored(range(8)), done)["pair_id"].to_pylist()
    if damage == "stray":  # both listed shards are sound; the unlisted one is dropped
        assert sorted(os.listdir(os.path.join(part, "data"))) == sorted(map(os.path.basename, (good, bad))) and left == []
    else:  # the sound shard was kept; the damaged one's pairs are all that is left to score
        assert os.listdir(os.path.join(part, "data")) == [os.path.basename(good)]
        assert left == [f"p{i}" for i in range(4, 8)]


def test_list_and_prune_from_the_cli(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    for key, ids in (("aaa", range(3)), ("bbb", range(3, 5))):
        part, _, _ = store.open_partial(cache, key)
        store.write_shard(os.path.join(part, "data"), scored(ids))
        store.finalize(cache, key, {"dtype": "float32", "backend": "hf"}, expected(scored(ids)), {"reference": "/m"})
    store.open_partial(cache, "ccc")  # an interrupted run
    manifest = os.path.join(cache, "aaa", "manifest.json")
    m = json.load(open(manifest))
    m["created"] -= 10 * 86400  # ten days old
    json.dump(m, open(manifest, "w"))

    assert main(["cache", "list", "--cache-dir", cache, "--json"]) == 0
    listed = {e["key"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["aaa"]["pairs"] == 3 and listed["bbb"]["pairs"] == 2 and listed["ccc"]["status"] == "partial"
    assert listed["bbb"]["dtype"] == "float32" and listed["bbb"]["reference"] == "/m"

    assert main(["cache", "prune", "--cache-dir", cache, "--older-than-days", "5", "--dry-run"]) == 0
    assert "would remove aaa" in capsys.readouterr().out and os.path.exists(os.path.join(cache, "aaa"))
    assert main(["cache", "prune", "--cache-dir", cache]) == 0  # no rule: only unfinished directories
    assert sorted(os.listdir(cache)) == ["aaa", "bbb"]
    assert main(["cache", "prune", "--cache-dir", cache, "--keep-last", "1"]) == 0
    assert os.listdir(cache) == ["bbb"]
    assert main(["cache", "prune", "--cache-dir", cache, "--key", "bbb"]) == 0
    assert os.listdir(cache) == []
