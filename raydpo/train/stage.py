"""The train stage: a Ray Train TorchTrainer whose workers run DeepSpeed ZeRO on the policy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from raydpo import storage
from raydpo.config import Config, to_dict


@dataclass
class TrainPlan:
    """Step counts derived from the data size, identical on every worker."""

    steps_per_epoch: int
    """Optimizer steps in one pass over the (equally split) training pairs."""
    total_steps: int
    """Optimizer steps of the run."""


def data_parallel_size(cfg: Config) -> int:
    """Groups of workers that read different pairs: ``num_workers / sequence_parallel_size``."""
    return cfg.train.num_workers // cfg.train.sequence_parallel_size


def plan_steps(cfg: Config, n_train: int) -> TrainPlan:
    """Each data-parallel group gets ``n_train // data_parallel_size`` pairs (equal split); partial
    batches are dropped. Refused here, before any pair is scored: a streaming run longer than one
    epoch (the stream is read once; a second pass would run the reference pool again)."""
    t = cfg.train
    per_worker = n_train // data_parallel_size(cfg)
    steps_per_epoch = per_worker // t.micro_batch_size // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        need = data_parallel_size(cfg) * t.micro_batch_size * t.gradient_accumulation_steps
        raise ValueError(
            f"{n_train} training pairs cannot fill one optimizer step: num_workers / sequence_parallel_size x "
            f"micro_batch_size x gradient_accumulation_steps = {need}; add data or lower those settings"
        )
    total = t.max_steps or steps_per_epoch * t.num_epochs
    if cfg.reference.mode == "streaming" and total > steps_per_epoch:
        raise ValueError(
            f"train.max_steps={t.max_steps} is more than one epoch ({steps_per_epoch} steps of {n_train} pairs), but "
            "reference.mode=streaming reads the scored pairs once, as the pool makes them: a second pass would score "
            "every pair again. Use reference.mode=precompute (cached log-probs, any number of epochs) or "
            f"train.max_steps <= {steps_per_epoch}"
        )
    return TrainPlan(steps_per_epoch, total)


def check_eval(cfg: Config, n_eval: int) -> int:
    """Eval pairs actually evaluated: the split gives each worker ``n_eval // num_workers``."""
    w = cfg.train.num_workers
    if 0 < n_eval < w:
        raise ValueError(f"{n_eval} eval pairs cannot be split over train.num_workers={w}; add eval data or drop it")
    return n_eval // w * w


def guard_config(plan, entry: str | None) -> dict | None:
    """What the workers' exactness guard needs, or None when it does not apply (switched off, or the
    reference is other weights than the policy starts from, or no loss reads a reference).
    ``plan``: the run's :class:`raydpo.pipeline.plan.RunPlan`; ``entry``: the cache entry the
    reference log-probs come from (None: passed in by the caller)."""
    from raydpo.config import reference_dtype
    from raydpo.train.guard import guard_tolerance

    cfg = plan.cfg
    if not cfg.reference.guard or not plan.reference_is_policy:
        return None
    tolerance = guard_tolerance(cfg.model.dtype, reference_dtype(cfg), cfg.reference.guard_tolerance, cfg.reference.quantization)
    return {"tolerance": tolerance, "entry": entry}


def storage_path(cfg: Config) -> str:
    """Ray Train's storage for this run: ``train.storage_path`` or ``<output.dir>/ray_train`` (local
    paths or URIs)."""
    return storage.normalize(cfg.train.storage_path) if cfg.train.storage_path else storage.join(cfg.output.dir, "ray_train")


def run_name(cfg: Config) -> str:
    """Ray Train's run name, from the run's ``output.dir``: runs that share ``train.storage_path`` keep
    their checkpoints apart, and a run resumes only its own."""
    out = storage.normalize(cfg.output.dir)
    return f"raydpo-{storage.basename(out)[:40]}-{hashlib.sha256(out.encode()).hexdigest()[:12]}"


def run_storage(cfg: Config) -> str:
    """Where this run's checkpoints are: ``<storage path>/<run name>``."""
    return storage.join(storage_path(cfg), run_name(cfg))


def train_logging(cfg: Config):
    """Ray Train's console: its routine INFO lines (resources requested, worker group started,
    process group, each checkpoint and report) only with ``logging.console=verbose``."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if cfg.logging.console == "verbose" else "WARNING")


def ingest_options():
    """Ray Data options for the streaming train shard: the driver's order setting, given explicitly
    (Ray Train's default copies the deprecated ``exclude_resources`` along with it)."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                            verbose_progress=current.verbose_progress)


def scaling_config(cfg: Config):
    """Ray Train's workers for this config: count, GPU, CPUs and custom resources per worker."""
    from ray.train import ScalingConfig

    t = cfg.train
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, accelerator_type=t.accelerator_type,
                         resources_per_worker={"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {}) | dict(t.resources))


def run_config(cfg: Config):
    """Ray Train's run: this run's own name in ``train.storage_path``, failures, checkpoints kept."""
    import ray.train

    t = cfg.train
    return ray.train.RunConfig(name=run_name(cfg), storage_path=storage_path(cfg), logging_config=train_logging(cfg),
                               failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                               checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints))


def worker_inputs(plan, train_ds, eval_ds, n_train: int, n_eval: int, steps: TrainPlan, streaming: bool) -> tuple[dict, dict]:
    """(the workers' share of ``train_loop_config``: model, sizes, splits; Ray Train's ``datasets``).

    Materialized pairs (input order) are split into equal contiguous parts, one per worker, held in
    memory there so that every epoch's order is a pure function of the seed (exact replay after a
    restart). Streaming output goes through Ray Data's streaming split instead. With sequence
    parallelism the ranks of one group share a split (``train_splits[rank // size]``). The eval set
    is small and read at every evaluation: split once here, one equal part per worker (sequence
    parallelism is off in eval), each held in memory there -- no Ray Data execution per eval."""
    cfg = plan.cfg
    splits = None if streaming else train_ds.split(data_parallel_size(cfg), equal=True)
    config = {"pad_id": plan.pad_id, "model_path": plan.model, "n_train": n_train, "n_eval": n_eval,
              "steps_per_epoch": steps.steps_per_epoch, "total_steps": steps.total_steps,
              "output_dir": storage.normalize(cfg.output.dir), "train_splits": splits,
              "eval_splits": eval_ds.split(cfg.train.num_workers, equal=True) if n_eval else None}
    return config, ({"train": train_ds} if streaming else {})


def announce(cfg: Config, steps: TrainPlan, tracking) -> None:
    """The console's line before the workers start (and a note when the cluster lacks their resources)."""
    from raydpo.cluster import say_if_waiting
    from raydpo.observability import console, trackers

    t = cfg.train
    say_if_waiting("train", t.num_workers, {"CPU": t.cpus_per_worker, "GPU": 1 if t.use_gpu else 0, **t.resources})
    sp = f" in sequence-parallel groups of {t.sequence_parallel_size}" if t.sequence_parallel_size > 1 else ""
    console.get().say(f"train: {t.num_workers} worker(s){sp}, DeepSpeed ZeRO-{t.zero_stage}, {steps.total_steps:,} steps "
                      f"({steps.steps_per_epoch:,} per epoch) of {data_parallel_size(cfg) * t.micro_batch_size * t.gradient_accumulation_steps} "
                      f"pairs; starting the workers" + (f"; trackers: {trackers.describe(tracking)}" if cfg.logging.backends else ""))


def run_training(plan, train_ds, eval_ds, n_train: int, n_eval: int, guard: dict | None = None, streaming: bool = False):
    """Fit the policy; returns (what rank 0 reported through the relay: ``result``, ``guard``,
    ``rows``; the TrainPlan). The workers write metrics.jsonl and model/ under output.dir.

    ``plan``: the run's :class:`raydpo.pipeline.plan.RunPlan` (the pinned policy every worker
    loads, the pad id, the run directory). ``guard``: from :func:`guard_config`
    (None: no exactness guard). ``streaming``: ``train_ds`` is the reference pool's lazy output (read
    once, in scoring order). Raises GuardError with its message when the guard stopped the run."""
    import ray
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    from raydpo.cluster import resolve_train_cpus
    from raydpo.observability import trackers
    from raydpo.observability.watch import MetricsWatcher
    from raydpo.train.guard import GUARD_FILE
    from raydpo.train.loop import train_loop_per_worker
    from raydpo.train.relay import follow, start_relay

    cfg = plan.cfg
    trackers.check_installed(cfg.logging.backends)
    tracking = trackers.resolve(cfg)
    steps = plan_steps(cfg, n_train)
    check_eval(cfg, n_eval)
    out = storage.normalize(cfg.output.dir)
    storage.delete_file(storage.join(out, GUARD_FILE))  # an earlier attempt's verdict
    relay = start_relay()
    inputs, datasets = worker_inputs(plan, train_ds, eval_ds, n_train, n_eval, steps, streaming)
    resolve_train_cpus(cfg)  # before to_dict: the workers set their torch threads from it
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), **inputs, "relay": relay, "guard": guard, "trackers": tracking,
                           "tracker_params": {**to_dict(cfg), "pairs": {"train": n_train, "eval": n_eval}}},
        scaling_config=scaling_config(cfg), datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all", execution_options=ingest_options()), run_config=run_config(cfg))
    announce(cfg, steps, tracking)
    try:
        with MetricsWatcher(follow(relay), steps.total_steps):
            trainer.fit()
        return collect_outcome(relay, out), steps
    except Exception:
        from raydpo.train.guard import GuardError

        try:
            collect_outcome(relay, out)  # raises GuardError when the guard stopped the run
        except GuardError:
            raise
        except Exception:  # noqa: BLE001 - the training error below says more
            pass
        raise
    finally:
        ray.kill(relay)


def collect_outcome(relay, out: str) -> dict:
    """What rank 0 reported; records the guard's verdict as ``<output.dir>/guard.json`` and raises
    GuardError with its message when the guard failed."""
    import ray

    from raydpo.train.guard import GUARD_FILE, GuardError, verdict_failure

    outcome = ray.get(relay.outcome.remote())
    if outcome["guard"] is not None:
        storage.write_json(storage.join(out, GUARD_FILE), outcome["guard"])
    message = verdict_failure(outcome["guard"])
    if message:
        raise GuardError(message) from None
    return outcome
