"""The reference stage: score pairs on a Ray Data actor pool once, then serve them from the cache."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from raydpo import storage
from raydpo.observability import console
from raydpo.config import Config, pool_size, reference_dtype, reference_path, reference_trusts_code
from raydpo.data.blocks import Column, block_metadata, map_blocks, materialized, reduce_blocks, refs_of
from raydpo.reference import cache, store

#: What the cache stores per pair (and what the train stage reads).
CACHED_COLUMNS = ["pair_id", "digest", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


@dataclass
class ReferenceResult:
    """A split's scored pairs and how they were obtained."""

    dataset: object
    """``ray.data.Dataset`` with ``CACHED_COLUMNS``."""
    entry: str
    """The cache entry's location (a local directory or URI)."""
    key: str
    """The cache key."""
    cache_hit: bool
    """True when no reference model was loaded for this split."""
    pairs_scored: int
    """Pairs the pool scored in this run (0 on a hit)."""
    seconds: float
    """Wall time of the stage for this split (in streaming mode: until training could start)."""
    seal: Optional[Callable[[], str]] = None
    """Streaming mode only: call once the dataset has been read to the end; it checks and publishes
    the cache entry and returns its location. None when the entry is already published."""


def cache_inputs(cfg: Config, digests, tokenize_settings: dict) -> dict:
    """Every input the reference log-probs depend on, spelled out for the manifest.

    ``digests``: the token digest of every pair to score (a list, or a
    :class:`raydpo.data.blocks.Column` of them, hashed on the cluster). Paths are not part of the
    key (the same files at another mount point hit); fingerprints are.
    """
    from importlib.metadata import version

    from raydpo.data.tokenizer import tokenizer_key
    from raydpo.models import resolve_local
    from raydpo.storage.fingerprint import host_memo
    from raydpo.storage.remote import on_cluster

    ref_dir = resolve_local(reference_path(cfg))
    memo = host_memo()  # weights hashed once per file and stat, not per run
    return {
        "reference": {"fingerprint": cache.fingerprint_model(ref_dir, memo), "trust_remote_code": reference_trusts_code(cfg)},
        "tokenizer": tokenizer_key(cfg.model.name_or_path, cfg.model.trust_remote_code, memo),
        "tokenization": tokenize_settings,
        "data": on_cluster(cache.data_digest, digests) if digests else cache.data_digest([]),
        "dtype": reference_dtype(cfg),
        "quantization": cfg.reference.quantization if cfg.reference.backend == "hf" else None,
        "backend": cfg.reference.backend,
        # LD-DPO-weighted sums are other numbers: never served from (or as) a cache of plain sums.
        "logps": "sum_completion_float32" + ("" if cfg.loss.ld_alpha is None else f"_ld_alpha={cfg.loss.ld_alpha!r}"),
        # From the installed packages' metadata (the same strings as torch.__version__ and
        # transformers.__version__): a cache hit imports no torch into the driver (about 2 s).
        "versions": {"torch": version("torch"), "transformers": version("transformers")},
    }


def pool_options(r) -> dict:
    """``map_batches`` arguments placing and sizing the reference pool (``r``: ReferenceConfig).

    A fixed ``num_actors`` gives a pool of that size; ``[min, max]`` lets Ray Data add actors while
    batches wait. Custom resources and an accelerator type steer the pool onto other node types
    than the trainers; a dead actor is restarted and its batches retried: always (Ray Data's
    default), or up to the limits set in the config. Ray Data 2.60 takes those limits only as loose
    remote arguments, which it has deprecated with no named replacement yet: they are passed only
    when set.
    """
    import ray.data

    low, high = pool_size(r.num_actors)
    compute = ray.data.ActorPoolStrategy(size=low) if low == high else ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    options = {
        "compute": compute,
        "num_cpus": r.num_cpus_per_actor,
        "num_gpus": r.num_gpus_per_actor,
    }
    options |= {k: v for k, v in (("max_restarts", r.max_restarts), ("max_task_retries", r.max_task_retries)) if v is not None}
    if r.resources:
        options["resources"] = dict(r.resources)
    if r.accelerator_type:
        options["accelerator_type"] = r.accelerator_type
    return options


_SAID: set = set()


def packs_exactly(model_path: str, trust_remote_code: bool) -> bool:
    """Whether this model's packed reference rows can be masked exactly (raydpo.families.rules); if
    not, say once why the pool scores chosen and rejected rows separately instead."""
    from transformers import AutoConfig

    from raydpo.families.rules import packed_mask_issue

    issue = packed_mask_issue(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code))
    if issue and model_path not in _SAID:
        _SAID.add(model_path)
        console.get().say(f"reference: one packed row per pair is off for this model ({issue}); chosen and rejected "
                          "rows are scored separately (same numbers, the prompt computed twice)")
    return issue is None


def scorer_kwargs(cfg: Config, pad_id: int, shard_dir: str | None = None) -> dict:
    """Constructor arguments of :class:`raydpo.reference.scorer.ReferenceScorer` for this config."""
    from raydpo.models import pin, resolve_local

    r = cfg.reference
    # LD-DPO's weights follow the two-row batch's scored positions (HfBackend): no packed rows then.
    share_prompt = (r.share_prompt and r.backend == "hf" and cfg.loss.ld_alpha is None
                    and packs_exactly(resolve_local(reference_path(cfg)), reference_trusts_code(cfg)))
    return {
        "model_path": pin(reference_path(cfg)),  # a hub id at the revision the cache key fingerprinted
        "dtype": reference_dtype(cfg),
        "pad_id": pad_id,
        "trust_remote_code": reference_trusts_code(cfg),
        "attn_implementation": r.attn_implementation,
        "shard_dir": shard_dir,
        "max_tokens": r.max_tokens_per_batch,
        "batch_size": r.batch_size,
        "logits_chunk_tokens": cfg.model.logits_chunk_tokens,
        "ld_alpha": cfg.loss.ld_alpha,
        "pad_to_multiple_of": cfg.train.pad_to_multiple_of,
        "quantization": r.quantization,
        "backend": r.backend,
        "share_prompt": share_prompt,
        "workers_dir": storage.join(cfg.output.dir, "workers"),
        "backend_options": {"max_model_len": r.vllm_max_model_len or cfg.data.max_length,
                            "gpu_memory_utilization": r.vllm_gpu_memory_utilization} if r.backend == "vllm" else None,
    }


def shard_batch(n: int, r) -> int:
    """Pairs per actor call, and so per cache shard, for ``n`` pairs (``r``: ReferenceConfig):
    ``shard_rows``, or fewer so that each actor of the largest pool gets about four; a multiple of
    ``batch_size`` (the forward passes inside stay ``batch_size`` pairs, as they were)."""
    high = pool_size(r.num_actors)[1]
    rows = min(r.shard_rows, max(r.batch_size, -(-n // (4 * high))))
    return max(r.batch_size, rows // r.batch_size * r.batch_size)


def score_pairs(pairs, cfg: Config, pad_id: int, shard_dir: str | None = None, scorer=None):
    """Lazily add reference log-probs to ``pairs`` (materialized) on the reference actor pool.

    ``shard_dir``: also write each actor call's pairs there as one cache shard. ``scorer``: the
    actor class (default :class:`raydpo.reference.scorer.ReferenceScorer`; tests substitute a
    failing one).
    """
    from raydpo.reference.scorer import ReferenceScorer

    return pairs.map_batches(
        scorer or ReferenceScorer,
        fn_constructor_kwargs=scorer_kwargs(cfg, pad_id, shard_dir),
        batch_size=shard_batch(pairs.count(), cfg.reference),
        batch_format="pyarrow",
        **pool_options(cfg.reference),
    )


@dataclass
class Found:
    """What the cache holds for a key (:func:`find`)."""

    manifest: Optional[dict]
    """The published entry's manifest when it is sound (a hit), else None."""
    logps: object
    """On a hit: a ref to the entry's log-prob columns (``digest`` plus the columns, one row per
    digest), left in the object store."""
    adopted: list
    """On a miss: shards other writers left that this run takes over."""
    done: object
    """On a miss: the digests the adopted shards hold (a Counter)."""
    damaged: Optional[dict]
    """The published manifest this run's entry will replace, when that one was damaged."""


def find(root: str, key: str, digests, where: str) -> Found:
    """Look ``key`` up, and on a miss adopt what other writers left; both read shards, so both run on
    the cluster. Damage and unreadable leftovers are said on stderr (``where`` names the entry).
    ``digests``: a list or a :class:`raydpo.data.blocks.Column`."""
    import ray

    from raydpo.storage.remote import on_cluster

    # One read of each shard on a hit: checked against its sha256 and its log-prob columns kept
    # (in the object store: the driver fetches the verdict, not the log-probs).
    manifest, logps, *rest = on_cluster(store.lookup, root, key, num_returns=5)
    manifest, damaged, bad_files, damaged_manifest = ray.get([manifest, *rest])
    if damaged:
        sys.stderr.write(f"[raydpo] reference cache entry {where} is damaged and is completed again: {'; '.join(damaged[:5])}\n")
    if manifest is not None:
        return Found(manifest, logps, [], None, None)
    adopted, done, unreadable = on_cluster(store.scan_and_adopt, root, key, digests, bad_files)
    if unreadable:
        sys.stderr.write(f"[raydpo] reference cache {where}: {len(unreadable)} shard(s) left by other writers are unreadable "
                         f"and not used (left in place): {'; '.join(unreadable[:3])}\n")
    return Found(None, None, adopted, done, damaged_manifest)


def logps_for(tables: list, root: str, key: str, manifest: dict) -> list:
    """``tables`` with their log-probs from the published entry (:func:`with_logps`); the shards are
    read on the cluster and only the log-prob columns come back."""
    from raydpo.storage.remote import on_cluster

    return with_logps(tables, on_cluster(store.load_logps, root, key, manifest))


def _cached_columns(t):
    # Unpaired examples' label rides along (not part of the cache: the digest covers the tokens).
    return t.select(CACHED_COLUMNS[:5] + [c for c in ("label",) if c in t.column_names])


def _joined(t, logps):
    return with_logps([_cached_columns(t)], logps)[0]


def in_input_order(refs: list, logps):
    """The pairs of blocks ``refs`` (input order) with their log-probs (``logps``: a ref to an entry's
    log-prob columns), as a materialized dataset joined by a task per block: training sees pairs in
    input order whatever order the shards were written in (the same order as a streaming run), and
    one cache serves data sets listing the same pairs in another order. Pairs with equal token
    digests have equal log-probs."""
    return map_blocks(_joined, refs, logps)


def _remaining(tables, done, n: int):
    """The rows of each block whose digest the adopted shards ``done`` do not hold (consumed in block
    order: a duplicate pair is scored as often as it is missing), then the blocks' metadata."""
    out = [store.remaining(_cached_columns(t), done) for t in tables]
    assert len(out) == n, (len(out), n)
    return (*out, [block_metadata(t) for t in out])


def to_score(refs: list, done) -> object:
    """The pairs the cache lacks, as a materialized dataset (a task per block, or on a resume one
    task that consumes ``done`` block by block)."""
    import ray

    if not sum(done.values()):
        return map_blocks(_cached_columns, refs)
    *tables, metadata = reduce_blocks(_remaining, refs, done, len(refs), num_returns=len(refs) + 1)
    return materialized(tables, ray.get(metadata))


def with_logps(tables: list, logps) -> list:
    """``tables`` (pyarrow, ``CACHED_COLUMNS[:5]`` and any extra columns) with the log-prob columns of
    ``logps`` (``digest`` plus the columns, one row per digest, sorted by digest: :func:`store.load_logps`)
    appended, rows in their order."""
    import pyarrow as pa

    out = []
    for t in tables:
        at, missing = store.positions_of(t["digest"], logps)
        if t.num_rows and missing:
            raise ValueError(f"{missing} pairs have no log-probs in the reference cache entry")
        for name in CACHED_COLUMNS[5:]:
            t = t.append_column(name, logps[name].take(at) if t.num_rows else pa.array([], pa.float32()))
        out.append(t)
    return out


def drive(scored_ds, label: str, total: int) -> None:
    """Run the pool to the end (the actors write the shards), showing pairs/s and an ETA."""
    out, rate = console.get(), console.Rate("pairs", total)
    start, done = time.perf_counter(), 0
    for bundle in scored_ds.iter_internal_ref_bundles():  # counted from metadata: nothing fetched
        done += bundle.num_rows()
        out.update(f"reference-{label}", f"reference {label}: {done:,}/{total:,} pairs scored{rate.suffix(done)}")
    elapsed = time.perf_counter() - start
    out.update(f"reference-{label}", f"reference {label}: {done:,} pairs scored in {console.duration(elapsed)} "
                                     f"({done / max(elapsed, 1e-9):,.1f} pairs/s incl. loading the model)", final=True)


def run_reference(pairs, cfg: Config, pad_id: int | None, tokenize_settings: dict, scorer=None, stream: bool = False,
                  label: str = "train") -> ReferenceResult:
    """Return the scored pairs from the cache, scoring what the cache lacks first.

    A published entry whose shards check out is a hit (no model loaded). Otherwise this run is a
    new writer of the key: it adopts the shards other writers left (an interrupted run's, a
    concurrent run's, a damaged entry's sound ones), scores the remaining pairs into its own prefix,
    and publishes the entry once it holds every pair exactly once (:mod:`raydpo.reference.store`).

    ``stream``: on a miss with nothing adopted, return at once with the pool's *lazy* output as
    the dataset (the consumer, the trainer, drives the scoring) and ``seal`` to call when it has
    read everything. ``label``: the split, for the console. ``pad_id``: the tokenizer's pad id
    the actors pad with (None: read from the policy's tokenizer, only on a miss).
    """
    from raydpo.cluster import say_if_waiting
    from raydpo.storage import entries
    from raydpo.storage.remote import on_cluster

    start = time.perf_counter()
    root = storage.normalize(cfg.reference.cache_dir)
    # The driver holds block refs and counts; the digests are read where the blocks are.
    refs, n_pairs = refs_of(pairs), pairs.count()
    digests = Column(refs, "digest")
    inputs = cache_inputs(cfg, digests, tokenize_settings)
    key = cache.cache_key(inputs)
    entry = storage.join(root, key)
    found = find(root, key, digests, entry)
    if found.manifest is not None:
        console.get().say(f"reference {label}: cache hit, {n_pairs:,} pairs' log-probs read from {entry} (no model loaded)")
        return ReferenceResult(in_input_order(refs, found.logps), entry, key, True, 0, time.perf_counter() - start)
    resumed = sum(found.done.values()) > 0
    todo = to_score(refs, found.done)
    scored = todo.count()
    paths = {"reference": reference_path(cfg), "tokenizer": cfg.model.name_or_path}
    writer = entries.new_writer()

    def seal() -> str:
        published = on_cluster(store.finalize, root, key, writer, found.adopted, inputs, digests, paths, found.damaged)
        seal.manifest = published
        return entry

    if scored and pad_id is None:
        from raydpo.models import load_tokenizer

        pad_id = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code).pad_token_id
    scored_ds = score_pairs(todo, cfg, pad_id, entries.writer_path(root, key, writer), scorer) if scored else None
    low, high = pool_size(cfg.reference.num_actors)
    if scored_ds is not None:
        r = cfg.reference
        say_if_waiting(f"reference {label}", low, {"CPU": r.num_cpus_per_actor, "GPU": r.num_gpus_per_actor, **r.resources})
    pool = f"{low}" if low == high else f"{low}-{high}"
    already = f"; {n_pairs - scored:,} already in shards other writers left" if resumed else ""
    if stream and scored_ds is not None and not resumed:
        console.get().say(f"reference {label}: {scored:,} pairs are scored on {pool} actor(s) as the trainer reads them "
                          "(reference.mode=streaming)")
        return ReferenceResult(scored_ds, entry, key, False, scored, time.perf_counter() - start, seal)
    if scored_ds is not None:
        console.get().say(f"reference {label}: cache miss, scoring {scored:,} pairs on {pool} actor(s){already}")
        drive(scored_ds, label, scored)
    seal()
    logps = on_cluster(store.load_logps, root, key, seal.manifest, fetch=False)  # read and kept on the cluster
    return ReferenceResult(in_input_order(refs, logps), entry, key, scored == 0, scored, time.perf_counter() - start)
