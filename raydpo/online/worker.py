"""The online run's Ray Train worker: one policy, one DeepSpeed engine, every round.

The worker builds its engine once, then loops: take the round's job from the round queue
(:mod:`raydpo.online.rounds`), train the job's steps on its split of the round's pairs, gather the
full weights when the round syncs (rank 0 puts them in Ray's object store), checkpoint through Ray
Train at round boundaries, post the round's result. No process, model or engine is made per round.
"""

from __future__ import annotations

import os
import time

import torch


def round_batches(rows: dict, mb: int, seed: int, round_: int, group_by_length: bool):
    """Micro-batches over this rank's pairs of one round, epoch after epoch, endlessly (the step
    count decides when to stop); each epoch's order is a pure function of (seed, round, epoch)."""
    from raydpo.train.batches import epoch_order, take

    epoch = 0
    while True:
        for index in epoch_order(rows, mb, seed + 1000 * round_, epoch, group_by_length):
            yield take(rows, index)
        epoch += 1


def online_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: the resolved config, ``queue`` (RoundQueue handle),
    ``model_path``, ``pad_id``, ``total_steps`` (for the schedule) and ``output_dir``."""
    import ray
    import ray.train
    import torch.distributed as dist

    from raydpo import storage
    from raydpo.config import from_dict
    from raydpo.data.collate import collate_rows
    from raydpo.objectives import mean_metrics
    from raydpo.observability import quiet
    from raydpo.online.weights import policy_state
    from raydpo.train.checkpoint import Position, checkpoint_name, restore, save
    from raydpo.models import hidden_size, weights_bytes
    from raydpo.train.devices import lean_host_allocator, release_host_memory, worker_device
    from raydpo.train.engine import build_engine, deepspeed_config
    from raydpo.train.export import export_model, settled
    from raydpo.train.loop import _add, _float_or_none, _global_sums, step_metrics, to_device
    from raydpo.train.policy import activations, build_policy
    from raydpo.observability.workers import record

    cfg = from_dict(config["cfg"])
    quiet.setup_process(cfg.logging.console)  # a cluster raydpo did not start has no setup hook
    t, pad_id, queue = cfg.train, config["pad_id"], config["queue"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(t.seed + rank)
    device = worker_device(t.use_gpu, t.cpus_per_worker)
    lean_host_allocator(device, weights_bytes(config["model_path"]))
    ds_config = deepspeed_config(t, cfg.model.dtype, hidden_size(config["model_path"], cfg.model.trust_remote_code))
    model = build_policy(cfg.model, config["model_path"], device, ds_config=ds_config)
    engine, scheduler = build_engine(model, t, cfg.model.dtype, config["total_steps"], ds_config=ds_config)
    release_host_memory()  # what loading freed, back to the OS before the first step
    engine.train()
    lora = cfg.model.lora.r > 0

    position = restore(engine, rank)
    rounds_done, step = (position.epoch, position.step) if position else (0, 0)
    record(storage.join(config["output_dir"], "workers"), f"rank{rank}", rank=rank, start_round=rounds_done)
    weights = None
    if position is not None:  # resumed: the generators start from the initial weights and need these
        state = policy_state(settled(engine), rank == 0, lora)
        weights = ray.put(state) if rank == 0 else None
    ray.get(queue.worker_ready.remote(rank, {"pid": os.getpid(), "rounds_done": rounds_done, "step": step,
                                             "weights": [weights] if rank == 0 else None}))
    round_ = rounds_done
    while True:
        job = ray.get(queue.job.remote(round_))
        if job is None:
            break
        if job.get("abort"):  # the driver failed: leave without exporting a model of an unfinished run
            ray.train.report({"round": round_, "step": step})
            return
        start, sums, trained, step_rows = time.perf_counter(), {}, 0, []
        if job["steps"]:
            rows = ray.get(job["splits"][rank])
            batches = round_batches(rows, t.micro_batch_size, t.seed, round_, t.group_by_length)
            for _ in range(job["steps"]):
                step_sums, step_start = {}, time.perf_counter()
                for _ in range(t.gradient_accumulation_steps):
                    batch = to_device(collate_rows(next(batches), pad_id, padding_free=t.padding_free,
                                                   pad_to_multiple_of=t.pad_to_multiple_of), engine.device)
                    with activations(cfg.model, engine.device):
                        loss, s, _ = step_metrics(engine, batch, cfg.loss)
                    engine.backward(loss)
                    lr = scheduler.get_last_lr()[0]
                    engine.step()
                    step_sums = _add(step_sums, {k: v.detach() for k, v in s.items()})
                step += 1
                trained += 1
                totals = _global_sums(step_sums)
                sums = _add(sums, totals)
                elapsed = time.perf_counter() - step_start
                step_rows.append({"step": step, "round": round_, **{k: v for k, v in mean_metrics(totals).items() if k != "tokens"},
                           "learning_rate": lr, "grad_norm": _float_or_none(engine.get_global_grad_norm()),
                           "pairs_per_s": totals["count"] / elapsed, "tokens_per_s": totals["tokens"] / elapsed,
                           "step_time_s": elapsed, "time": time.time()})
        train_s = time.perf_counter() - start
        sync_start = time.perf_counter()
        weights = None
        if job["sync"]:
            state = policy_state(settled(engine), rank == 0, lora)
            weights = ray.put(state) if rank == 0 else None
            del state
        gather_s = time.perf_counter() - sync_start
        # Which processes trained this round (the test that no worker is restarted between rounds).
        pids = [None] * dist.get_world_size() if dist.is_initialized() else [os.getpid()]
        if dist.is_initialized():
            dist.all_gather_object(pids, os.getpid())
        result = {"round": round_, "steps": trained, "step": step, "train_s": train_s, "gather_s": gather_s,
                  "metrics": {k: v for k, v in mean_metrics(sums).items() if k != "tokens"} if sums else {},
                  "pairs_trained": sums.get("count", 0.0)}
        report = {"round": round_, "step": step}
        if job["checkpoint"]:
            at = Position(step, round_ + 1, 0)  # epoch = rounds done
            save(engine, at, rank, report, checkpoint_name(at, rounds=True))
        else:  # every worker reports once per round either way (Ray Train needs equal counts)
            ray.train.report(report)
        if rank == 0:
            # The step rows go to the driver, the one writer of metrics.jsonl and the trackers in online runs.
            ray.get(queue.post_result.remote(round_, {**result, "pids": pids, "weights": [weights], "step_rows": step_rows}))
        round_ += 1
    export_model(settled(engine), storage.join(config["output_dir"], "model"), rank == 0, cfg.model, config["model_path"],
                 cfg.output.save_adapter_only)
    ray.train.report({"round": round_, "step": step})
