"""Running a sweep: the shared stages once on the driver, then one Ray Tune trial per run.

Ray Tune places the trials (each trial is a Ray Train driver: its workers are placed by Ray Train),
runs ``--concurrent`` of them at once and records each trial's error without stopping the others.
Before the trials, the driver runs the data and reference stages for every run config in turn:
the first run with given inputs tokenizes and scores, later ones hit the content-addressed caches,
so each trial's own data and reference stages are cache reads. A rerun of the sweep starts the
trials again; a finished run's directory makes its trial return at once (``pipeline.run``'s
``finished`` status) and an unfinished one resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import time

from raydpo import storage
from raydpo.observability import console
from raydpo.config import Config, to_dict, uses_reference

#: The final metrics a sweep's table shows, in order, where the runs have them.
TABLE_METRICS = ["loss", "rewards/accuracies", "rewards/margins", "kl", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl"]


def shared_stages(runs: list[tuple[str, dict, Config]], sweep_dir: str) -> list[dict]:
    """Data and reference stages for every run, in order, on the driver; returns one row per run
    saying which cache entries it uses and whether this call computed them or found them."""
    from raydpo.data.stage import prepare
    from raydpo.pipeline import score_reference

    rows = []
    for name, _, cfg in runs:
        t0 = time.perf_counter()
        data = prepare(cfg, storage.join(sweep_dir, "shared", f"{name}.quarantine.jsonl"))
        refs = score_reference(data, cfg) if uses_reference(cfg) else {}
        rows.append({"run": name, "data": data.cache.get("key") or data.cache.get("status"), "data_hit": data.cache["hit"],
                     "reference": {split: r.key for split, r in refs.items()},
                     "reference_hit": all(r.cache_hit for r in refs.values()), "seconds": round(time.perf_counter() - t0, 3)})
    return rows


def anchored(cfg: Config) -> Config:
    """``cfg`` with its relative local paths made absolute here: a Tune trial runs in its own working
    directory, where ``runs/tiny-model`` would name nothing (hub ids and URIs are left as they are)."""
    from raydpo.data.sources import _is_hub_id

    def local(p: str | None, must_exist: bool = False) -> str | None:
        if not p or storage.is_uri(p) or (must_exist and not os.path.exists(os.path.expanduser(p))):
            return p
        return os.path.abspath(os.path.expanduser(p))

    cfg.model.name_or_path = local(cfg.model.name_or_path, must_exist=True)
    cfg.reference.name_or_path = local(cfg.reference.name_or_path, must_exist=True)
    cfg.reference.cache_dir, cfg.data.cache_dir = local(cfg.reference.cache_dir), local(cfg.data.cache_dir)
    cfg.train.storage_path, cfg.logging.tensorboard_dir = local(cfg.train.storage_path), local(cfg.logging.tensorboard_dir)
    cfg.data.train = [p if _is_hub_id(p) else local(p) for p in cfg.data.train]
    cfg.data.eval = [p if _is_hub_id(p) else local(p) for p in cfg.data.eval]
    if cfg.data.chat_template and cfg.data.chat_template.endswith(".jinja"):
        cfg.data.chat_template = local(cfg.data.chat_template)
    return cfg


def describe_sharing(rows: list[dict], grid: dict[str, list[str]], runs) -> list[str]:
    """Console lines: how many tokenizations and reference entries the runs share, and which grid
    keys gave runs their own entry."""
    entries = {}
    for row in rows:
        entries.setdefault(tuple(sorted(row["reference"].items())), []).append(row["run"])
    datas = {row["data"] for row in rows}
    lines = [f"sweep: {len(rows)} runs share {len(datas)} tokenized-data entr{'y' if len(datas) == 1 else 'ies'} and "
             f"{len(entries)} reference entr{'y' if len(entries) == 1 else 'ies'}"]
    if len(entries) > 1:
        points = {name: point for name, point, _ in runs}
        for ref, names in entries.items():
            common = {k: v for k, v in points[names[0]].items() if all(points[n][k] == v for n in names)}
            own = [f"{k}={common[k]}" for k in grid if k in common and len({p[k] for p in points.values()}) > 1]
            lines.append(f"sweep: reference entry {ref[0][1] if ref else '-'} for {', '.join(own) or 'runs'}: {len(names)} run(s)")
    return lines


def capacity(cfg: Config, free_cpus: float, free_gpus: float) -> int:
    """Runs the cluster can place at once: each needs its trial driver (1 CPU) plus its workers."""
    t = cfg.train
    cpus = 1 + t.num_workers * (t.cpus_per_worker or 1)
    fits = int(free_cpus // cpus)
    if t.use_gpu:
        fits = min(fits, int(free_gpus // t.num_workers))
    return max(1, fits)


def _trial(params: dict, configs: dict) -> None:
    """One Tune trial: a whole raydpo run (data and reference are cache hits after shared_stages)."""
    from ray import tune

    from raydpo.config import from_dict
    from raydpo.pipeline import run

    result = run(from_dict(configs[params["run"]]))
    s = result.summary
    final = {**(s.get("final_metrics") or {}), **(s.get("final_eval_metrics") or {})}
    tune.report({"status": result.status, "steps": s.get("steps"), "seconds": (s.get("timings_s") or {}).get("total"),
                 **{k: v for k, v in final.items() if k in TABLE_METRICS}})


def format_table(rows: list[dict]) -> str:
    """The final table: one line per run with its status and final train/eval metrics."""
    metrics = [m for m in TABLE_METRICS if any(m in r for r in rows)]
    head = ["run", "status", "steps", *metrics]
    body = [[r["run"], r["status"], str(r.get("steps") or "-"),
             *[f"{r[m]:.4f}" if isinstance(r.get(m), (int, float)) else "-" for m in metrics]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


def sweep(raw: dict, grid_specs: list[str], concurrent: int = 1) -> dict:
    """Run the grid; returns (and writes to ``<output.dir>/sweep.json``) the runs' table rows."""
    import ray
    from ray import tune

    from raydpo.cluster import default_train_cpus, ensure_ray
    from raydpo.storage.probe import check_nodes_see
    from raydpo.config import from_dict
    from raydpo.observability.report import write_report
    from raydpo.sweep.grid import parse_grid, run_configs

    base = from_dict(raw)
    grid = parse_grid(grid_specs)
    sweep_dir = storage.normalize(base.output.dir)
    runs = run_configs(raw, grid, sweep_dir)  # every point validated before anything starts
    if concurrent < 1:
        raise ValueError(f"--concurrent must be at least 1, got {concurrent}")
    console.configure(base.logging.console, base.logging.progress_every_s)
    storage.makedirs(sweep_dir)
    ensure_ray(base)
    for _, _, cfg in runs:  # every run's local paths on every node, before any stage
        check_nodes_see(cfg)
    console.get().say(f"sweep: {len(runs)} runs ({' x '.join(f'{len(v)} {k}' for k, v in grid.items())}) under {sweep_dir}")
    free = ray.available_resources()
    fits = capacity(runs[0][2], free.get("CPU", 0.0), free.get("GPU", 0.0))
    if concurrent > fits:
        console.get().say(f"sweep: --concurrent {concurrent} clamped to {fits}: the cluster has {free.get('CPU', 0):g} free CPUs "
                          f"and each run needs 1 for its trial plus its workers'")
        concurrent = fits
    concurrent = min(concurrent, len(runs))
    t = base.train
    if t.cpus_per_worker is None and not t.use_gpu and len(ray.nodes()) == 1:
        # The cores rule for the runs that train side by side (an explicit value always wins).
        cpus = float(default_train_cpus(t.num_workers * concurrent, os.cpu_count() or 1, 0, free.get("CPU", 0.0) - concurrent))
        for _, _, cfg in runs:
            cfg.train.cpus_per_worker = cfg.train.cpus_per_worker or cpus
    t0 = time.perf_counter()
    sharing = shared_stages(runs, sweep_dir)
    for line in describe_sharing(sharing, grid, runs):
        console.get().say(line)
    shared_s = time.perf_counter() - t0
    configs = {name: to_dict(anchored(cfg)) for name, _, cfg in runs}
    for cfg in configs.values():  # trials report through the sweep's table; their console says the gist
        cfg["logging"]["console"] = "quiet" if base.logging.console != "verbose" else "verbose"
    console.get().say(f"sweep: training {len(runs)} runs, {concurrent} at a time, as Ray Tune trials")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, configs=configs), {"cpu": 1}),
        param_space={"run": tune.grid_search(list(configs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=storage.join(sweep_dir, "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    rows = []
    for result in results:
        name = result.config["run"]
        if result.error is not None:
            rows.append({"run": name, "status": "failed", "error": str(result.error).strip().splitlines()[-1][:500]})
        else:
            m = result.metrics or {}
            rows.append({"run": name, **{k: v for k, v in m.items() if k in TABLE_METRICS or k in ("status", "steps", "seconds")}})
    order = {name: i for i, (name, _, _) in enumerate(runs)}
    rows.sort(key=lambda r: order[r["run"]])
    summary = {"grid": grid, "runs": rows, "shared": sharing, "timings_s": {"shared_stages": round(shared_s, 3),
               "trials": round(time.perf_counter() - t0 - shared_s, 3), "total": round(time.perf_counter() - t0, 3)}}
    done = [storage.join(sweep_dir, "runs", r["run"]) for r in rows if r["status"] != "failed"]
    if done:
        summary["report"] = write_report(done, storage.join(sweep_dir, "report"))
    storage.write_json(storage.join(sweep_dir, "sweep.json"), summary)
    print(format_table(rows))
    for r in rows:
        if r["status"] == "failed":
            console.get().say(f"sweep: run {r['run']} failed: {r['error']}; see {storage.join(sweep_dir, 'runs', r['run'])}")
    console.get().say(f"sweep: {sum(r['status'] != 'failed' for r in rows)} of {len(rows)} runs finished; "
                      + (f"report: {summary['report']}" if done else "no report"))
    return summary
