"""``raydpo train``'s driver of the trainer: epochs over this worker's pairs (the Ray Train entry point).

Each worker reads its shard of the scored pairs (token ids + cached reference log-probs) and hands
them, an optimizer step's micro-batches at a time, to its :class:`raydpo.train.trainer.Trainer`;
this module decides what the epochs are, when to log, evaluate and checkpoint, and where a resumed
run picks up. The online round loop (:mod:`raydpo.online.worker`) drives the same trainer.
"""

from __future__ import annotations

import itertools
import time

from raydpo import storage


def _epoch_source(config: dict, rank: int, t):
    """epoch -> that epoch's micro-batches (numpy column dicts) for this worker (``rank``: its
    data-parallel rank, its sequence-parallel group's).

    From this worker's in-memory split in a replayable order (``config["train_splits"]``), or from
    the streaming Ray Data shard (streaming reference mode)."""
    import ray.train

    from raydpo.train.batches import epoch_order, load_rows, micro_batches, take

    if config.get("train_splits") is None:
        shard = ray.train.get_dataset_shard("train")
        return lambda epoch: micro_batches(shard, t.micro_batch_size, t.seed + epoch, t.group_by_length)
    rows = load_rows(config["train_splits"][rank])
    return lambda epoch: (take(rows, i) for i in epoch_order(rows, t.micro_batch_size, t.seed, epoch, t.group_by_length))


class EpochRun:
    """One worker's offline run around its trainer: the metrics log, evaluations, checkpoints, and
    the position a restarted worker resumes from. ``config``: :func:`train_loop_per_worker`'s."""

    def __init__(self, trainer, config: dict):
        import ray

        from raydpo.observability.trackers import Trackers
        from raydpo.observability.workers import record
        from raydpo.train.batches import load_rows
        from raydpo.train.checkpoint import trim_metrics
        from raydpo.train.metrics import MetricsLog

        self.trainer, self.config, self.t = trainer, config, trainer.t
        rank, relay = trainer.rank, config.get("relay")
        self.eval_rows = load_rows(config["eval_splits"][rank]) if config.get("eval_splits") else None
        self.batches = _epoch_source(config, rank // self.t.sequence_parallel_size, self.t)
        self.per_epoch = config["steps_per_epoch"] * self.t.gradient_accumulation_steps
        self.position = trainer.restore()
        start = self.position.step if self.position else 0
        self.started = {"rank": rank, "start_step": start, "started": time.time()}
        record(storage.join(config["output_dir"], "workers"), f"rank{rank}", **self.started)
        path = storage.join(config["output_dir"], "metrics.jsonl")
        kept = trim_metrics(path, self.position) if rank == 0 else []
        if rank == 0 and relay is not None:
            ray.get(relay.start.remote(kept, start))
        self.trackers = Trackers(config.get("trackers") if rank == 0 else None, config.get("tracker_params", {}),
                                 start if self.position else None)
        self.log = MetricsLog(path, rank == 0, self.trackers, relay, kept)
        self.last_train: dict = {}
        self.last_eval: dict = {}

    def evaluate(self, step: int) -> dict:
        if self.eval_rows is None:
            return {}
        row = {"step": step, **self.trainer.evaluate(self.eval_rows), "time": time.time()}
        self.log.write(row)
        return row

    def train(self) -> int:
        """Every step of the run (from the restored position); returns the epochs started."""
        t, trainer, total, p = self.t, self.trainer, self.config["total_steps"], self.position
        epoch, micro = (p.epoch, p.micro) if p else (0, 0)
        if p is None:
            self.last_eval = self.evaluate(0)
        elif trainer.rank == 0 and trainer.cfg.logging.console != "quiet":
            from raydpo.train.metrics import say

            say(f"[raydpo] resumed from the checkpoint at step {p.step} (epoch {epoch}, micro-batch {micro})")
        while trainer.step < total:
            batches = itertools.islice(self.batches(epoch), micro, None)
            while trainer.step < total and micro < self.per_epoch:
                group = list(itertools.islice(batches, t.gradient_accumulation_steps))
                if len(group) < t.gradient_accumulation_steps:
                    break
                row = trainer.train_step(group)
                micro += len(group)
                self._after_step(row, epoch, micro)
            for _ in batches:  # drain the epoch so every shard iterator finishes together
                pass
            epoch, micro = epoch + 1, 0
        self.last_eval = self.evaluate(trainer.step)
        return epoch

    def _after_step(self, row: dict, epoch: int, micro: int) -> None:
        """Log (the first step always: its wall time tells how soon training started), evaluate and
        checkpoint on their schedules; never at the last step, which :meth:`train` ends itself."""
        from raydpo.train.checkpoint import Position

        t, step, total = self.t, self.trainer.step, self.config["total_steps"]
        if step % t.log_every == 0 or step in (1, total):
            self.last_train = {"step": step, "epoch": epoch, **row}
            self.log.write(self.last_train)
        if t.eval_every and step % t.eval_every == 0 and step != total:
            self.last_eval = self.evaluate(step)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step != total:
            self.log.flush()  # the file holds every row up to the checkpoint a restart trims back to
            at = Position(step, epoch + 1, 0) if micro >= self.per_epoch else Position(step, epoch, micro)
            self.trainer.checkpoint(at, {"step": step})

    def finish(self, epochs: int) -> None:
        """After the export: the log's last rows, this worker's memory peak, rank 0's outcome to the driver."""
        import ray

        from raydpo.observability.workers import peak_memory, record

        trainer, relay = self.trainer, self.config.get("relay")
        self.log.flush()
        # Again at the end, with what this worker's memory peaked at (loading, training, export).
        record(storage.join(self.config["output_dir"], "workers"), f"rank{trainer.rank}", **self.started, **peak_memory(),
               finished=time.time())
        if trainer.rank == 0 and relay is not None:
            ray.get(relay.finish.remote({"steps": trainer.step, "epochs_started": epochs, "params": trainer.params,
                                         "final": self.last_train, "final_eval": self.last_eval}))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: the resolved run config (``cfg``) plus the driver's
    ``model_path``, ``pad_id``, ``steps_per_epoch``, ``total_steps``, ``output_dir``, ``guard``,
    ``relay`` (:mod:`raydpo.train.relay`), the splits and the trackers."""
    import ray.train

    from raydpo.config import from_dict
    from raydpo.observability import quiet
    from raydpo.train.metrics import say
    from raydpo.train.trainer import Trainer

    cfg = from_dict(config["cfg"])
    quiet.setup_process(cfg.logging.console)  # a cluster raydpo did not start has no setup hook
    trainer = Trainer(cfg, config["model_path"], config["pad_id"], config["total_steps"], config.get("guard"), config.get("relay"))
    if trainer.rank == 0 and cfg.logging.console != "quiet":
        p = trainer.params
        say(f"[raydpo] policy: {p['trainable_params']:,} of {p['total_params']:,} parameters trainable")
    run = EpochRun(trainer, config)
    try:
        epochs = run.train()
        trainer.export(storage.join(config["output_dir"], "model"))
        run.finish(epochs)
    except BaseException:
        run.trackers.close(ok=False)
        raise
    run.trackers.close(ok=True)
    # Every worker reports once, so Ray Train sees the same number of reports on each rank.
    ray.train.report({"steps": trainer.step, **{k: v for k, v in run.last_train.items() if isinstance(v, (int, float))}})
