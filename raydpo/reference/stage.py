"""The reference stage: score pairs on a Ray Data actor pool once, then serve them from the cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

from raydpo.config import Config, reference_dtype, reference_path
from raydpo.reference import cache

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
    """Wall time of the stage for this split."""


def cache_inputs(cfg: Config, pairs, tokenize_settings: dict) -> dict:
    """Every input the reference log-probs depend on, spelled out for the manifest.

    Paths are not part of the key (the same files at another mount point hit); fingerprints are.
    """
    import torch
    import transformers

    from raydpo.models import resolve_local

    ref_dir = resolve_local(reference_path(cfg))
    tok_dir = resolve_local(cfg.model.name_or_path)
    digests = (d for b in pairs.select_columns(["digest"]).iter_batches(batch_format="pyarrow") for d in b["digest"].to_pylist())
    return {
        "reference": {"fingerprint": cache.fingerprint_model(ref_dir), "trust_remote_code": cfg.model.trust_remote_code},
        "tokenizer": {"fingerprint": cache.fingerprint_tokenizer(tok_dir)},
        "tokenization": tokenize_settings,
        "data": cache.data_digest(digests),
        "dtype": reference_dtype(cfg),
        "backend": "hf",
        "logps": "sum_completion_float32",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def score_pairs(pairs, cfg: Config, pad_id: int):
    """Lazily add reference log-probs to ``pairs`` on an actor pool of ``reference.num_actors``."""
    import ray.data

    from raydpo.models import resolve_local
    from raydpo.reference.scorer import ReferenceScorer

    r = cfg.reference
    return pairs.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={
            "model_path": resolve_local(reference_path(cfg)),
            "dtype": reference_dtype(cfg),
            "pad_id": pad_id,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
        compute=ray.data.ActorPoolStrategy(size=r.num_actors),
        batch_size=r.batch_size,
        batch_format="pyarrow",
        num_cpus=r.num_cpus_per_actor,
        num_gpus=r.num_gpus_per_actor,
    )


def run_reference(pairs, cfg: Config, pad_id: int, tokenize_settings: dict) -> ReferenceResult:
    """Return the scored pairs from the cache, scoring and caching them first on a miss."""
    import ray.data

    start = time.perf_counter()
    inputs = cache_inputs(cfg, pairs, tokenize_settings)
    key = cache.cache_key(inputs)
    entry = cache.lookup(cfg.reference.cache_dir, key)
    scored = 0
    if entry is None:
        scored_ds = score_pairs(pairs.select_columns(CACHED_COLUMNS[:5]), cfg, pad_id)
        scored = pairs.count()
        paths = {"reference": reference_path(cfg), "tokenizer": cfg.model.name_or_path}
        entry = cache.write_entry(cfg.reference.cache_dir, key, inputs, lambda d: scored_ds.write_parquet(d), paths)
    dataset = ray.data.read_parquet(f"{entry}/data")
    return ReferenceResult(dataset, entry, key, scored == 0, scored, time.perf_counter() - start)
