"""File digests paid once (raydpo.storage.fingerprint): what is remembered, what is read again."""

from __future__ import annotations

import hashlib
import json
import os
import time

from raydpo.storage.fingerprint import StatMemo, digests, memo_path


def read_bytes_during(fn) -> tuple[object, int]:
    """fn()'s result and the bytes this process read through read(2) meanwhile (/proc/self/io rchar)."""
    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

    before = rchar()
    out = fn()
    return out, rchar() - before


def settled(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` with an mtime a minute old (past the racy window)."""
    with open(path, "wb") as f:
        f.write(data)
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_a_file_is_hashed_once_then_known_by_its_stat_in_a_new_process(tmp_path):
    data = os.urandom(8 << 20)
    path = settled(str(tmp_path / "w.safetensors"), data)
    memo_file = str(tmp_path / "memo" / "host.json")
    first, read = read_bytes_during(lambda: digests([path], StatMemo(memo_file)))
    assert first[path] == hashlib.sha256(data).hexdigest() and read >= len(data)
    again, read = read_bytes_during(lambda: StatMemo(memo_file).digest(path))  # a new run: the memo from disk
    assert again == first[path] and read < len(data) // 8


def test_changed_bytes_are_hashed_again_even_with_the_same_size_and_mtime(tmp_path):
    path = settled(str(tmp_path / "w.bin"), b"a" * 1000)
    memo_file = str(tmp_path / "memo.json")
    digests([path], StatMemo(memo_file))
    mtime = os.stat(path).st_mtime_ns
    with open(path, "r+b") as f:  # same size, then the old mtime put back: ctime still moves
        f.write(b"b")
    os.utime(path, ns=(mtime, mtime))
    assert StatMemo(memo_file).digest(path) == hashlib.sha256(b"b" + b"a" * 999).hexdigest()


def test_a_file_written_just_now_is_not_remembered(tmp_path):
    path = str(tmp_path / "fresh.bin")
    with open(path, "wb") as f:
        f.write(b"x" * 100)
    memo = StatMemo(str(tmp_path / "memo.json"))
    assert memo.digest(path) == hashlib.sha256(b"x" * 100).hexdigest()
    assert not memo.entries  # its next write may land in the same clock tick


def test_a_hub_cache_file_is_named_by_its_blob_without_reading_it(tmp_path):
    (tmp_path / "models--org--m" / "blobs").mkdir(parents=True)
    blob = settled(str(tmp_path / "models--org--m" / "blobs" / ("ab" * 32)), os.urandom(4 << 20))
    snap = tmp_path / "models--org--m" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    os.symlink(blob, snap / "model.safetensors")
    got, read = read_bytes_during(lambda: StatMemo(None).digest(str(snap / "model.safetensors")))
    assert got == f"hub-blob:{'ab' * 32}" and read < 1 << 20


def test_a_torn_memo_is_ignored_and_rewritten(tmp_path):
    path = settled(str(tmp_path / "w.bin"), b"weights")
    memo_file = tmp_path / "memo.json"
    memo_file.write_text("{not json")
    assert StatMemo(str(memo_file)).digest(path) == hashlib.sha256(b"weights").hexdigest()
    digests([path], StatMemo(str(memo_file)))
    assert os.path.abspath(path) in json.loads(memo_file.read_text())


def test_model_fingerprint_is_stable_and_follows_the_weights(tmp_path, tiny_model_dir):
    """The reference key's model fingerprint: the same with or without a memo, and another one
    when a weight byte changes."""
    import shutil

    from raydpo.reference.cache import fingerprint_model
    from raydpo.storage.fingerprint import memo_for

    model = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, model)
    for f in os.listdir(model):
        os.utime(os.path.join(model, f), (time.time() - 60,) * 2)
    memo_file = str(tmp_path / "memo.json")
    memo = memo_for(memo_file)
    plain = fingerprint_model(model)
    assert fingerprint_model(model, memo) == plain == fingerprint_model(model, memo)
    assert os.path.abspath(os.path.join(model, "model.safetensors")) in json.loads(open(memo_file).read())
    weights = os.path.join(model, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert fingerprint_model(model, memo) != plain


def test_the_memo_is_the_hosts(monkeypatch, tmp_path):
    monkeypatch.delenv("RAYDPO_STAT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert memo_path().startswith(str(tmp_path / "raydpo" / "stat-cache"))
    monkeypatch.setenv("RAYDPO_STAT_CACHE", str(tmp_path / "elsewhere.json"))
    assert memo_path() == str(tmp_path / "elsewhere.json")
