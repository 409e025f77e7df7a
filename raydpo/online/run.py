"""``raydpo online``: checks before Ray starts, the run directory and the planned run, handed to the
round driver (:class:`raydpo.online.driver.OnlineRun`), which starts the pools and the trainer once.

    prompts -> generate (generator pool) -> judge (judge pool) -> pairs -> reference (reference pool)
            -> train (the Ray Train workers, through the round queue) -> sync (object store) -> next round

The Ray Train run (``TorchTrainer.fit``) runs in a thread of this process for the whole run; the
rounds reach its workers through :class:`raydpo.online.rounds.RoundQueue`. A re-run of the same
command resumes after the latest round checkpoint (Ray Train restores it into the workers, which
report where they stand; the generators then get the restored weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from raydpo import storage
from raydpo.observability import console
from raydpo.config import Config, to_dict
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


def _prompt_sets(plan, prompts, eval_prompts):
    """The run's training and held-out prompts (too many unusable rows stop it, quarantined)."""
    from raydpo.online.prompts import load_prompts

    cfg, paths = plan.cfg, plan.paths
    sets = load_prompts(cfg, plan.tokenizer, prompts, eval_prompts)
    c, o = sets.counts, cfg.online
    if c["rows_quarantined"] > cfg.data.max_bad_fraction * max(c["rows_read"], 1):
        _append(paths["quarantine"], sets.quarantine)
        raise ValueError(f"{c['rows_quarantined']} of {c['rows_read']} prompt rows have no usable prompt (more than "
                         f"data.max_bad_fraction={cfg.data.max_bad_fraction}); see {paths['quarantine']}")
    console.get().say(f"online: {c['train']:,} training and {c['eval']:,} held-out prompts from {c['rows_read']:,} rows "
                      f"({c['rows_quarantined']:,} quarantined); {o.rounds} rounds of {o.prompts_per_round} prompts x "
                      f"{o.generator.samples_per_prompt} samples")
    return sets


def run_online(cfg: Config, prompts=None, eval_prompts=None, force: bool = False, on_round=None) -> OnlineResult:
    """The whole online run (see the module docstring); writes ``output.dir``.

    ``prompts`` / ``eval_prompts``: ``ray.data.Dataset`` s of prompt rows used instead of
    ``data.train`` / ``data.eval``. ``on_round(row, pools)``: called after each round with its
    metrics row and ``{"generator": RestartingPool, "judge": ..., "reference": ... or None}``.
    """
    from raydpo.online.driver import OnlineRun
    from raydpo.pipeline.plan import plan_run
    from raydpo.pipeline.rundir import start
    from raydpo.train.preflight import check_share_prompt, check_storage
    from raydpo.train.resume import FinishedRun, prepare_run_dir

    preflight(cfg)
    check_storage(cfg)
    plan = plan_run(cfg)
    check_share_prompt(cfg, plan.model_dir)
    paths = plan.paths
    try:
        status = prepare_run_dir(paths, to_dict(cfg), plan.run_storage, force)
    except FinishedRun:
        return OnlineResult(paths["dir"], paths["model"], storage.read_json(paths["summary"]), status="finished")
    if status != "resume":
        for name in ("state", "quarantine"):
            storage.delete_file(paths[name])
    start(cfg)
    started = time.perf_counter()
    run = OnlineRun(plan, _prompt_sets(plan, prompts, eval_prompts), status, started)
    summary, rows = run.run(on_round)
    return OnlineResult(paths["dir"], paths["model"], summary, rows, status)
