"""sha256 of local files, each paid once: remembered by (path, device, inode, size, mtime, ctime).

A cache key needs the reference weights' and the input files' digests, and reading 140 GB of a
70B model's weights for them on every run, cache hit or not, costs minutes. A file whose stat has
not changed since it was hashed has the same bytes, as git's index assumes: the digest is kept in a
small JSON memo (:class:`StatMemo`) of the host's (:func:`memo_path`: inodes are the host's), and
read again from there. Like git, a file modified within :data:`RACY_S` of being hashed is not
remembered (a write in the same clock tick would leave its stat unchanged).

A file in a Hugging Face hub cache is a link into ``blobs/``, whose names are the contents'
hashes (sha256 for LFS weights, git's sha1 for small files): its digest is that name, nothing read.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time

from raydpo.storage import uri

#: A file changed this recently is hashed but not remembered (its mtime may not move on the next write).
RACY_S = 2.0
#: Entries a memo keeps (the most recently used): a few models and data sets, not every file ever seen.
MAX_ENTRIES = 4096


def hub_blob(path: str) -> str | None:
    """``hub-blob:<name>`` for a file that links into a Hugging Face cache's ``blobs/`` (named by
    its content's hash), else None."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    if os.path.basename(os.path.dirname(target)) != "blobs":
        return None
    return f"hub-blob:{os.path.basename(target)}"


def stamp(st: os.stat_result) -> list:
    """What must not change for a remembered digest to hold."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class StatMemo:
    """Digests by path and stat, in the JSON file ``path`` (None: this process only).

    Reads the file once; :meth:`save` merges with what other processes wrote meanwhile and
    replaces it atomically (a lost race costs a re-hash, never a wrong digest)."""

    def __init__(self, path: str | None):
        self.path = path
        self.entries, self.dirty = self._load(), False

    def _load(self) -> dict:
        if self.path is None:
            return {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):  # absent or torn: start empty, it is only a memo
            return {}

    def digest(self, path: str) -> str:
        """sha256 of the local file ``path`` (or its hub blob name), remembered while its stat holds."""
        path = os.path.abspath(path)
        blob = hub_blob(path)
        if blob is not None:
            return blob
        st = os.stat(path)
        known = self.entries.get(path)
        if known is not None and known[0] == stamp(st):
            known[2] = time.time()
            return known[1]
        value = uri.sha256_of(path)  # in 4 MB chunks
        if time.time() - st.st_mtime > RACY_S and stamp(os.stat(path)) == stamp(st):
            self.entries[path] = [stamp(st), value, time.time()]
            self.dirty = True
        return value

    def save(self) -> None:
        """Write what this process learned (a read-only place: nothing, the digests stay right)."""
        if self.path is None or not self.dirty:
            return
        merged = self._load() | self.entries
        kept = dict(sorted(merged.items(), key=lambda kv: kv[1][2])[-MAX_ENTRIES:])
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(kept, f)
            os.replace(tmp, self.path)
        except OSError:
            return
        self.entries, self.dirty = kept, False


#: Where the memo lives instead of its default (a file path).
MEMO_ENV = "RAYDPO_STAT_CACHE"


def memo_path() -> str:
    """This host's memo: ``$RAYDPO_STAT_CACHE``, else ``$XDG_CACHE_HOME/raydpo/stat-cache/<host>.json``
    (``~/.cache``). On the host, not in a cache directory: a stat means something on its own host
    only (a cache directory may be shared, or on object storage), and cache directories hold entries."""
    if os.environ.get(MEMO_ENV):
        return os.environ[MEMO_ENV]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "raydpo", "stat-cache", f"{socket.gethostname() or 'host'}.json")


@functools.lru_cache(maxsize=4)
def memo_for(path: str) -> StatMemo:
    """One :class:`StatMemo` per memo file per process (splits, runs and sweep trials share it)."""
    return StatMemo(path)


def host_memo() -> StatMemo:
    """This host's memo (:func:`memo_path`)."""
    return memo_for(memo_path())


def digests(paths: list[str], memo: StatMemo) -> dict[str, str]:
    """path -> digest for every path, the memo saved once after."""
    try:
        return {p: memo.digest(p) for p in paths}
    finally:
        memo.save()
