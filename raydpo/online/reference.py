"""The reference pool of an online run: started once, it scores each round's new pairs.

The offline stage's Ray Data pool lives for one dataset execution; here the round's pairs arrive
one round at a time, so the pool is a set of long-lived :class:`ReferenceScorer` actors that keep the
model loaded across rounds. Results go through the same content-addressed cache (a re-run of an
interrupted round reads the pairs it already scored).
"""

from __future__ import annotations

import pyarrow as pa

from raydpo import storage
from raydpo.config import Config, pool_size
from raydpo.online.pool import RestartingPool, actor_options
from raydpo.reference import cache, store
from raydpo.reference.stage import cache_inputs, find, logps_for, scorer_kwargs, with_logps


class RoundReference:
    """``reference.num_actors`` (its lower bound) scorer actors placed by the ``reference`` section."""

    def __init__(self, cfg: Config, pad_id: int, tokenize_settings: dict):
        from raydpo.reference.scorer import ReferenceScorer

        r = cfg.reference
        self.cfg = cfg
        # Fingerprints hash the weight files: once per run, not per round; only the data part changes.
        self.inputs = cache_inputs(cfg, [], tokenize_settings)
        self.pool = RestartingPool(ReferenceScorer, scorer_kwargs(cfg, pad_id), pool_size(r.num_actors)[0],
                                   actor_options(r.num_cpus_per_actor, r.num_gpus_per_actor, r.resources, r.accelerator_type),
                                   None if r.max_restarts in (None, -1) else r.max_restarts, "reference pool")

    def score(self, pairs: pa.Table) -> tuple[pa.Table, bool, float]:
        """(``pairs`` + ``ref_chosen_logps`` / ``ref_rejected_logps``, cache hit, seconds in the actors)."""
        from raydpo.storage import entries
        from raydpo.storage.remote import on_cluster

        digests = pairs["digest"].to_pylist()
        inputs = {**self.inputs, "data": cache.data_digest(digests)}
        key = cache.cache_key(inputs)
        root = storage.normalize(self.cfg.reference.cache_dir)
        found = find(root, key, digests, storage.join(root, key))
        if found.manifest is not None:
            import ray

            return with_logps([pairs], ray.get(found.logps))[0], True, 0.0
        todo = store.remaining(pairs, found.done)
        writer = entries.new_writer()
        b = self.cfg.reference.batch_size
        batches = [todo.slice(i, b) for i in range(0, todo.num_rows, b)]
        seconds, scored = 0.0, []
        for batch, out in zip(batches, self.pool.map("timed_score", [tuple(batch[c].to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
                                                                     for batch in batches])):
            chosen, rejected, s = out
            seconds += s
            batch = batch.append_column("ref_chosen_logps", pa.array(chosen, pa.float32()))
            scored.append(batch.append_column("ref_rejected_logps", pa.array(rejected, pa.float32())))
        # A round's pairs in shards of reference.shard_rows (a round is usually one shard).
        scored = pa.concat_tables(scored) if scored else todo
        for i in range(0, scored.num_rows, self.cfg.reference.shard_rows):
            store.write_shard(entries.writer_path(root, key, writer), scored.slice(i, self.cfg.reference.shard_rows))
        manifest = on_cluster(store.finalize, root, key, writer, found.adopted, inputs, digests,
                              {"reference": self.cfg.reference.name_or_path or self.cfg.model.name_or_path}, found.damaged)
        return logps_for([pairs], root, key, manifest)[0], False, seconds

    def shutdown(self) -> None:
        self.pool.shutdown()

