"""The reference stage: score pairs on a Ray Data actor pool once, then serve them from the cache."""

from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from raydpo.observability import console
from raydpo.config import Config, pool_size, reference_dtype, reference_path, reference_trusts_code
from raydpo.data.local import blocks, from_tables
from raydpo.reference import cache, store

#: What the cache stores per pair (and what the train stage reads).
CACHED_COLUMNS = ["pair_id", "digest", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


@dataclass
class ReferenceResult:
    """A split's scored pairs and how they were obtained."""

    dataset: object
    """``ray.data.Dataset`` with ``CACHED_COLUMNS``."""
    entry: str
    """The cache entry directory."""
    key: str
    """The cache key."""
    cache_hit: bool
    """True when no reference model was loaded for this split."""
    pairs_scored: int
    """Pairs the pool scored in this run (0 on a hit)."""
    seconds: float
    """Wall time of the stage for this split (in streaming mode: until training could start)."""
    seal: Optional[Callable[[], str]] = None
    """Streaming mode only: call once the dataset has been read to the end; it checks and seals the
    cache entry and returns its directory. None when the entry is already sealed."""


def cache_inputs(cfg: Config, digests: list[bytes], tokenize_settings: dict) -> dict:
    """Every input the reference log-probs depend on, spelled out for the manifest.

    ``digests``: the token digest of every pair to score. Paths are not part of the key (the same
    files at another mount point hit); fingerprints are.
    """
    import torch
    import transformers

    from raydpo.models import resolve_local

    ref_dir = resolve_local(reference_path(cfg))
    tok_dir = resolve_local(cfg.model.name_or_path)
    return {
        "reference": {"fingerprint": cache.fingerprint_model(ref_dir), "trust_remote_code": reference_trusts_code(cfg)},
        "tokenizer": {"fingerprint": cache.fingerprint_tokenizer(tok_dir)},
        "tokenization": tokenize_settings,
        "data": cache.data_digest(digests),
        "dtype": reference_dtype(cfg),
        "quantization": cfg.reference.quantization if cfg.reference.backend == "hf" else None,
        "backend": cfg.reference.backend,
        # LD-DPO-weighted sums are other numbers: never served from (or as) a cache of plain sums.
        "logps": "sum_completion_float32" + ("" if cfg.loss.ld_alpha is None else f"_ld_alpha={cfg.loss.ld_alpha!r}"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
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
    from raydpo.models import resolve_local

    r = cfg.reference
    model_path = resolve_local(reference_path(cfg))
    # LD-DPO's weights follow the two-row batch's scored positions (HfBackend): no packed rows then.
    share_prompt = (r.share_prompt and r.backend == "hf" and cfg.loss.ld_alpha is None
                    and packs_exactly(model_path, reference_trusts_code(cfg)))
    return {
        "model_path": model_path,
        "dtype": reference_dtype(cfg),
        "pad_id": pad_id,
        "trust_remote_code": reference_trusts_code(cfg),
        "attn_implementation": r.attn_implementation,
        "shard_dir": shard_dir,
        "max_tokens": r.max_tokens_per_batch,
        "logits_chunk_tokens": cfg.model.logits_chunk_tokens,
        "ld_alpha": cfg.loss.ld_alpha,
        "pad_to_multiple_of": cfg.train.pad_to_multiple_of,
        "quantization": r.quantization,
        "backend": r.backend,
        "share_prompt": share_prompt,
        "workers_dir": os.path.join(os.path.abspath(cfg.output.dir), "workers"),
        "backend_options": {"max_model_len": r.vllm_max_model_len or cfg.data.max_length,
                            "gpu_memory_utilization": r.vllm_gpu_memory_utilization} if r.backend == "vllm" else None,
    }


def score_pairs(pairs, cfg: Config, pad_id: int, shard_dir: str | None = None, scorer=None):
    """Lazily add reference log-probs to ``pairs`` on the reference actor pool.

    ``shard_dir``: also write each scored batch there as a cache shard. ``scorer``: the actor class
    (default :class:`raydpo.reference.scorer.ReferenceScorer`; tests substitute a failing one).
    """
    from raydpo.reference.scorer import ReferenceScorer

    return pairs.map_batches(
        scorer or ReferenceScorer,
        fn_constructor_kwargs=scorer_kwargs(cfg, pad_id, shard_dir),
        batch_size=cfg.reference.batch_size,
        batch_format="pyarrow",
        **pool_options(cfg.reference),
    )


def in_input_order(tables: list, entry: str):
    """The pairs of ``tables`` (input order) with their log-probs from the finished ``entry``, as a
    materialized dataset: training sees pairs in input order whatever order the shards were written
    in (the same order as a streaming run), and one cache serves data sets listing the same pairs
    in another order. Pairs with equal token digests have equal log-probs."""
    return from_tables(with_logps(tables, entry))


def with_logps(tables: list, entry: str) -> list:
    """``tables`` (pyarrow, ``CACHED_COLUMNS[:5]`` and any extra columns) with the log-prob columns from
    ``entry`` appended."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    logps = {}
    for name in sorted(os.listdir(os.path.join(entry, "data"))):
        shard = pq.read_table(os.path.join(entry, "data", name), columns=["digest", *CACHED_COLUMNS[5:]])
        logps.update(zip(shard["digest"].to_pylist(), zip(*(shard[c].to_pylist() for c in CACHED_COLUMNS[5:]))))
    out = []
    for t in tables:
        values = [logps[d] for d in t["digest"].to_pylist()]
        for i, name in enumerate(CACHED_COLUMNS[5:]):
            t = t.append_column(name, pa.array([v[i] for v in values], pa.float32()))
        out.append(t)
    return out


def drive(scored_ds, label: str, total: int) -> None:
    """Run the pool to the end (the actors write the shards), showing pairs/s and an ETA."""
    out, rate = console.get(), console.Rate("pairs", total)
    start, done = time.perf_counter(), 0
    for batch in scored_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        done += batch.num_rows
        out.update(f"reference-{label}", f"reference {label}: {done:,}/{total:,} pairs scored{rate.suffix(done)}")
    elapsed = time.perf_counter() - start
    out.update(f"reference-{label}", f"reference {label}: {done:,} pairs scored in {console.duration(elapsed)} "
                                     f"({done / max(elapsed, 1e-9):,.1f} pairs/s incl. loading the model)", final=True)


def run_reference(pairs, cfg: Config, pad_id: int, tokenize_settings: dict, scorer=None, stream: bool = False,
                  label: str = "train") -> ReferenceResult:
    """Return the scored pairs from the cache, scoring what the cache lacks first.

    A complete, verified entry is a hit (no model loaded). Otherwise the pairs that no shard of the
    key's partial entry holds yet are scored (all of them on a first run; only the rest after an
    interrupted run or a damaged shard), and the entry is sealed once it holds every pair exactly once.

    ``stream``: on a miss with nothing scored yet, return at once with the pool's *lazy* output as
    the dataset (the consumer, the trainer, drives the scoring) and ``seal`` to call when it has
    read everything; resumed entries are completed first. ``label``: the split, for the console.
    """
    start = time.perf_counter()
    # Unpaired examples' label rides along (not part of the cache: the digest covers the tokens).
    tables = [t.select(CACHED_COLUMNS[:5] + [c for c in ("label",) if c in t.column_names]) for t in blocks(pairs)]
    digests = [d for t in tables for d in t["digest"].to_pylist()]
    inputs = cache_inputs(cfg, digests, tokenize_settings)
    key = cache.cache_key(inputs)
    entry, damaged = store.lookup(cfg.reference.cache_dir, key)
    if damaged:
        sys.stderr.write(f"[raydpo] reference cache entry {key} was damaged and is completed again: {'; '.join(damaged[:5])}\n")
    if entry is not None:
        console.get().say(f"reference {label}: cache hit, {len(digests):,} pairs' log-probs read from {entry} (no model loaded)")
        return ReferenceResult(in_input_order(tables, entry), entry, key, True, 0, time.perf_counter() - start)
    part, done, dropped = store.open_partial(cfg.reference.cache_dir, key)
    resumed = sum(done.values()) > 0
    todo = [t for t in (store.remaining(t, done) for t in tables) if t.num_rows]
    scored = sum(t.num_rows for t in todo)
    paths = {"reference": reference_path(cfg), "tokenizer": cfg.model.name_or_path}

    def seal() -> str:
        return store.finalize(cfg.reference.cache_dir, key, inputs, collections.Counter(digests), paths)

    scored_ds = score_pairs(from_tables(todo), cfg, pad_id, os.path.join(part, "data"), scorer) if todo else None
    low, high = pool_size(cfg.reference.num_actors)
    pool = f"{low}" if low == high else f"{low}-{high}"
    already = f"; {len(digests) - scored:,} already in the partial cache entry" if resumed else ""
    if stream and scored_ds is not None and not resumed:
        console.get().say(f"reference {label}: {scored:,} pairs are scored on {pool} actor(s) as the trainer reads them "
                          "(reference.mode=streaming)")
        return ReferenceResult(scored_ds, part, key, False, scored, time.perf_counter() - start, seal)
    if scored_ds is not None:
        console.get().say(f"reference {label}: cache miss, scoring {scored:,} pairs on {pool} actor(s){already}")
        drive(scored_ds, label, scored)
    entry = seal()
    return ReferenceResult(in_input_order(tables, entry), entry, key, scored == 0, scored, time.perf_counter() - start)
