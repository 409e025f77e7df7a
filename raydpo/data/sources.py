"""Ray Data reader for preference files that keeps every row's origin.

Every input row becomes ``{source, index, raw}``: the file it came from, its position (1-based
line for jsonl, 0-based index for json arrays and parquet) and its raw bytes as JSON. Nothing is
parsed here, so a malformed row reaches validation, which quarantines it with its position,
instead of failing the whole read the way ``ray.data.read_json`` would.
"""

from __future__ import annotations

import glob
import io
import json
import os
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

EXTENSIONS = (".jsonl", ".json", ".parquet")
CHUNK_ROWS = 2048
SCHEMA = pa.schema([("source", pa.string()), ("index", pa.int64()), ("raw", pa.binary())])


def file_kind(path: str) -> str:
    """'jsonl', 'json' or 'parquet' from the name, ignoring a compression suffix."""
    name = path[: -len(".gz")] if path.endswith(".gz") else path
    for ext in EXTENSIONS:
        if name.endswith(ext):
            return ext[1:]
    raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(EXTENSIONS)} (optionally .gz)")


def resolve_paths(paths: list[str]) -> list[str]:
    """Expand globs and directories into a sorted, de-duplicated list of absolute file paths."""
    out: list[str] = []
    for p in paths:
        p = os.path.expanduser(p)
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise FileNotFoundError(f"no file matches {p!r}")
        for m in matches:
            if os.path.isdir(m):
                found = sorted(
                    os.path.join(root, f) for root, _, files in os.walk(m) for f in files if _is_data_file(f)
                )
                if not found:
                    raise FileNotFoundError(f"directory {m!r} holds no {'/'.join(EXTENSIONS)} files")
                out.extend(found)
            elif os.path.exists(m):
                file_kind(m)
                out.append(m)
            else:
                raise FileNotFoundError(f"data file {m!r} does not exist")
    return list(dict.fromkeys(os.path.abspath(p) for p in out))


def _is_data_file(name: str) -> bool:
    try:
        file_kind(name)
        return True
    except ValueError:
        return False


def _jsonl_rows(f) -> Iterator[bytes]:
    """Lines of a (possibly huge) file, read in 1 MiB chunks; the last line may lack a newline."""
    tail = b""
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


class PreferenceFiles(FileBasedDatasource):
    """One read task per file; blocks of ``CHUNK_ROWS`` rows as ``SCHEMA``."""

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        kind = file_kind(path)
        if kind == "jsonl":
            yield from self._chunks(path, _jsonl_rows(f), start=1, skip_blank=True)
        elif kind == "json":
            rows = json.loads(f.readall())
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a .json file must hold a list of rows")
            yield from self._chunks(path, (json.dumps(r).encode() for r in rows), start=0)
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(io.BytesIO(f.readall()))
            rows = (json.dumps(r, default=str).encode() for b in pf.iter_batches(batch_size=CHUNK_ROWS) for r in b.to_pylist())
            yield from self._chunks(path, rows, start=0)

    @staticmethod
    def _chunks(path: str, rows: Iterator[bytes], start: int, skip_blank: bool = False) -> Iterator[pa.Table]:
        # Positions count every line, blank ones included, so an index points at the real line.
        buf: list[tuple[int, bytes]] = []
        for pos, raw in enumerate(rows, start=start):
            if skip_blank and not raw.strip():
                continue
            buf.append((pos, raw))
            if len(buf) >= CHUNK_ROWS:
                yield _table_positions(path, buf)
                buf = []
        if buf:
            yield _table_positions(path, buf)


def _table_positions(source: str, items: list[tuple[int, bytes]]) -> pa.Table:
    return pa.table(
        {"source": [source] * len(items), "index": [p for p, _ in items], "raw": [r for _, r in items]},
        schema=SCHEMA,
    )


def read_preferences(paths: list[str]):
    """A ``ray.data.Dataset`` of ``{source, index, raw}`` rows from preference files."""
    import ray.data

    files = resolve_paths(paths)
    return ray.data.read_datasource(PreferenceFiles(files))
