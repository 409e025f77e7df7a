"""Ray Data readers for preference data that keep every row's origin.

Every input row becomes ``{source, index, raw}``: where it came from, its position (1-based line
for jsonl, 0-based row for json arrays, parquet, csv and ``datasets`` data sets) and its raw bytes
as JSON. Nothing is parsed here, so a malformed row reaches validation, which quarantines it with
its position, instead of failing the whole read the way ``ray.data.read_json`` would.

Sources: files (jsonl, json, parquet, csv, each optionally .gz), globs, directories, ``datasets``
directories written by ``save_to_disk``, hub data set ids (``org/name`` or ``org/name:split``) and,
through the Python API, an existing ``ray.data.Dataset``.
"""

from __future__ import annotations

import glob
import io
import json
import os
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from raydpo import storage

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
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
    """Expand globs and directories into a sorted, de-duplicated list of files: absolute local
    paths, or URIs (``s3://...``) listed through :mod:`raydpo.storage`."""
    out: list[str] = []
    for p in paths:
        p = storage.normalize(p) if storage.is_uri(p) else os.path.expanduser(p)
        matches = _glob(p) if glob.has_magic(p) else [p]
        if not matches:
            raise FileNotFoundError(f"no file matches {p!r}")
        for m in matches:
            found = storage.kind(m)
            if found == "dir":
                files = sorted(f for f in _data_files(m) if _is_data_file(f))
                if not files:
                    raise FileNotFoundError(f"directory {m!r} holds no {'/'.join(EXTENSIONS)} files")
                out.extend(files)
            elif found == "file":
                file_kind(m)
                out.append(m)
            else:
                raise FileNotFoundError(f"data file {m!r} does not exist")
    return list(dict.fromkeys(storage.normalize(p) for p in out))


def _glob(pattern: str) -> list[str]:
    """Files matching a glob, local or under a URI (listed from the pattern's last literal directory)."""
    if not storage.is_uri(pattern):
        return sorted(glob.glob(pattern))
    import fnmatch

    head = pattern[: min(pattern.find(c) for c in "*?[" if c in pattern)]
    base = head.rsplit("/", 1)[0]
    return [e.path for e in storage.listing(base, recursive=True) if not e.is_dir and fnmatch.fnmatchcase(e.path, pattern)]


def _data_files(top: str) -> list[str]:
    """Files under ``top``, leaving out raydpo cache entries (a directory holding a ``manifest.json``,
    a cache writer's ``w-<time>-<id>`` directory, an older raydpo's ``.partial`` one): a cache kept
    inside a data directory must not be read back as preference rows."""
    import re

    listed = storage.listing(top, recursive=True)
    entries = {e.relative.rsplit("/", 1)[0] + "/" for e in listed if not e.is_dir and e.relative.endswith("/manifest.json")}
    cache_dir = re.compile(r"^w-\d+-[0-9a-f]{12}$|\.partial")
    return [e.path for e in listed if not e.is_dir and not any(e.relative.startswith(d) for d in entries)
            and not any(cache_dir.search(part) for part in e.relative.split("/")[:-1])]


def local_sources(specs: list[str]) -> list[str]:
    """The local files and directories among ``specs`` (no URIs, no hub ids), unexpanded: what a node
    must see to read them."""
    out = []
    for spec in specs:
        if storage.is_uri(spec) or _is_hub_id(spec):
            continue
        path = os.path.expanduser(spec)
        out.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
    return out


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
    """One read task per file; blocks of ``CHUNK_ROWS`` rows as ``SCHEMA``. ``paths``: local files or
    URIs of one filesystem (Ray Data opens them; a row's ``source`` is the name as given)."""

    def __init__(self, paths: list[str], **kwargs):
        super().__init__(paths, **kwargs)
        # Ray Data hands read tasks the path inside the filesystem ("bucket/key"): map it back.
        self._names = {storage.resolve(p)[1]: p for p in paths}

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        path = self._names.get(path, path)
        kind = file_kind(path)
        if kind == "jsonl":
            yield from self._chunks(path, _jsonl_rows(f), start=1, skip_blank=True)
        elif kind == "json":
            rows = json.loads(f.readall())
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a .json file must hold a list of rows")
            yield from self._chunks(path, (json.dumps(r).encode() for r in rows), start=0)
        elif kind == "csv":
            import csv

            text = io.StringIO(f.readall().decode("utf-8"), newline="")
            yield from self._chunks(path, (json.dumps(r).encode() for r in csv.DictReader(text)), start=0)
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


def is_saved_dataset(path: str) -> bool:
    """A directory written by ``datasets.Dataset.save_to_disk``."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def _raw_rows(source: str):
    """map_batches fn: any columns -> ``{source, index, raw}`` (``__index`` holds positions if present)."""

    def fn(batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = [(r.pop("__index", -1), json.dumps(r, default=str).encode()) for r in rows]
        return _table_positions(source, items)

    return fn


def from_hf(ds, source: str, remote_args: dict | None = None):
    """A ``datasets.Dataset`` as ``{source, index, raw}`` rows, positions kept (``remote_args``: of the
    conversion tasks, e.g. their CPUs)."""
    import ray.data

    ds = ds.add_column("__index", list(range(len(ds))))
    return ray.data.from_huggingface(ds).map_batches(_raw_rows(source), batch_format="pyarrow", **(remote_args or {}))


def from_ray(ds, source: str = "<ray.data.Dataset>"):
    """An existing ``ray.data.Dataset`` of preference rows as ``{source, index, raw}``.

    ``index`` is the 0-based row position in the dataset's order: the dataset is materialized and
    its blocks numbered in order (from their metadata), so quarantine entries and duplicates point at
    real rows. Each block is converted by a task where it is (:mod:`raydpo.data.blocks`).
    """
    from raydpo.data.blocks import from_tables, map_blocks

    refs, starts, start = [], [], 0
    for bundle in ds.materialize().iter_internal_ref_bundles():
        for entry in bundle.blocks:
            refs.append(entry.ref)
            starts.append(start)
            start += entry.metadata.num_rows
    if not refs:
        return from_tables([_table_positions(source, [])])
    return map_blocks(_positions, refs, source, per_block=starts)


def _positions(block, start: int, source: str) -> pa.Table:
    if not isinstance(block, pa.Table):
        block = pa.Table.from_pandas(block, preserve_index=False)
    return _table_positions(source, [(start + i, json.dumps(r, default=str).encode()) for i, r in enumerate(block.to_pylist())])


def _hub_or_saved(spec: str, default_split: str, remote_args: dict | None = None):
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"reading {spec!r} needs the 'datasets' package: pip install datasets")
    import datasets

    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "dataset_dict.json")):
            splits = sorted(d for d in os.listdir(spec) if is_saved_dataset(os.path.join(spec, d)))
            raise ValueError(f"{spec} holds a DatasetDict; name one split directory: {', '.join(splits)}")
        return from_hf(datasets.load_from_disk(spec), os.path.abspath(spec), remote_args)
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or default_split)
    except Exception as e:  # offline, unknown id, missing split: say which and why
        raise FileNotFoundError(f"{spec!r} is neither a local path nor a loadable hub data set: {e}") from e
    return from_hf(ds, f"hub:{name}:{split or default_split}", remote_args)


def _is_hub_id(spec: str) -> bool:
    if storage.is_uri(spec):
        return False
    name = spec.partition(":")[0]
    return name.count("/") == 1 and not spec.startswith((".", "/", "~")) and not glob.has_magic(spec) and not os.path.exists(name)


def _resolve(spec: str, default_split: str) -> tuple[str | None, list[str]]:
    """(what ``_hub_or_saved`` reads, or None for files; the resolved source names) of one spec."""
    path = os.path.expanduser(spec)
    if storage.is_uri(spec):
        return None, resolve_paths([spec])
    if (os.path.isdir(path) and (is_saved_dataset(path) or os.path.isfile(os.path.join(path, "dataset_dict.json")))) or _is_hub_id(spec):
        if os.path.isdir(path):
            return path, [os.path.abspath(path)]
        return spec, [f"hub:{spec if ':' in spec else spec + ':' + default_split}"]
    return None, resolve_paths([spec])


def source_names(specs: list[str], default_split: str = "train") -> list[str]:
    """The resolved source names of ``specs`` in input order, without reading them: absolute file
    paths, ``save_to_disk`` directories and ``hub:<id>:<split>`` (as the rows' ``source`` says)."""
    return [name for spec in specs for name in _resolve(spec, default_split)[1]]


def read_preferences(specs: list[str], default_split: str = "train", read_cpus: float | None = None):
    """A ``ray.data.Dataset`` of ``{source, index, raw}`` rows from files, saved or hub data sets.
    ``read_cpus``: CPUs per read task (None: Ray Data's default of 1).

    Returns (dataset, resolved source names in input order).
    """
    import ray.data

    parts, names, files = [], [], []
    remote_args = {"num_cpus": read_cpus} if read_cpus is not None else {}

    def flush():
        if files:
            parts.append(ray.data.read_datasource(PreferenceFiles(list(files)), num_cpus=read_cpus))
            names.extend(files)
            files.clear()

    for spec in specs:
        hf, resolved = _resolve(spec, default_split)
        if hf is not None:
            flush()
            parts.append(_hub_or_saved(hf, default_split, remote_args))
            names.extend(resolved)
        else:
            for name in resolved:  # one datasource per run of files on the same filesystem
                if files and storage.scheme(files[-1]) != storage.scheme(name):
                    flush()
                files.append(name)
    flush()
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), names
