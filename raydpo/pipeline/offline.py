"""``raydpo train`` and its parts: data -> reference -> train -> export, on files named by the config."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from raydpo import config as config_mod
from raydpo import storage
from raydpo.config import Config
from raydpo.pipeline.rundir import run_paths, save_tokenizer, start


@dataclass
class RunResult:
    """What ``run`` produced."""

    output_dir: str
    model_path: str
    summary: dict
    metrics: list[dict] = field(default_factory=list)
    status: str = "fresh"
    """``fresh``, ``resume`` (continued from a checkpoint), ``restart`` (``force``) or ``finished``
    (``output.dir`` already held a finished run; nothing was done)."""


def prepare_data(cfg: Config, train=None, eval=None):
    """Stage 1 (Ray Data): returns :class:`raydpo.data.stage.PreparedData`.

    ``train`` / ``eval``: optional ``ray.data.Dataset`` s of preference rows used instead of
    ``data.train`` / ``data.eval`` (for pipelines that generate their own pairs).
    """
    from raydpo.data.stage import prepare

    return prepare(cfg, run_paths(cfg)["quarantine"], train=train, eval=eval)


def score_reference(data, cfg: Config, stream: bool = False) -> dict:
    """Stage 2: the reference pool (or the cache) for each split -> {split: ReferenceResult}.

    ``stream``: the train split comes back as the pool's lazy output for the trainer to consume
    (see ``reference.mode``); the eval split, read at every evaluation, is always scored first.
    With reference-free losses only (``simpo``, ``orpo``, ``sft``) there is no stage: {} comes back.
    """
    from raydpo.reference.stage import run_reference

    if not config_mod.uses_reference(cfg):
        return {}

    pad_id = None  # looked up on a miss only (the cache key already loaded the tokenizer: a memo hit)
    settings = data.settings.__dict__
    results = {}
    if data.eval is not None:
        results["eval"] = run_reference(data.eval, cfg, pad_id, settings, label="eval")
    results["train"] = run_reference(data.train, cfg, pad_id, settings, stream=stream, label="train")
    return results


def train_policy(plan, refs: dict, n_train: int, n_eval: int):
    """Stage 3: Ray Train + DeepSpeed on the scored datasets; returns (what rank 0 reported, TrainPlan):
    see :func:`raydpo.train.stage.run_training`. ``plan``: the run's
    :class:`raydpo.pipeline.plan.RunPlan`.

    ``refs``: from :func:`score_reference`, or for reference-free losses {"train": d, "eval": d}
    with plain tokenized datasets (``PreparedData.train`` / ``.eval``) in place of the results."""
    from raydpo.train.stage import guard_config, run_training

    guard = guard_config(plan, refs["train"].entry)
    streaming = getattr(refs["train"], "seal", None) is not None
    return run_training(plan, refs["train"].dataset, refs["eval"].dataset if "eval" in refs else None, n_train, n_eval,
                        guard, streaming)


def _reference_summary(refs: dict) -> dict | str:
    if not refs:
        return "skipped: the loss needs no reference"
    return {
        split: {"cache_hit": r.cache_hit, "pairs_scored": r.pairs_scored, "key": r.key, "entry": r.entry, "seconds": round(r.seconds, 3)}
        for split, r in refs.items()
    }


@dataclass
class Unscored:
    """A split handed to the trainer without reference log-probs (reference-free losses)."""

    dataset: object
    entry: None = None


def unscored(data) -> dict:
    return {"train": Unscored(data.train)} | ({"eval": Unscored(data.eval)} if data.eval is not None else {})


def precompute(cfg: Config) -> tuple[object, dict]:
    """Data and reference stages only; returns (PreparedData, {split: ReferenceResult})."""
    paths = start(cfg)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    t1 = time.perf_counter()
    if not config_mod.uses_reference(cfg):
        raise ValueError(f"loss.type {cfg.loss.type} needs no reference log-probs: there is nothing to precompute")
    refs = score_reference(data, cfg)
    summary = {
        **data.summary.as_dict(),
        "quarantine_file": paths["quarantine"], "data_cache": data.cache,
        **_lengths(data, cfg),
        "reference": _reference_summary(refs),
        "timings_s": {"data": round(t1 - t0, 3), "reference": round(time.perf_counter() - t1, 3)},
    }
    storage.write_json(paths["summary"], summary)
    return data, refs


def _lengths(data, cfg: Config) -> dict:
    """Token-length statistics and histograms of every kept pair (train and eval) for summary.json."""
    from raydpo.data.stats import token_length_summary

    return token_length_summary([data.train] + ([data.eval] if data.eval is not None else []), cfg.data.max_length)


def validate_data(cfg: Config) -> dict:
    """Read, validate and tokenize only (no model); writes and returns summary.json's content."""
    paths = start(cfg)
    data = prepare_data(cfg)
    summary = {**data.summary.as_dict(), "quarantine_file": paths["quarantine"], "data_cache": data.cache, **_lengths(data, cfg)}
    storage.write_json(paths["summary"], summary)
    return summary


def run(cfg: Config, force: bool = False) -> RunResult:
    """The whole run: data -> reference (cached) -> train -> export. Writes the run directory.

    Re-running an unfinished run resumes it from its latest checkpoint (``train.checkpoint_every``);
    a finished one is left alone (status ``finished``) unless ``force``, which starts over."""
    from raydpo.observability.trackers import check_installed
    from raydpo.pipeline.plan import plan_run
    from raydpo.train.preflight import check_family, check_storage, preflight
    from raydpo.train.resume import FinishedRun, prepare_run_dir
    from raydpo.train.stage import check_eval, plan_steps

    check_installed(cfg.logging.backends)  # before any work: a missing tracker would fail the trainers
    check_storage(cfg)
    run_plan = plan_run(cfg)
    paths = run_plan.paths
    check_family(cfg, run_plan.model_dir)  # before Ray starts: settings this family cannot serve
    try:
        status = prepare_run_dir(paths, config_mod.to_dict(cfg), run_plan.run_storage, force)
    except FinishedRun:
        return RunResult(paths["dir"], paths["model"], storage.read_json(paths["summary"]), status="finished")
    start(cfg)
    preflight(cfg, run_plan.model_dir)
    timings = {}
    t0, started = time.perf_counter(), time.time()
    data = prepare_data(cfg)
    plan_steps(cfg, data.n_train)  # a run the data cannot fill, or a stream read twice, stops before the reference
    lengths = _lengths(data, cfg)
    timings["data"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    refs = score_reference(data, cfg, stream=cfg.reference.mode == "streaming")
    timings["reference"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    outcome, plan = train_policy(run_plan, refs or unscored(data), data.n_train, data.n_eval)
    timings["train"] = time.perf_counter() - t2
    for r in refs.values():
        if r.seal is not None:  # streamed: the trainer has read every pair, the shards are complete
            r.entry, r.seal = r.seal(), None
    save_tokenizer(run_plan.tokenizer, paths["model"])
    timings["total"] = time.perf_counter() - t0
    trained = outcome["result"]
    summary = {
        **data.summary.as_dict(),
        "quarantine_file": paths["quarantine"], "data_cache": data.cache,
        **lengths,
        "reference": _reference_summary(refs),
        "steps": trained["steps"],
        "steps_per_epoch": plan.steps_per_epoch,
        "policy_params": trained["params"],
        "eval_pairs_evaluated": check_eval(cfg, data.n_eval),
        "final_metrics": trained["final"],
        "final_eval_metrics": trained["final_eval"],
        "model_dir": paths["model"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "start": status,
        "finished": True,
    }
    metrics = outcome["rows"]
    first = next((m for m in metrics if "loss" in m), None)
    if first is not None:
        summary["timings_s"]["first_step"] = round(first["time"] - started, 3)
    storage.write_json(paths["summary"], summary)
    return RunResult(paths["dir"], paths["model"], summary, metrics, status)
