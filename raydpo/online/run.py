"""The online run's driver: start the pools and the trainer once, then drive the rounds.

    prompts -> generate (generator pool) -> judge (judge pool) -> pairs -> reference (reference pool)
            -> train (the Ray Train workers, through the round queue) -> sync (object store) -> next round

The Ray Train run (``TorchTrainer.fit``) runs in a thread of this process for the whole run; the
rounds reach its workers through :class:`raydpo.online.rounds.RoundQueue`. A re-run of the same
command resumes after the latest round checkpoint (Ray Train restores it into the workers, which
report where they stand; the generators then get the restored weights).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from raydpo import storage
from raydpo.observability import console
from raydpo.config import Config, to_dict
from raydpo.online import phases, progress
from raydpo.online.phases import append_rows as _append


@dataclass
class OnlineResult:
    """What :func:`run_online` produced."""

    output_dir: str
    model_path: str
    summary: dict
    rounds: list[dict] = field(default_factory=list)
    """The per-round rows of ``metrics.jsonl`` (``kind`` ``round``), and the final held-out row."""
    status: str = "fresh"
    """``fresh``, ``resume``, ``restart`` (``force``) or ``finished`` (nothing was done)."""


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


def preflight(cfg: Config) -> None:
    """Everything that can be refused before Ray starts, one line each."""
    from raydpo.config import ConfigError
    from raydpo.config.rules import unpaired
    from raydpo.online.judge import check_reward_model, load_reward_fn
    from raydpo.config.online import online_checks

    for ok, message in online_checks(cfg.online, cfg.train.lr_scheduler) + [
        (cfg.train.sequence_parallel_size == 1, "raydpo online trains on generated pairs of short length: train.sequence_parallel_size must be 1"),
        (cfg.model.quantization is None, "raydpo online syncs full weights to the generators: a quantized base (QLoRA) cannot be merged; "
                                         "use model.lora without model.quantization"),
        (cfg.reference.mode == "precompute", "raydpo online scores each round's pairs before training them: reference.mode must be precompute"),
        (not unpaired(cfg.loss), f"raydpo online trains on the pairs its judge ranks: loss.type {cfg.loss.type!r} is unpaired; "
                                 "use a pairwise loss (sigmoid, ipo, ...), or raydpo train on labelled completions for KTO"),
    ]:
        if not ok:
            raise ConfigError(message)
    from raydpo.observability.trackers import check_installed

    check_installed(cfg.logging.backends)
    j = cfg.online.judge
    if j.reward_fn:
        load_reward_fn(j.reward_fn)
    else:
        from raydpo.models import resolve_local

        check_reward_model(resolve_local(j.reward_model), cfg.model.trust_remote_code)


def _trainer(plan, queue):
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


def _keep_rows(path: str, keep) -> list[dict]:
    """Rewrite the JSON-lines file at ``path`` (local or a URI) with the rows ``keep(row)`` accepts;
    returns them."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return []
    rows = [r for r in (json.loads(line) for line in text.splitlines() if line.strip()) if keep(r)]
    storage.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _track(tracker, steps: list[dict], row: dict) -> None:
    """Feed the trackers the round's training steps (sent by rank 0 with the round's result) and its row.

    The driver is the one tracker writer of an online run: the round rows are made here."""
    for step in steps:
        tracker.log(step)
    # The held-out numbers are of the weights at the round's start: logged at that step.
    held = {k: v for k, v in row.items() if k.startswith(("eval/", "compute/eval"))}
    if held:
        tracker.log({**held, "step": row["step"] - row["steps"], "time": row["time"]})
    tracker.log({k: v for k, v in row.items() if k not in held})


def _await_registration(run_storage: str, name: str, timeout_s: float = 120.0) -> None:
    from raydpo.train.resume import latest_registered

    deadline = time.monotonic() + timeout_s
    while latest_registered(run_storage) != name and time.monotonic() < deadline:
        time.sleep(0.05)


def _warn_if_falling(rows: list[dict], o) -> None:
    """The console warning when the latest held-out reward gave back more than half of the gain."""
    fall = progress.reward_fall([r.get("eval/reward_mean") for r in rows])
    if fall is not None:
        console.get().say(progress.describe_fall(fall, o.rounds, o.keep), level="quiet")


def _adopt_best(best, last_round: int):
    """``online.keep: best``, before the trainer's workers stop: the best weights as a
    :class:`progress.Kept` whose handle is an object ref the driver owns (the synced refs die with
    the rank-0 worker that put them), or :data:`progress.INITIAL`; None when the last weights are
    the best (the trainer's export stays)."""
    import ray

    from raydpo.online import keep
    from raydpo.storage.remote import on_cluster

    if best is None or best.round == last_round:
        console.get().say(progress.describe_kept(best, last_round, None))
        return None
    if best.handle is progress.INITIAL:
        return best
    if best.handle is None:  # not expected: every synced or restored round has its ref
        return None
    state, ok = on_cluster(keep.adopt_checked, best.handle, num_returns=2)
    try:
        ray.get(ok)
    except ray.exceptions.RayError as e:  # e.g. their owner, a trainer worker restarted since, is gone
        console.get().say(f"online: warning: online.keep: best could not keep the weights after round {best.round} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the model is the last round's", level="quiet")
        return None
    return progress.Kept(best.round, best.reward, state)


def _write_kept(cfg: Config, model_path: str, model_dir: str, kept, last_reward) -> tuple[int, float]:
    """Replace the trainer's export in ``model_dir`` with ``kept``'s weights (in a Ray task); returns
    the kept round and reward for summary.json."""
    from raydpo.online import keep
    from raydpo.storage.remote import on_cluster

    state = None if kept.handle is progress.INITIAL else kept.handle
    on_cluster(keep.write_model, state, model_path, cfg.model.dtype, cfg.model.trust_remote_code, model_dir,
               on_driver_node=not storage.is_uri(model_dir))
    console.get().say(progress.describe_kept(kept, cfg.online.rounds, last_reward) + f": {model_dir}")
    return kept.round, kept.reward


def run_online(cfg: Config, prompts=None, eval_prompts=None, force: bool = False, on_round=None) -> OnlineResult:
    """The whole online run (see the module docstring); writes ``output.dir``.

    ``prompts`` / ``eval_prompts``: ``ray.data.Dataset`` s of prompt rows used instead of
    ``data.train`` / ``data.eval``. ``on_round(row, pools)``: called after each round with its
    metrics row and ``{"generator": RestartingPool, "judge": ..., "reference": ... or None}``.
    """
    import ray

    from raydpo.online.prompts import load_prompts
    from raydpo.online.rounds import RoundQueue
    from raydpo.observability import trackers
    from raydpo.pipeline.plan import plan_run
    from raydpo.pipeline.rundir import save_tokenizer, start
    from raydpo.train.checkpoint import Position, checkpoint_name
    from raydpo.train.preflight import check_storage
    from raydpo.train.resume import FinishedRun, prepare_run_dir

    preflight(cfg)
    check_storage(cfg)
    plan = plan_run(cfg)
    paths = plan.paths
    try:
        status = prepare_run_dir(paths, to_dict(cfg), plan.run_storage, force)
    except FinishedRun:
        return OnlineResult(paths["dir"], paths["model"], storage.read_json(paths["summary"]), status="finished")
    if status != "resume":
        for name in ("state", "quarantine"):
            storage.delete_file(paths[name])
    paths = start(cfg)
    out, o = console.get(), cfg.online
    tokenizer = plan.tokenizer
    started = time.perf_counter()
    sets = load_prompts(cfg, tokenizer, prompts, eval_prompts)
    c = sets.counts
    if c["rows_quarantined"] > cfg.data.max_bad_fraction * max(c["rows_read"], 1):
        _append(paths["quarantine"], sets.quarantine)
        raise ValueError(f"{c['rows_quarantined']} of {c['rows_read']} prompt rows have no usable prompt (more than "
                         f"data.max_bad_fraction={cfg.data.max_bad_fraction}); see {paths['quarantine']}")
    out.say(f"online: {c['train']:,} training and {c['eval']:,} held-out prompts from {c['rows_read']:,} rows "
            f"({c['rows_quarantined']:,} quarantined); {o.rounds} rounds of {o.prompts_per_round} prompts x "
            f"{o.generator.samples_per_prompt} samples")
    pools = phases.start_pools(cfg, plan.model, plan.pad_id)
    g, j = o.generator, o.judge
    out.say(f"online: {g.num_actors} generator actor(s) ({phases.resolve_backend(g.backend)}), {j.num_actors} judge actor(s) "
            f"({j.reward_fn or 'reward model ' + str(j.reward_model)})"
            + (f", {len(pools['reference'].pool.actors)} reference actor(s)" if pools["reference"] is not None else ", no reference (reference-free loss)"))
    queue = ray.remote(RoundQueue).options(num_cpus=0).remote()
    trainer = TrainerThread(_trainer(plan, queue))
    tracker = None
    try:
        trainer.start()
        ready = trainer.wait(queue.wait_ready.remote(cfg.train.num_workers))
        done = ready[0]["rounds_done"]
        rounds = _keep_rows(paths["metrics"], lambda r: r.get("round", 0) < done)
        rounds = [r for r in rounds if r.get("kind") == "round"]
        _keep_rows(paths["quarantine"], lambda r: r.get("stage") != "judge" or r["round"] < done)
        if not storage.exists(paths["quarantine"]) or done == 0:
            _keep_rows(paths["quarantine"], lambda r: r.get("stage") != "prompts")
            _append(paths["quarantine"], sets.quarantine)
        # online.keep: the weights the generators hold (rounds trained, handle) and the best evaluated so far.
        best = progress.BestWeights(hold=o.keep == "best")
        serving = (done, ready[0]["weights"][0] if done and best.hold else progress.INITIAL)
        if rounds and rounds[0]["round"] == 0:  # resumed: the initial model's weights are still its files
            best.offer(0, rounds[0].get("eval/reward_mean"), progress.INITIAL)
        if ready[0]["weights"][0] is not None:
            phases.sync(pools, ready[0].pop("weights")[0], queue, trainer)
            out.say(f"online: resumed after round {done} (step {ready[0]['step']}); the generators have the checkpoint's weights")
        tracking = trackers.resolve(cfg)
        tracker = trackers.Trackers(tracking, {**to_dict(cfg), "prompts": sets.counts}, ready[0]["step"] if done else None)
        out.say(f"online: {cfg.train.num_workers} trainer worker(s) (DeepSpeed ZeRO-{cfg.train.zero_stage}) ready; pids "
                f"{[ready[r]['pid'] for r in sorted(ready)]}" + (f"; trackers: {trackers.describe(tracking)}" if cfg.logging.backends else ""))
        for r in range(done, o.rounds):
            row, steps, weights = phases.one_round(cfg, r, sets, pools, queue, trainer, plan.pad_id, paths)
            rounds.append(row)
            # The row's held-out reward is of the weights served at the round's start; keep=best holds the
            # new ones until theirs is measured (keep=last holds no ref).
            best.offer(serving[0], row.get("eval/reward_mean"), serving[1])
            if weights is not None:
                serving = (r + 1, weights if best.hold else None)
            del weights
            _append(paths["metrics"], steps + [row])
            if row["checkpointed"]:
                # A re-run resumes from what the controller registered, which lags the workers' report a little.
                _await_registration(plan.run_storage, checkpoint_name(Position(row["step"], r + 1, 0), rounds=True))
                storage.write_json(paths["state"], {"rounds_done": r + 1, "step": row["step"]})
            out.say(phases.describe(row, o.rounds))
            _warn_if_falling(rounds, o)
            _track(tracker, steps, row)
            if on_round is not None:
                on_round(row, pools)
        final = phases.held_out(cfg, sets.eval, pools, o.rounds)
        final_row = {"round": o.rounds, "kind": "final", **final, "time": time.time()}
        _append(paths["metrics"], [final_row])
        tracker.log({**final_row, "step": ready[0]["step"] if not rounds else rounds[-1]["step"]})
        best.offer(serving[0], final_row.get("eval/reward_mean"), serving[1])
        _warn_if_falling(rounds + [final_row], o)
        kept = _adopt_best(best.best, serving[0]) if best.hold else None
        del serving, best
        ray.get(queue.stop.remote(o.rounds))
        trainer.join()
        if trainer.error is not None:
            raise trainer.error
        tracker.close(ok=True)
    except BaseException:
        if tracker is not None:
            tracker.close(ok=False)
        ray.get(queue.stop.remote(0, abort=True))
        trainer.join(timeout=120)  # the workers leave their loop; Ray Train's run ends
        raise
    finally:
        phases.stop_pools(pools)
    kept_round, kept_reward = o.rounds, final_row.get("eval/reward_mean")
    if kept is not None:
        kept_round, kept_reward = _write_kept(cfg, plan.model, paths["model"], kept, final_row.get("eval/reward_mean"))
    save_tokenizer(tokenizer, paths["model"])
    summary = phases.summarize(rounds, final_row, sets.counts, paths, status, time.perf_counter() - started)
    summary |= {"keep": o.keep, "kept_round": kept_round, "kept_eval_reward": kept_reward}
    storage.write_json(paths["summary"], summary)
    if summary["initial_eval_reward"] is not None and summary["final_eval_reward"] is not None:
        out.say(f"online: done; held-out reward {summary['initial_eval_reward']:.3f} -> {summary['final_eval_reward']:.3f} "
                f"over {o.rounds} rounds")
    return OnlineResult(paths["dir"], paths["model"], summary, rounds + [final_row], status)

