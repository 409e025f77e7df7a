"""``raydpo online``'s driver of the trainer: rounds from the round queue (the Ray Train entry point).

The worker builds its :class:`raydpo.train.trainer.Trainer` once (the same trainer ``raydpo train``
drives, with every feature of it), then loops: take the round's job from the round queue
(:mod:`raydpo.online.rounds`), train the job's steps on its split of the round's pairs, gather the
full weights when the round syncs (rank 0 puts them in Ray's object store), checkpoint through Ray
Train at round boundaries, post the round's result. No process, model or engine is made per round.
"""

from __future__ import annotations

import os
import time


def round_batches(rows: dict, mb: int, seed: int, round_: int, group_by_length: bool):
    """Micro-batches over this rank's pairs of one round, epoch after epoch, endlessly (the step
    count decides when to stop); each epoch's order is a pure function of (seed, round, epoch)."""
    from raydpo.train.batches import epoch_order, take

    epoch = 0
    while True:
        for index in epoch_order(rows, mb, seed + 1000 * round_, epoch, group_by_length):
            yield take(rows, index)
        epoch += 1


def put_weights(trainer):
    """The policy's full weights into the object store (a collective); rank 0 gets the ref, others None."""
    import ray

    state = trainer.weights()
    return ray.put(state) if trainer.rank == 0 else None


def train_round(trainer, job: dict, round_: int) -> dict:
    """Round ``round_``'s steps on this rank's split; returns the round's result (rank 0 posts it)."""
    import itertools

    import ray

    from raydpo.objectives import mean_metrics
    from raydpo.train.metrics import add_sums

    t, start, sums, rows = trainer.t, time.perf_counter(), {}, []
    if job["steps"]:
        batches = round_batches(ray.get(job["splits"][trainer.rank]), t.micro_batch_size, t.seed, round_, t.group_by_length)
        for _ in range(job["steps"]):
            row = trainer.train_step(list(itertools.islice(batches, t.gradient_accumulation_steps)))
            sums = add_sums(sums, trainer.totals)
            rows.append({"step": trainer.step, "round": round_, **row})
    drift = {"guard/max_token_drift": trainer.guard_drift} if round_ == 0 and trainer.guard_drift is not None else {}
    return {"round": round_, "steps": len(rows), "step": trainer.step, "train_s": time.perf_counter() - start,
            "metrics": {k: v for k, v in mean_metrics(sums).items() if k != "tokens"} if sums else {},
            "pairs_trained": sums.get("count", 0.0), "step_rows": rows, **drift}


def trained_by() -> list:
    """Every rank's pid (the test that no worker is restarted between rounds)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [os.getpid()]
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    return pids


def online_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: the resolved config, ``queue`` (RoundQueue handle),
    ``model_path``, ``pad_id``, ``total_steps`` (for the schedule), ``guard`` and ``output_dir``."""
    import ray
    import ray.train

    from raydpo import storage
    from raydpo.config import from_dict
    from raydpo.observability import quiet
    from raydpo.observability.workers import record
    from raydpo.train.checkpoint import Position, checkpoint_name
    from raydpo.train.trainer import Trainer

    cfg = from_dict(config["cfg"])
    quiet.setup_process(cfg.logging.console)  # a cluster raydpo did not start has no setup hook
    queue = config["queue"]
    trainer = Trainer(cfg, config["model_path"], config["pad_id"], config["total_steps"], config.get("guard"))
    rank, position = trainer.rank, trainer.restore()
    round_ = position.epoch if position else 0  # a round checkpoint's epoch is the rounds done
    record(storage.join(config["output_dir"], "workers"), f"rank{rank}", rank=rank, start_round=round_)
    # Resumed: the generators start from the initial weights and need the checkpoint's.
    weights = put_weights(trainer) if position is not None else None
    answered = ray.get(queue.worker_ready.remote(rank, {"pid": os.getpid(), "rounds_done": round_, "step": trainer.step,
                                                        "weights": [weights] if rank == 0 else None}))
    del weights  # the queue's copy is the only one: once the generators have it, it is freed
    while (job := ray.get(queue.job.remote(round_, answered))) is not None:
        if job.get("abort"):  # the driver failed: leave without exporting a model of an unfinished run
            ray.train.report({"round": round_, "step": trainer.step})
            return
        if job.get("weights_only"):  # a generator joined late: it gets the trainer's current weights
            weights = put_weights(trainer)
            if rank == 0:
                ray.get(queue.post_weights.remote(job["request"], [weights]))
            del weights
            answered = job["request"]
            continue
        result = train_round(trainer, job, round_)
        sync_start = time.perf_counter()
        weights = put_weights(trainer) if job["sync"] else None
        result |= {"gather_s": time.perf_counter() - sync_start, "pids": trained_by(), "weights": [weights]}
        del weights
        report = {"round": round_, "step": trainer.step}
        if job["checkpoint"]:
            at = Position(trainer.step, round_ + 1, 0)  # epoch = rounds done
            trainer.checkpoint(at, report, checkpoint_name(at, rounds=True))
        else:  # every worker reports once per round either way (Ray Train needs equal counts)
            ray.train.report(report)
        if rank == 0:
            # The step rows go to the driver, the one writer of metrics.jsonl and the trackers in online runs.
            ray.get(queue.post_result.remote(round_, result))
        del result
        round_ += 1
    trainer.export(storage.join(config["output_dir"], "model"))
    ray.train.report({"round": round_, "step": trainer.step})
