"""Local paths and URIs, one API: the only place that opens a run or cache file.

A location is a local path (made absolute) or a URI of a pyarrow filesystem (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``), with fsspec behind pyarrow for the schemes pyarrow has no filesystem for.
Credentials and endpoints come from each process's standard environment (``AWS_*`` including
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...): nothing secret is ever passed in or
written out here.

Writes are atomic (a reader sees a whole file or none): temp file + rename on a filesystem, one PUT
(or one completed multipart upload) on an object store. Reads are retried on transient errors and
then reported with the location; nothing here deletes a file because a read failed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import pyarrow.fs as pafs

from raydpo.storage import conditional

T = TypeVar("T")
#: Read attempts on a transient error (a dropped connection, a throttled request; each one already
#: retried inside the object store's own client), and the first pause. ``RAYDPO_STORAGE_READ_ATTEMPTS``
#: overrides the count (a job that must fail fast on an outage, or ride out a long one).
READ_ATTEMPTS, FIRST_PAUSE_S = 4, 0.25


def read_attempts() -> int:
    return max(1, int(os.environ.get("RAYDPO_STORAGE_READ_ATTEMPTS", READ_ATTEMPTS)))


def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``file://`` is a local path)."""
    return "://" in str(path) and not str(path).startswith("file://")


def normalize(path: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded, ``file://`` dropped); a URI without trailing ``/``."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_uri(path):
        head, _, rest = path.partition("://")
        user, at, host = rest.partition("/")[0].rpartition("@")
        if at and ":" in user:  # never echo the secret itself
            raise ValueError(f"{head}://***@{host}/...: credentials in a URI would be written to config.yaml, logs and "
                             "summary.json; give them through each node's environment (AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY, an IAM role, GOOGLE_APPLICATION_CREDENTIALS)")
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """``base`` / ``parts``, with ``/`` for URIs and the OS separator for local paths."""
    base = normalize(base)
    if is_uri(base):
        return "/".join([base, *(p.strip("/") for p in parts if p)])
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    path = normalize(path)
    return path.rsplit("/", 1)[0] if is_uri(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return normalize(path).rsplit("/", 1)[-1]


def scheme(path: str) -> str:
    return path.split("://", 1)[0] if is_uri(path) else "file"


class MissingFilesystem(ValueError):
    """A URI whose filesystem is not installed."""


@functools.lru_cache(maxsize=32)
def _filesystem_for(root: str) -> pafs.FileSystem:
    """The filesystem of ``scheme://netloc`` (one per bucket and process: S3 resolves the region once)."""
    try:
        return pafs.FileSystem.from_uri(root)[0]
    except (ValueError, NotImplementedError) as arrow_error:  # pyarrow has none, or not configured
        import fsspec

        protocol = scheme(root)
        try:
            return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(protocol)))
        except (ImportError, ValueError) as e:
            from fsspec.registry import known_implementations

            known = known_implementations.get(protocol, {})
            hint = known.get("err") or f"no pyarrow or fsspec filesystem is registered for {protocol}://"
            raise MissingFilesystem(f"{root}: cannot open {protocol}:// paths: {hint} "
                                    f"(pyarrow said: {arrow_error}; fsspec said: {e})") from None


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    path = normalize(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), path
    head, _, rest = path.partition("://")
    netloc, _, key = rest.partition("/")
    fs = _filesystem_for(f"{head}://{netloc}")
    # pyarrow's own filesystems take "bucket/key"; fsspec ones behind PyFileSystem too.
    return fs, f"{netloc}/{key}".rstrip("/")


LISTING_RACE_ATTEMPTS = 5
"""Listings of a directory another process is creating at that instant, before giving up."""


def retried(what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    """``fn()``, retried with backoff on transient ``OSError``s (:func:`read_attempts` times); a
    missing file is not retried. The last error is raised as an ``OSError`` naming ``what``."""
    attempts = attempts or read_attempts()
    pause = FIRST_PAUSE_S
    for attempt in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as e:
            if attempt == attempts - 1:
                raise OSError(f"{what}: {e} (after {attempts} attempts)") from e
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Entry:
    """A file or directory found by :func:`listing`."""

    path: str
    """Its location (a local path or URI, as given plus the relative part)."""
    relative: str
    """Its path below the listed directory, ``/``-separated."""
    is_dir: bool
    size: int
    mtime: float
    """Seconds since the epoch (0 where the filesystem keeps none)."""


def _info_type(info) -> str:
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type, "none")


def kind(path: str) -> str:
    """``file``, ``dir`` or ``none``; an object-store prefix with objects under it is a ``dir``."""
    fs, p = resolve(path)
    return retried(f"looking up {path}", lambda: _info_type(fs.get_file_info(p)))


def exists(path: str) -> bool:
    return kind(path) != "none"


def listing(path: str, recursive: bool = False) -> list[Entry]:
    """What lies under directory ``path`` (sorted by relative path; [] if it does not exist)."""
    fs, root = resolve(path)
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=recursive)
    for attempt in range(LISTING_RACE_ATTEMPTS):
        try:
            infos = retried(f"listing {path}", lambda: fs.get_file_info(selector))
            break
        except FileNotFoundError:
            # With allow_not_found, pyarrow's local listing raises only when a directory it failed to
            # open exists when it looks again: another process created it meanwhile. Listing again sees it.
            if attempt == LISTING_RACE_ATTEMPTS - 1:
                raise
    out = []
    for info in infos:
        rel = info.path[len(root):].lstrip("/")
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        out.append(Entry(join(path, rel), rel, info.type == pafs.FileType.Directory, info.size or 0, mtime))
    return sorted(out, key=lambda e: e.relative)


def _read(path: str, consume: Callable[[object], T]) -> T:
    """``consume`` of the file's input stream (retried on transient errors; ``FileNotFoundError`` if
    the file does not exist)."""
    fs, p = resolve(path)

    def read() -> T:
        try:
            with fs.open_input_stream(p) as f:
                return consume(f)
        except FileNotFoundError:
            raise
        except OSError as e:
            if _info_type(fs.get_file_info(p)) == "none":
                raise FileNotFoundError(f"{path} does not exist") from e
            raise

    return retried(f"reading {path}", read)


def read_bytes(path: str) -> bytes:
    """The whole file (retried on transient errors; ``FileNotFoundError`` if it does not exist)."""
    return _read(path, lambda f: f.read())


def sha256_of(path: str, chunk_bytes: int = 1 << 22) -> str:
    """The file's sha256, read in chunks: memory stays ``chunk_bytes`` whatever the file's size (a
    whole-file read would keep a data file's size in the reader's heap for the rest of the run)."""
    def digest(f) -> str:
        h = hashlib.sha256()
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
        return h.hexdigest()

    return _read(path, digest)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str):
    return json.loads(read_bytes(path))


def _temp_beside(p: str, data: bytes) -> str:
    """A finished temporary file holding ``data`` in ``p``'s directory (made if needed): renamed or
    linked into place, it makes the write atomic."""
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def write_bytes(path: str, data: bytes) -> None:
    """Write the whole file atomically (see the module docstring); parent directories are made."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(_temp_beside(p, data), p)
        return
    with fs.open_output_stream(p) as f:  # one PUT: the object appears whole when the stream closes
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def create_exclusive(path: str, data: bytes) -> bool:
    """Write ``path`` only if it does not exist yet; True if this call created it.

    On a filesystem the check and the creation are one step (a hard link of a finished temp file:
    atomic on local disks and NFS); on S3 one conditional PUT (``If-None-Match: *``, see
    :mod:`raydpo.storage.conditional`). A store with neither gets check-then-PUT, then a read-back:
    a second writer racing within the same instant can still overwrite the first with its own
    (equally complete) file, and the first then learns it lost only if the overwrite came first."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _temp_beside(p, data)
        try:
            os.link(tmp, p)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    created = conditional.put_if_absent(fs, p, data)
    if created is not None:
        return created
    if exists(path):
        return False
    write_bytes(path, data)
    return read_bytes(path) == data


def append_text(path: str, text: str) -> None:
    """Append to a file: in place on a filesystem, a rewrite of the whole object on an object store
    (for small files written by one process, e.g. ``quarantine.jsonl`` or a run's round rows)."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "a") as f:
            f.write(text)
        return
    try:
        old = read_bytes(path)
    except FileNotFoundError:
        old = b""
    write_bytes(path, old + text.encode("utf-8"))


def makedirs(path: str) -> None:
    """Make a local directory (object stores need none: a key's prefix exists with the key)."""
    if not is_uri(path):
        os.makedirs(normalize(path), exist_ok=True)


def delete_file(path: str, missing_ok: bool = True) -> None:
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        if not missing_ok:
            raise


def delete_dir(path: str) -> None:
    """Remove a directory and everything under it (nothing if it does not exist)."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.rmtree(p, ignore_errors=True)
        return
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        pass


def free_bytes(path: str) -> float:
    """Free space at a local path (its nearest existing parent); infinite on an object store."""
    if is_uri(path):
        return float("inf")
    p = normalize(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return float(shutil.disk_usage(p).free)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local directory's files to ``dest`` (a URI or another local path), file by file."""
    fs, p = resolve(dest)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.copytree(local_dir, p, dirs_exist_ok=True)
        return
    pafs.copy_files(local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(src: str, local_dir: str) -> None:
    fs, p = resolve(src)
    pafs.copy_files(p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


@contextlib.contextmanager
def local_dir_for_writing(dest: str) -> Iterator[str]:
    """A local directory to write into that becomes ``dest``: ``dest`` itself when it is local, else
    a temporary directory uploaded to ``dest`` on a clean exit (for ``save_pretrained`` and the like)."""
    if not is_uri(dest):
        makedirs(dest)
        yield normalize(dest)
        return
    with tempfile.TemporaryDirectory(prefix="raydpo-upload-") as tmp:
        yield tmp
        upload_dir(tmp, dest)


@contextlib.contextmanager
def local_copy(src: str) -> Iterator[str]:
    """A local path holding ``src``'s contents (``src`` itself when local; a downloaded temporary copy
    of a remote file or directory otherwise)."""
    if not is_uri(src):
        yield normalize(src)
        return
    with tempfile.TemporaryDirectory(prefix="raydpo-download-") as tmp:
        if kind(src) == "dir":
            download_dir(src, tmp)
            yield tmp
        else:
            target = os.path.join(tmp, basename(src))
            with open(target, "wb") as f:
                f.write(read_bytes(src))
            yield target
