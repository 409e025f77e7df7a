"""The per-worker training loop run by Ray Train (one DeepSpeed rank per worker).

Each worker reads its shard of the scored pairs (token ids + cached reference log-probs), runs
one concatenated chosen+rejected forward of the policy per micro-batch and the preference loss
against the cached reference; there is no reference model in the trainer.
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import torch


def _global_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """All-reduce per-rank metric sums (a fixed key order on every rank)."""
    from raydpo.train.devices import all_reduce

    keys = sorted(sums)
    device = next(iter(sums.values())).device
    packed = torch.stack([torch.as_tensor(sums[k], device=device).float() for k in keys])
    return dict(zip(keys, all_reduce(packed).tolist()))


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _add(acc: dict, new: dict) -> dict:
    return {k: acc.get(k, 0.0) + v for k, v in new.items()}


def rank_mean(value: torch.Tensor) -> torch.Tensor:
    """A 0-d statistic averaged over all ranks (KTO's KL term: TRL's ``gather_for_metrics(kl).mean()``)."""
    import torch.distributed as dist

    from raydpo.train.devices import all_reduce

    if not dist.is_initialized():
        return value
    return all_reduce(value) / dist.get_world_size()


def step_metrics(engine, batch: dict, loss_cfg, chunk_tokens=None, shard=None, across_ranks: bool = True,
                 ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Loss (mean over pairs or examples), metric sums and the policy's sequence log-probs ([2B]:
    chosen then rejected, or completions then KL sequences) of one micro-batch. batch from
    ``collate_rows``; ``loss_cfg`` the ``loss`` section; ``chunk_tokens`` ``model.logits_chunk_tokens``;
    ``shard`` this rank's sequence-parallel part; ``across_ranks``: KTO's KL estimate is averaged over
    the ranks (training, where every rank steps together), else this rank's batch alone (eval). With
    an MoE router loss (``loss.router_aux_loss_coef``, :func:`aux_coef`) the loss includes it."""
    from raydpo.logprobs import forward_scores
    from raydpo.objectives import preference_loss, with_aux_loss

    coef = aux_coef(engine, loss_cfg)
    scores = forward_scores(engine, batch, chunk_tokens, shard, loss_cfg.ld_alpha, loss_cfg.use_weighting, coef != 0)
    logps = scores.logps
    ref = (batch["ref_chosen_logps"], batch["ref_rejected_logps"]) if "ref_chosen_logps" in batch else None
    _, (losses, _, _), sums = preference_loss(logps, batch["completion_tokens"], ref, loss_cfg, batch.get("label"),
                                              rank_mean if across_ranks else None, scores.plain, scores.aligned)
    loss, sums = with_aux_loss(losses.mean(), sums, scores.aux_loss, coef)
    # Real tokens: padding-free rows' fillers carry sequence id 2B and are not counted.
    sums["tokens"] = (batch["attention_mask"].sum() if "attention_mask" in batch
                      else (batch["sequence_ids"] < logps.shape[0]).sum()).float()
    if shard is not None and shard.rank:  # the group's ranks hold the same pairs: counted once
        sums = {k: v * 0 for k, v in sums.items()}
    return loss, sums, logps


def aux_coef(engine, loss_cfg) -> float:
    """The MoE router loss weight for the policy in ``engine`` (0: off; TRL's reading of
    ``loss.router_aux_loss_coef``, :func:`raydpo.config.rules.router_aux_coef`)."""
    from raydpo.config.rules import router_aux_coef
    from raydpo.logprobs.chunked import unwrap

    return router_aux_coef(loss_cfg, unwrap(engine).config)


def evaluate(engine, rows: dict, mb: int, pad_id: int, loss_cfg, padding_free: bool = False, one_row: bool = False,
             chunk_tokens=None, pad_to_multiple_of=None) -> dict[str, float]:
    """Metric means over this worker's whole eval split, reduced over all workers (each its own
    pairs, whole: sequence parallelism is off in eval).

    ``rows``: the split as numpy columns (:func:`raydpo.train.batches.load_rows`, loaded once per
    run), read in micro-batches of ``mb`` pairs, the last one partial."""
    from raydpo.data.collate import collate_rows
    from raydpo.objectives import mean_metrics, metric_keys

    engine.eval()
    sums: dict = {}
    n = len(rows["prompt_ids"]) if rows else 0
    with torch.no_grad():
        for start in range(0, n, mb):
            raw = {k: v[start : start + mb] for k, v in rows.items()}
            batch = collate_rows(raw, pad_id, padding_free=padding_free, one_row=one_row, pad_to_multiple_of=pad_to_multiple_of)
            _, s, _ = step_metrics(engine, to_device(batch, engine.device), loss_cfg, chunk_tokens, across_ranks=False)
            sums = _add(sums, s)
    engine.train()
    if not sums:  # an empty shard still joins the collective with zeros
        sums = {k: torch.tensor(0.0, device=engine.device) for k in metric_keys(loss_cfg, aux_coef(engine, loss_cfg) != 0)}
    totals = _global_sums({k: torch.as_tensor(v) for k, v in sums.items()})
    totals.pop("tokens")
    return {f"eval/{k}": v for k, v in mean_metrics(totals).items()} | {"eval/pairs": totals["count"]}


def _float_or_none(value) -> float | None:
    """DeepSpeed's grad norm: a float, a 0-d tensor, or None where the stage does not compute it."""
    return None if value is None else float(value)


def _say(line: str) -> None:
    # Not print(): Ray Train patches print into a logger *and* tees it to stdout, doubling every line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MetricsLog:
    """metrics.jsonl, the experiment trackers and the driver's relay, fed by rank 0 only.

    The driver shows these rows on the console from the relay (:mod:`raydpo.train.relay`), wherever
    rank 0 runs. The file is for later readers: appended in place on a filesystem; on an object
    store (no appends) the whole object is rewritten at most every ``flush_s`` seconds, at every
    checkpoint (:meth:`flush`) and at the end. ``rows``: what the file already holds."""

    def __init__(self, path: str | None, active: bool, trackers=None, relay=None, rows: list[dict] | None = None,
                 flush_s: float = 10.0):
        from raydpo import storage

        self.path, self.active, self.trackers, self.relay = path, active, trackers, relay
        self.remote = path is not None and storage.is_uri(path)
        self.rows, self.flush_s, self.flushed, self.dirty = list(rows or []), flush_s, time.monotonic(), False

    def write(self, row: dict) -> None:
        if not self.active:
            return
        from raydpo import storage

        if self.relay is not None:
            self.relay.log.remote(row)  # calls from one process arrive in order; nothing to wait for
        if self.path is not None and not self.remote:
            storage.append_text(self.path, json.dumps(row) + "\n")
        elif self.path is not None:
            self.rows.append(row)
            self.dirty = True
            if time.monotonic() - self.flushed > self.flush_s:
                self.flush()
        if self.trackers is not None:
            self.trackers.log(row)

    def flush(self) -> None:
        """Write out what an object store has not seen yet (a no-op on a filesystem)."""
        if self.active and self.remote and self.dirty:
            from raydpo import storage

            storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
            self.flushed, self.dirty = time.monotonic(), False


def _epoch_source(config: dict, rank: int, t):
    # rank: this worker's data-parallel rank (its sequence-parallel group's).
    """epoch -> that epoch's micro-batches (numpy column dicts) for this worker.

    From this worker's in-memory split in a replayable order (``config["train_splits"]``), or from
    the streaming Ray Data shard (streaming reference mode)."""
    import ray.train

    from raydpo.train.batches import epoch_order, load_rows, micro_batches, take

    if config.get("train_splits") is None:
        shard = ray.train.get_dataset_shard("train")
        return lambda epoch: micro_batches(shard, t.micro_batch_size, t.seed + epoch, t.group_by_length)
    rows = load_rows(config["train_splits"][rank])
    return lambda epoch: (take(rows, i) for i in epoch_order(rows, t.micro_batch_size, t.seed, epoch, t.group_by_length))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: the resolved run config plus driver-computed sizes and the
    driver's ``relay`` (:mod:`raydpo.train.relay`)."""
    import ray
    import ray.train

    from raydpo import storage
    from raydpo.config import from_dict
    from raydpo.data.collate import collate_rows
    from raydpo.objectives import mean_metrics
    from raydpo.train.checkpoint import Position, restore, save, trim_metrics
    from raydpo.observability.workers import peak_memory, record
    from raydpo.models import hidden_size, weights_bytes
    from raydpo.train.devices import lean_host_allocator, release_host_memory, worker_device
    from raydpo.train.engine import build_engine, deepspeed_config
    from raydpo.train.export import export_model, settled
    from raydpo.train.guard import check, token_drift
    from raydpo.train.policy import activations, build_policy, trainable_summary
    from raydpo.train.sequence_parallel import setup as setup_sp
    from raydpo.observability import quiet
    from raydpo.observability.trackers import Trackers
    from raydpo.train.batches import load_rows

    cfg = from_dict(config["cfg"])
    quiet.setup_process(cfg.logging.console)  # a cluster raydpo did not start has no setup hook
    t, pad_id = cfg.train, config["pad_id"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(t.seed + rank)
    loss_cfg = cfg.loss
    # Flash-attention varlen skips the masked blocks of one long packed row; sdpa / eager compute them.
    one_row = (cfg.model.attn_implementation or "").startswith("flash_attention")

    device = worker_device(t.use_gpu, t.cpus_per_worker)
    lean_host_allocator(device, weights_bytes(config["model_path"]))
    ds_config = deepspeed_config(t, cfg.model.dtype, hidden_size(config["model_path"], cfg.model.trust_remote_code))
    model = build_policy(cfg.model, config["model_path"], device, sequence_parallel=t.sequence_parallel_size > 1,
                         ds_config=ds_config)
    params = trainable_summary(model)
    mpu, sp = setup_sp(model, t.sequence_parallel_size, t.zero_stage, 1 if t.padding_free else 2 * t.micro_batch_size)
    shard = sp.shard() if sp else None
    engine, scheduler = build_engine(model, t, cfg.model.dtype, config["total_steps"], mpu, ds_config)
    release_host_memory()  # what loading freed, back to the OS before the first step
    chunk = cfg.model.logits_chunk_tokens
    # from_pretrained returns eval mode; training must run in train mode even with no eval split
    # (gradient checkpointing and any dropout kept on act only there).
    engine.train()
    if rank == 0 and cfg.logging.console != "quiet":
        _say(f"[raydpo] policy: {params['trainable_params']:,} of {params['total_params']:,} parameters trainable")
    eval_rows = load_rows(config["eval_splits"][rank]) if config.get("eval_splits") else None
    metrics_path = storage.join(config["output_dir"], "metrics.jsonl")
    relay = config.get("relay")
    epoch_batches = _epoch_source(config, rank // t.sequence_parallel_size, t)
    per_epoch = config["steps_per_epoch"] * t.gradient_accumulation_steps

    def run_eval(step: int) -> dict:
        if eval_rows is None:
            return {}
        row = {"step": step, **evaluate(engine, eval_rows, t.micro_batch_size, pad_id, loss_cfg, t.padding_free, one_row, chunk,
                                        t.pad_to_multiple_of), "time": time.time()}
        log.write(row)
        return row

    position = restore(engine, rank)
    started = {"rank": rank, "start_step": position.step if position else 0, "started": time.time()}
    record(storage.join(config["output_dir"], "workers"), f"rank{rank}", **started)
    kept = trim_metrics(metrics_path, position) if rank == 0 else []
    if rank == 0 and relay is not None:
        ray.get(relay.start.remote(kept, position.step if position else 0))
    trackers = Trackers(config.get("trackers") if rank == 0 else None, config.get("tracker_params", {}),
                        position.step if position else None)
    log = MetricsLog(metrics_path, rank == 0, trackers, relay, kept)
    try:
        if position is None:
            step, epoch, micro, last_eval = 0, 0, 0, run_eval(0)
            guard_pending = config.get("guard") is not None
        else:  # the policy has moved on from the reference: no guard, no step-0 eval
            step, epoch, micro, last_eval, guard_pending = position.step, position.epoch, position.micro, {}, False
            if rank == 0 and cfg.logging.console != "quiet":
                _say(f"[raydpo] resumed from the checkpoint at step {step} (epoch {epoch}, micro-batch {micro})")
        sums, last_train = {}, {}
        step_start = time.perf_counter()
        while step < config["total_steps"]:
            for raw in itertools.islice(epoch_batches(epoch), micro, None):
                if step >= config["total_steps"] or micro >= per_epoch:
                    continue  # drain the epoch so every shard iterator finishes together
                batch = to_device(collate_rows(raw, pad_id, padding_free=t.padding_free, one_row=one_row,
                                               pad_to_multiple_of=t.pad_to_multiple_of), engine.device)
                with activations(cfg.model, engine.device):
                    loss, s, logps = step_metrics(engine, batch, loss_cfg, chunk, shard)
                if guard_pending:  # before the first update the policy is the reference
                    cached = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
                    drift = token_drift(logps, cached, batch["completion_tokens"])
                    check(drift, config["guard"]["tolerance"], relay, rank == 0, config["guard"]["entry"])
                    guard_pending = False
                engine.backward(loss)
                lr = scheduler.get_last_lr()[0]
                engine.step()
                sums = _add(sums, {k: v.detach() for k, v in s.items()})
                micro += 1
                if micro % t.gradient_accumulation_steps:
                    continue
                step += 1
                totals = _global_sums(sums)
                elapsed = time.perf_counter() - step_start
                # The first step is always logged: its wall time tells how soon training started.
                if step % t.log_every == 0 or step in (1, config["total_steps"]):
                    last_train = {
                        "step": step,
                        "epoch": epoch,
                        **{k: v for k, v in mean_metrics(totals).items() if k != "tokens"},
                        "learning_rate": lr,
                        "grad_norm": _float_or_none(engine.get_global_grad_norm()),
                        "pairs_per_s": totals["count"] / elapsed,
                        "tokens_per_s": totals["tokens"] / elapsed,
                        "step_time_s": elapsed,
                        "time": time.time(),
                    }
                    log.write(last_train)
                if t.eval_every and step % t.eval_every == 0 and step != config["total_steps"]:
                    last_eval = run_eval(step)
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step != config["total_steps"]:
                    log.flush()  # the file holds every row up to the checkpoint a restart trims back to
                    at = Position(step, epoch + 1, 0) if micro >= per_epoch else Position(step, epoch, micro)
                    save(engine, at, rank, {"step": step})
                sums, step_start = {}, time.perf_counter()
            epoch, micro = epoch + 1, 0
        last_eval = run_eval(step)
        export_model(settled(engine), storage.join(config["output_dir"], "model"), rank == 0, cfg.model, config["model_path"],
                     cfg.output.save_adapter_only)
        log.flush()
        # Again at the end, with what this worker's memory peaked at (loading, training, export).
        record(storage.join(config["output_dir"], "workers"), f"rank{rank}", **started, **peak_memory(), finished=time.time())
        if rank == 0 and relay is not None:
            ray.get(relay.finish.remote({"steps": step, "epochs_started": epoch, "params": params, "final": last_train,
                                         "final_eval": last_eval}))
    except BaseException:
        trackers.close(ok=False)
        raise
    trackers.close(ok=True)
    # Every worker reports once, so Ray Train sees the same number of reports on each rank.
    ray.train.report({"steps": step, **{k: v for k, v in last_train.items() if isinstance(v, (int, float))}})
