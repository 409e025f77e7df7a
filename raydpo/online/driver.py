"""The online run's round driver: the pools and the trainer started once, then round after round.

:class:`OnlineRun` owns what lives for the whole run (the generator, judge and reference pools, the
round queue, the Ray Train run in a thread, the trackers, the weights ``online.keep`` holds) and
drives the rounds (:mod:`raydpo.online.phases`); :func:`raydpo.online.run.run_online` prepares
the run directory and hands it the planned run.
"""

from __future__ import annotations

import json
import threading
import time

from raydpo import storage
from raydpo.config import to_dict
from raydpo.observability import console
from raydpo.online import phases, progress
from raydpo.online.phases import append_rows as _append


class TrainerThread(threading.Thread):
    """``trainer.fit()`` in the background; :meth:`wait` waits on a Ray ref while watching it."""

    def __init__(self, trainer):
        super().__init__(daemon=True, name="raydpo-online-trainer")
        self.trainer, self.error = trainer, None

    def run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
            self.error = e

    def wait(self, ref):
        import ray

        while True:
            done, _ = ray.wait([ref], timeout=1.0)
            if done:
                return ray.get(ref)
            if not self.is_alive():
                raise RuntimeError(f"the Ray Train workers stopped: {self.error!r}") from self.error


def trainer_run(plan, queue):
    """The Ray Train run of the whole online run (``plan``: its RunPlan; ``queue``: the RoundQueue)."""
    from ray.train.torch import TorchTrainer

    from raydpo.cluster import resolve_train_cpus
    from raydpo.online.worker import online_loop_per_worker
    from raydpo.train.stage import guard_config, run_config, scaling_config

    cfg = plan.cfg
    resolve_train_cpus(cfg)  # before to_dict: the workers set their torch threads from it
    o = cfg.online
    # constant schedules ignore the total; a decaying one needs steps_per_round (online_checks).
    total = o.rounds * (o.steps_per_round or 1)
    return TorchTrainer(
        online_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "queue": queue, "model_path": plan.model, "pad_id": plan.pad_id, "total_steps": total,
                           "output_dir": storage.normalize(cfg.output.dir),
                           # The reference is the policy's start: round 0's first step checks its log-probs.
                           "guard": guard_config(plan, None)},
        scaling_config=scaling_config(cfg), run_config=run_config(cfg))


def keep_rows(path: str, keep) -> list[dict]:
    """Rewrite the JSON-lines file at ``path`` (local or a URI) with the rows ``keep(row)`` accepts;
    returns them."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return []
    rows = [r for r in (json.loads(line) for line in text.splitlines() if line.strip()) if keep(r)]
    storage.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def track(tracker, steps: list[dict], row: dict) -> None:
    """Feed the trackers the round's training steps (sent by rank 0 with the round's result) and its row.

    The driver is the one tracker writer of an online run: the round rows are made here."""
    for step in steps:
        tracker.log(step)
    # The held-out numbers are of the weights at the round's start: logged at that step.
    held = {k: v for k, v in row.items() if k.startswith(("eval/", "compute/eval"))}
    if held:
        tracker.log({**held, "step": row["step"] - row["steps"], "time": row["time"]})
    tracker.log({k: v for k, v in row.items() if k not in held})


def await_registration(run_storage: str, name: str, timeout_s: float = 120.0) -> None:
    from raydpo.train.resume import latest_registered

    deadline = time.monotonic() + timeout_s
    while latest_registered(run_storage) != name and time.monotonic() < deadline:
        time.sleep(0.05)


def warn_if_falling(rows: list[dict], o) -> None:
    """The console warning when the latest held-out reward gave back more than half of the gain."""
    fall = progress.reward_fall([r.get("eval/reward_mean") for r in rows])
    if fall is not None:
        console.get().say(progress.describe_fall(fall, o.rounds, o.keep), level="quiet")


class OnlineRun:
    """One online run from its planned inputs (``plan``: RunPlan; ``sets``: the prompt sets;
    ``status``: how the run directory started; ``started``: perf_counter at the start)."""

    def __init__(self, plan, sets, status: str, started: float):
        self.plan, self.cfg, self.paths, self.sets = plan, plan.cfg, plan.paths, sets
        self.status, self.started, self.out = status, started, console.get()
        self.tracker = None
        self.rounds: list[dict] = []

    def run(self, on_round=None) -> tuple[dict, list[dict]]:
        """Every round, the final held-out reward and the model; returns (summary, round rows + final row)."""
        import ray

        from raydpo.online import keep
        from raydpo.online.rounds import RoundQueue

        cfg, o = self.cfg, self.cfg.online
        self.pools = phases.start_pools(cfg, self.plan.model, self.plan.pad_id)
        self._say_pools()
        self.queue = ray.remote(RoundQueue).options(num_cpus=0).remote()
        self.trainer = TrainerThread(trainer_run(self.plan, self.queue))
        try:
            self.trainer.start()
            ready = self._resume(self.trainer.wait(self.queue.wait_ready.remote(cfg.train.num_workers)))
            for r in range(self.done, o.rounds):
                self._round(r, on_round)
            final_row, kept = self._final(ready)
            ray.get(self.queue.stop.remote(o.rounds))
            self.trainer.join()
            if self.trainer.error is not None:
                raise self.trainer.error
            self.tracker.close(ok=True)
        except BaseException:
            if self.tracker is not None:
                self.tracker.close(ok=False)
            ray.get(self.queue.stop.remote(0, abort=True))
            self.trainer.join(timeout=120)  # the workers leave their loop; Ray Train's run ends
            raise
        finally:
            phases.stop_pools(self.pools)
        kept_round, kept_reward = o.rounds, final_row.get("eval/reward_mean")
        if kept is not None:
            kept_round, kept_reward = keep.write_kept(cfg, self.plan.model, self.paths["model"], kept, kept_reward)
        return self._finish(final_row, kept_round, kept_reward), self.rounds + [final_row]

    def _say_pools(self) -> None:
        o, pools = self.cfg.online, self.pools
        g, j = o.generator, o.judge
        self.out.say(f"online: {g.num_actors} generator actor(s) ({phases.resolve_backend(g.backend)}), {j.num_actors} judge actor(s) "
                     f"({j.reward_fn or 'reward model ' + str(j.reward_model)})"
                     + (f", {len(pools['reference'].pool.actors)} reference actor(s)" if pools["reference"] is not None
                        else ", no reference (reference-free loss)"))

    def _resume(self, ready: dict) -> dict:
        """Where the workers stand (``ready``: their start info): the run's files trimmed to the
        rounds done, the generators given a checkpoint's weights, the trackers and ``online.keep`` set."""
        from raydpo.observability import trackers

        cfg, paths, o = self.cfg, self.paths, self.cfg.online
        self.done = done = ready[0]["rounds_done"]
        self.rounds = [r for r in keep_rows(paths["metrics"], lambda r: r.get("round", 0) < done) if r.get("kind") == "round"]
        keep_rows(paths["quarantine"], lambda r: r.get("stage") != "judge" or r["round"] < done)
        if not storage.exists(paths["quarantine"]) or done == 0:
            keep_rows(paths["quarantine"], lambda r: r.get("stage") != "prompts")
            _append(paths["quarantine"], self.sets.quarantine)
        # online.keep: the weights the generators hold (rounds trained, handle) and the best evaluated so far.
        self.best = progress.BestWeights(hold=o.keep == "best")
        self.serving = (done, ready[0]["weights"][0] if done and self.best.hold else progress.INITIAL)
        if self.rounds and self.rounds[0]["round"] == 0:  # resumed: the initial model's weights are still its files
            self.best.offer(0, self.rounds[0].get("eval/reward_mean"), progress.INITIAL)
        if ready[0]["weights"][0] is not None:
            phases.sync(self.pools, ready[0].pop("weights")[0], self.queue, self.trainer)
            self.out.say(f"online: resumed after round {done} (step {ready[0]['step']}); the generators have the checkpoint's weights")
        tracking = trackers.resolve(cfg)
        self.tracker = trackers.Trackers(tracking, {**to_dict(cfg), "prompts": self.sets.counts}, ready[0]["step"] if done else None)
        self.out.say(f"online: {cfg.train.num_workers} trainer worker(s) (DeepSpeed ZeRO-{cfg.train.zero_stage}) ready; pids "
                     f"{[ready[r]['pid'] for r in sorted(ready)]}" + (f"; trackers: {trackers.describe(tracking)}" if cfg.logging.backends else ""))
        return ready

    def _round(self, r: int, on_round) -> None:
        """Round ``r`` end to end, its rows written, its checkpoint registered, its line said."""
        from raydpo.train.checkpoint import Position, checkpoint_name

        cfg, paths, o = self.cfg, self.paths, self.cfg.online
        row, steps, weights = phases.one_round(cfg, r, self.sets, self.pools, self.queue, self.trainer, self.plan.pad_id, paths)
        self.rounds.append(row)
        # The row's held-out reward is of the weights served at the round's start; keep=best holds the
        # new ones until theirs is measured (keep=last holds no ref).
        self.best.offer(self.serving[0], row.get("eval/reward_mean"), self.serving[1])
        if weights is not None:
            self.serving = (r + 1, weights if self.best.hold else None)
        del weights
        _append(paths["metrics"], steps + [row])
        if row["checkpointed"]:
            # A re-run resumes from what the controller registered, which lags the workers' report a little.
            await_registration(self.plan.run_storage, checkpoint_name(Position(row["step"], r + 1, 0), rounds=True))
            storage.write_json(paths["state"], {"rounds_done": r + 1, "step": row["step"]})
        self.out.say(phases.describe(row, o.rounds))
        warn_if_falling(self.rounds, o)
        track(self.tracker, steps, row)
        if on_round is not None:
            on_round(row, self.pools)

    def _final(self, ready: dict):
        """The held-out reward of the last weights; the best weights adopted before the workers stop
        (``online.keep: best``). Returns (the final row, the kept weights or None)."""
        from raydpo.online import keep

        o = self.cfg.online
        final = phases.held_out(self.cfg, self.sets.eval, self.pools, o.rounds)
        final_row = {"round": o.rounds, "kind": "final", **final, "time": time.time()}
        _append(self.paths["metrics"], [final_row])
        self.tracker.log({**final_row, "step": ready[0]["step"] if not self.rounds else self.rounds[-1]["step"]})
        self.best.offer(self.serving[0], final_row.get("eval/reward_mean"), self.serving[1])
        warn_if_falling(self.rounds + [final_row], o)
        kept = keep.adopt_best(self.best.best, self.serving[0]) if self.best.hold else None
        self.serving = self.best = None  # no weights ref outlives the workers
        return final_row, kept

    def _finish(self, final_row: dict, kept_round: int, kept_reward) -> dict:
        """The tokenizer beside the model, summary.json written and said."""
        from raydpo.pipeline.rundir import save_tokenizer

        o = self.cfg.online
        save_tokenizer(self.plan.tokenizer, self.paths["model"])
        summary = phases.summarize(self.rounds, final_row, self.sets.counts, self.paths, self.status, time.perf_counter() - self.started)
        summary |= {"keep": o.keep, "kept_round": kept_round, "kept_eval_reward": kept_reward}
        storage.write_json(self.paths["summary"], summary)
        if summary["initial_eval_reward"] is not None and summary["final_eval_reward"] is not None:
            self.out.say(f"online: done; held-out reward {summary['initial_eval_reward']:.3f} -> {summary['final_eval_reward']:.3f} "
                         f"over {o.rounds} rounds")
        return summary
