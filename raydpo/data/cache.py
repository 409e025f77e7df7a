"""The tokenized-data cache: the data stage's result, content-addressed, so a later run skips tokenizing.

An entry ``<data cache root>/<key>/`` holds ``manifest.json`` (every key input spelled out, the
resolved source names, shards with row counts and sha256) and ``data/shard-<n>.parquet``: every row
the data stage read, with its status, reason and token ids (``raydpo.data.stage.OUT_SCHEMA``), after
de-duplication and KL pairing, in the stage's block order. A hit rebuilds the same table, so the
kept pairs, the quarantine file and the counts are those of the run that wrote it.

The key covers what the table depends on: each source file's path and bytes (paths are in the rows
and the quarantine file), the tokenizer's files, every tokenization and parsing setting, the KL group
size of unpaired losses, and raydpo's version plus a digest of ``raydpo/data``'s own code (so a
changed tokenizing rule never serves old ids). Hub data set ids and ``ray.data.Dataset`` inputs are
not cached: they have no file bytes to address. Entries share the reference cache's store
(:mod:`raydpo.reference.store`: checked shard by shard, listed and pruned by ``raydpo cache``); a
damaged entry is removed and rebuilt by the run that finds it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from raydpo.reference.store import sha256_file

FORMAT = 1
DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def cache_root(cfg) -> str:
    """``data.cache_dir``, or ``tokenized`` beside ``reference.cache_dir``."""
    if cfg.data.cache_dir:
        return os.path.abspath(os.path.expanduser(cfg.data.cache_dir))
    ref = os.path.abspath(os.path.expanduser(cfg.reference.cache_dir))
    return os.path.join(os.path.dirname(ref), "tokenized")


def _source_digest(name: str) -> str:
    """sha256 of a source file, or of every file under a ``save_to_disk`` directory."""
    if not os.path.isdir(name):
        return sha256_file(name)
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(name)):
        for f in sorted(files):
            path = os.path.join(root, f)
            h.update(os.path.relpath(path, name).encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of ``raydpo/data``'s sources: the rules that turn rows into token ids."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(DATA_DIR)):
        if f.endswith(".py"):
            with open(os.path.join(DATA_DIR, f), "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()


def key_inputs(cfg, sources: dict[str, list[str]], settings: dict, kl: bool) -> dict | None:
    """Everything the data stage's table depends on, or None when a source cannot be addressed.

    ``sources``: resolved source names per split (files, ``save_to_disk`` directories, ``hub:`` ids);
    ``settings``: the TokenizeSettings as a dict; ``kl``: unpaired examples get KL sequences.
    """
    import tokenizers
    import transformers

    from raydpo import __version__
    from raydpo.config_rules import unpaired
    from raydpo.models import resolve_local
    from raydpo.reference.cache import fingerprint_tokenizer

    names = [n for split in sources.values() for n in split]
    if any(n.startswith("hub:") or n.startswith("<") for n in names):
        return None
    d, is_unpaired = cfg.data, unpaired(cfg.loss)
    return {
        "format": FORMAT,
        "raydpo": {"version": __version__, "data_code": code_digest()},
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "sources": {split: [[n, _source_digest(n)] for n in split_names] for split, split_names in sources.items()},
        "tokenizer": {"fingerprint": fingerprint_tokenizer(resolve_local(cfg.model.name_or_path)),
                      "trust_remote_code": cfg.model.trust_remote_code},
        "tokenization": settings,
        "parsing": {"format": d.format, "columns": d.columns, "prompt_marker": d.prompt_marker,
                    "shared_prompt": d.shared_prompt, "deduplicate": d.deduplicate,
                    "eval_fraction": d.eval_fraction if not sources.get("eval") else 0.0},
        "unpaired": {"unpair_pairs": d.unpair_pairs, "kl_group": cfg.train.micro_batch_size, "kl": kl} if is_unpaired else None,
    }


def entry_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def load(root: str, key: str) -> tuple[list[pa.Table] | None, dict, list[str]]:
    """(the entry's tables in block order, its manifest, []) on a sound hit; (None, {}, problems)
    otherwise. A damaged or unreadable entry is removed, so this run rebuilds it."""
    from raydpo.reference import store

    entry = os.path.join(root, key)
    if not os.path.exists(os.path.join(entry, store.MANIFEST)):
        return None, {}, []
    try:
        bad = store.problems(entry)
        manifest = store.read_manifest(entry)
        if not bad:
            tables = [pq.read_table(os.path.join(entry, "data", s["file"])) for s in manifest["shards"]]
            if sum(t.num_rows for t in tables) == manifest["rows"]:
                return tables, manifest, []
            bad = [f"{sum(t.num_rows for t in tables)} rows, the manifest says {manifest['rows']}"]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        bad = [f"unreadable ({e})"]
    shutil.rmtree(entry, ignore_errors=True)
    return None, {}, bad


def save(root: str, key: str, inputs: dict, tables: list[pa.Table], files: list[str]) -> str:
    """Write ``tables`` as entry ``key`` (one shard per block, in order), atomically: a reader sees
    the whole entry or none. Returns the entry directory (another run's copy if it got there first)."""
    from raydpo.reference import store

    final = os.path.join(root, key)
    part = os.path.join(root, f"{key}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.join(part, "data"))
    shards = []
    for i, table in enumerate(tables):
        name = f"shard-{i:06d}.parquet"
        path = os.path.join(part, "data", name)
        pq.write_table(table, path)
        shards.append({"file": name, "rows": table.num_rows, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
    manifest = {"key": key, "kind": "tokenized", "format": FORMAT, "created": time.time(), "inputs": inputs,
                "paths": {"files": files}, "rows": sum(s["rows"] for s in shards), "shards": shards}
    with open(os.path.join(part, store.MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    try:
        os.rename(part, final)
    except OSError:
        shutil.rmtree(part)
        if not os.path.exists(os.path.join(final, store.MANIFEST)):
            raise
    return final


def _cache_inputs(cfg, train, eval) -> dict | None:
    """The tokenized-data cache's key inputs, or None where this run cannot use the cache."""
    from raydpo.config_rules import loss_names
    from raydpo.data.sources import source_names
    from raydpo.data.stage import tokenize_settings

    if not cfg.data.cache or train is not None or eval is not None:
        return None
    sources = {"train": source_names(cfg.data.train, "train"), "eval": source_names(cfg.data.eval, "test")}
    return key_inputs(cfg, sources, tokenize_settings(cfg).__dict__, kl="kto" in loss_names(cfg.loss))


def cached_or_tokenized(cfg, train=None, eval=None) -> tuple[object, list[str], dict]:
    """(every row with its status, the source names, how the cache served them): from the
    tokenized-data cache on a hit, else from :func:`read_and_tokenize` (then written to the cache)."""
    from raydpo.observability import console
    from raydpo.data.local import blocks, from_tables
    from raydpo.data.stage import read_and_tokenize

    inputs = _cache_inputs(cfg, train, eval)
    if inputs is None:
        reason = "off (data.cache)" if not cfg.data.cache else "off for ray.data.Dataset and hub data set inputs"
        return *read_and_tokenize(cfg, train, eval), {"hit": False, "status": reason}
    root, key = cache_root(cfg), entry_key(inputs)
    tables, manifest, bad = load(root, key)
    if bad:
        console.get().say(f"data: tokenized-data cache entry {key} is damaged ({bad[0]}); removed, tokenizing again")
    if tables is not None:
        console.get().say(f"data: tokenized-data cache hit, {manifest['rows']:,} rows, no tokenizer started: {os.path.join(root, key)}")
        return from_tables(tables), manifest["paths"]["files"], {"hit": True, "key": key, "entry": os.path.join(root, key)}
    processed, files = read_and_tokenize(cfg, train, eval)
    entry = save(root, key, inputs, list(blocks(processed)), files)
    return processed, files, {"hit": False, "key": key, "entry": entry, "status": "rebuilt" if bad else "written"}
