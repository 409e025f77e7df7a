"""The tokenized-data cache: the data stage's result, content-addressed, so a later run skips tokenizing.

An entry ``<data cache root>/<key>/`` holds ``manifest.json`` (every key input spelled out, the
resolved source names, shards with row counts and sha256) and ``<writer>/shard-<n>.parquet``: every row
the data stage read, with its status, reason and token ids (``raydpo.data.stage.OUT_SCHEMA``), after
de-duplication and KL pairing, in the stage's block order. A hit rebuilds the same table, so the
kept pairs, the quarantine file and the counts are those of the run that wrote it.

The key covers what the table depends on: each source file's path and bytes (paths are in the rows
and the quarantine file), the tokenizer (:func:`raydpo.data.tokenizer.tokenizer_key`: the class
``AutoTokenizer`` picked, its serialized pipeline, special tokens and chat template, and its files),
every tokenization and parsing setting, the KL group size of unpaired losses, and raydpo's version
plus a digest of ``raydpo/data``'s own code (so a changed tokenizing rule never serves old ids). Hub data set ids and ``ray.data.Dataset`` inputs are
not cached: they have no file bytes to address. Entries live in the same kind of store as the
reference cache's (:mod:`raydpo.storage.entries`: safe for concurrent writers on a local disk, NFS or
an object store; checked shard by shard; listed and pruned by ``raydpo cache``). The shards are
written and read by Ray tasks on the cluster; the driver reads the manifest. A damaged entry is
rebuilt by the run that finds it, and the new manifest replaces the damaged one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

from raydpo import storage
from raydpo.storage import entries

#: 3: the key holds the tokenizer's class and pipeline, not its files alone (2 served one class's
#: ids to another reading the same files); an entry of another format is never a hit.
FORMAT = 3
DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def cache_root(cfg) -> str:
    """``data.cache_dir``, or ``tokenized`` beside ``reference.cache_dir`` (a local path or URI)."""
    if cfg.data.cache_dir:
        return storage.normalize(cfg.data.cache_dir)
    return storage.join(storage.parent(storage.normalize(cfg.reference.cache_dir)), "tokenized")


def _source_digest(name: str, memo) -> str:
    """sha256 of a source file (local or URI), or of every file under a ``save_to_disk`` directory.
    A local file's comes from ``memo`` (:class:`raydpo.storage.fingerprint.StatMemo`) while its stat
    is unchanged; an object's is read each time (an object store's mtime has one-second ticks)."""
    def one(path: str) -> str:
        return storage.sha256_of(path) if storage.is_uri(path) else memo.digest(path)

    if storage.kind(name) != "dir":
        return one(name)
    h = hashlib.sha256()
    for e in storage.listing(name, recursive=True):
        if not e.is_dir:
            h.update(e.relative.encode() + b"\0" + one(e.path).encode())
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
    from raydpo.config.rules import unpaired
    from raydpo.data.tokenizer import tokenizer_key
    from raydpo.storage.fingerprint import host_memo

    names = [n for split in sources.values() for n in split]
    if any(n.startswith("hub:") or n.startswith("<") for n in names):
        return None
    d, is_unpaired = cfg.data, unpaired(cfg.loss)
    memo = host_memo()  # input files hashed once per file and stat, not per run
    try:
        sources_digests = {split: [[n, _source_digest(n, memo)] for n in names] for split, names in sources.items()}
    finally:
        memo.save()
    return {
        "format": FORMAT,
        "raydpo": {"version": __version__, "data_code": code_digest()},
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "sources": sources_digests,
        "tokenizer": tokenizer_key(cfg.model.name_or_path, cfg.model.trust_remote_code, memo),
        "tokenization": settings,
        "parsing": {"format": d.format, "columns": d.columns, "prompt_marker": d.prompt_marker,
                    "shared_prompt": d.shared_prompt, "deduplicate": d.deduplicate,
                    "eval_fraction": d.eval_fraction if not sources.get("eval") else 0.0},
        "unpaired": {"unpair_pairs": d.unpair_pairs, "kl_group": cfg.train.micro_batch_size, "kl": kl} if is_unpaired else None,
    }


def entry_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def read_shards(root: str, key: str, shards: list[dict]):
    """On the cluster: every shard of an entry, each checked against the manifest, then each
    table's block metadata. Returned as ``len(shards) + 1`` values (:func:`load` asks Ray for as many
    refs), so the tables stay in the object store, owned by the driver, never fetched by it."""
    from raydpo.data.blocks import block_metadata
    from raydpo.reference.store import read_table

    tables = [read_table(entries.read_shard(root, key, s)) for s in shards]
    return (*tables, [block_metadata(t) for t in tables])


def load(root: str, key: str):
    """(a materialized dataset of the entry's tables in block order, its manifest, []) on a sound
    hit; (None, {}, problems) otherwise. A damaged entry is left in place: this run writes a new one,
    whose manifest replaces the damaged one's."""
    import ray

    from raydpo.data.blocks import materialized
    from raydpo.storage.remote import on_cluster

    manifest = entries.read_manifest(root, key)
    if manifest is None:
        return None, {}, []
    if manifest.get("format") != FORMAT or not manifest.get("writer") or not manifest.get("shards"):
        return None, manifest, [f"format {manifest.get('format')} with {len(manifest.get('shards') or [])} shards, "
                                f"this raydpo writes {FORMAT}"]
    n = len(manifest["shards"])
    try:
        *refs, metadata = on_cluster(read_shards, root, key, manifest["shards"], num_returns=n + 1)
        metadata = ray.get(metadata)
    except (ValueError, FileNotFoundError) as e:  # a shard missing or not matching its manifest (not a read error)
        return None, manifest, [str(getattr(e, "cause", None) or e).strip().splitlines()[-1]]
    if sum(m.num_rows for m in metadata) != manifest["rows"]:
        return None, manifest, [f"{sum(m.num_rows for m in metadata)} rows, the manifest says {manifest['rows']}"]
    return materialized(refs, metadata), manifest, []


def write_entry(root: str, key: str, inputs: dict, block_refs: list, files: list[str], replacing: dict | None) -> dict:
    """On the cluster: write the data stage's blocks (``block_refs``, in order) as a new writer's
    shards of ``key`` and publish it; returns the published manifest (another run's if it won)."""
    import ray

    from raydpo.reference.store import table_bytes

    writer = entries.new_writer()
    shards = []
    for i, ref in enumerate(block_refs):
        table = ray.get(ref)
        relative = f"{writer}/shard-{i:06d}.parquet"
        data = table_bytes(table)
        storage.write_bytes(storage.join(root, key, relative), data)
        shards.append(entries.shard_record(relative, data, table.num_rows))
    manifest = {"key": key, "kind": "tokenized", "format": FORMAT, "created": time.time(), "writer": writer,
                "inputs": inputs, "paths": {"files": files}, "rows": sum(s["rows"] for s in shards), "shards": shards}
    published, mine = entries.publish(root, key, manifest, replacing)
    if not mine:
        entries.discard_unlisted(root, key, writer, published)
    return published


def _cache_inputs(cfg, train, eval) -> dict | None:
    """The tokenized-data cache's key inputs, or None where this run cannot use the cache."""
    from raydpo.config.rules import loss_names
    from raydpo.data.sources import source_names
    from raydpo.data.stage import tokenize_settings

    if not cfg.data.cache or train is not None or eval is not None:
        return None
    sources = {"train": source_names(cfg.data.train, "train"), "eval": source_names(cfg.data.eval, "test")}
    return key_inputs(cfg, sources, tokenize_settings(cfg).__dict__, kl="kto" in loss_names(cfg.loss))


def cached_or_tokenized(cfg, train=None, eval=None) -> tuple[object, list[str], dict]:
    """(every row with its status, the source names, how the cache served them): from the
    tokenized-data cache on a hit, else from :func:`read_and_tokenize` (then written to the cache)."""
    from raydpo.data.stage import read_and_tokenize
    from raydpo.observability import console
    from raydpo.storage.remote import on_cluster

    inputs = _cache_inputs(cfg, train, eval)
    if inputs is None:
        reason = "off (data.cache)" if not cfg.data.cache else "off for ray.data.Dataset and hub data set inputs"
        return *read_and_tokenize(cfg, train, eval), {"hit": False, "status": reason}
    root, key = cache_root(cfg), entry_key(inputs)
    entry = storage.join(root, key)
    found, manifest, bad = load(root, key)
    if bad:
        console.get().say(f"data: tokenized-data cache entry {entry} is damaged ({bad[0]}); tokenizing again to replace it")
    if found is not None:
        console.get().say(f"data: tokenized-data cache hit, {manifest['rows']:,} rows, no tokenizer started: {entry}")
        return found, manifest["paths"]["files"], {"hit": True, "key": key, "entry": entry}
    processed, files = read_and_tokenize(cfg, train, eval)
    on_cluster(write_entry, root, key, inputs, processed.to_arrow_refs(), files, manifest if bad else None)
    return processed, files, {"hit": False, "key": key, "entry": entry, "status": "rebuilt" if bad else "written"}
