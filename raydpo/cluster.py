"""Connecting to Ray: join an existing cluster (a job, RAY_ADDRESS) or start an embedded local one."""

from __future__ import annotations

import os
import sys

from raydpo.config import Config


def ensure_ray(cfg: Config) -> str:
    """Initialise Ray once per process; returns 'existing', 'joined' or 'embedded'."""
    import logging

    import ray

    from raydpo.observability import console

    # Ray Data announces every dataset execution at INFO: shown in verbose mode only.
    logging.getLogger("ray.data").setLevel(logging.INFO if cfg.logging.console == "verbose" else logging.WARNING)
    if cfg.logging.console == "quiet":
        logging.getLogger("ray").setLevel(logging.WARNING)
    if ray.is_initialized():
        configure_data(progress_bars=None)
        return "existing"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # quiet: no worker output on the console (a worker's error still comes back as the exception).
    # Ray's own start-up lines (with colour codes in them) only in verbose mode; raydpo says the gist.
    options = {"log_to_driver": cfg.logging.console != "quiet",
               "logging_level": logging.INFO if cfg.logging.console == "verbose" else logging.WARNING}
    if address:
        ctx = ray.init(address=address, **options)
        kind = f"joined the Ray cluster at {address}"
    else:
        # Declare more logical CPUs than cores so the tokenizer actors, the reference pool and the
        # train workers can all be placed at once on a small machine; they are mostly not busy together.
        num_cpus = cfg.ray.num_cpus or max(8, os.cpu_count() or 1)
        ctx = ray.init(num_cpus=num_cpus, **options)
        kind = f"started an embedded local Ray cluster ({num_cpus} logical CPUs)"
    dashboard = getattr(ctx, "dashboard_url", None)
    console.get().say(kind + (f"; dashboard http://{dashboard}" if dashboard else ""))
    # raydpo's console shows each stage's progress; Ray Data's own bars only with logging.console=verbose.
    configure_data(progress_bars=cfg.logging.console == "verbose")
    return "joined" if address else "embedded"


def configure_data(progress_bars: bool | None = False) -> None:
    """Ray Data settings raydpo relies on.

    Order is preserved so quarantine files and exports list rows the way the input does, run after
    run. Progress bars are shown on a terminal only (``None`` leaves the caller's setting alone).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    if progress_bars is not None:
        ctx.enable_progress_bars = progress_bars and sys.stderr.isatty()


def default_train_cpus(num_workers: int, cores: int, concurrent_cores: float, free_cpus: float) -> int:
    """The rule for ``train.cpus_per_worker`` left unset on a one-node cluster without GPUs.

    ``cores``: the node's cores; ``concurrent_cores``: cores of stages that keep computing while the
    trainers run (the reference pool in streaming mode; the data stage and a precomputed reference
    are done by then, and online mode's pools wait while the trainers step); ``free_cpus``: the
    logical CPUs Ray has free for the workers now. Each worker gets an equal share of the cores left,
    at least 1 and never more than Ray can place (an unplaceable request would hang, not fail).
    """
    share = int((cores - concurrent_cores) // max(1, num_workers))
    placeable = int(free_cpus // max(1, num_workers))
    return max(1, min(share, placeable))


def resolve_train_cpus(cfg: Config) -> float:
    """Set ``cfg.train.cpus_per_worker`` if unset (the rule above, or 1 off a one-node CPU cluster) and
    return it. Called right before the trainers are placed, so ``free_cpus`` is what is free then."""
    t = cfg.train
    if t.cpus_per_worker is not None:
        return t.cpus_per_worker
    import ray

    from raydpo.observability import console
    from raydpo.config import pool_size

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()
    if t.use_gpu or not local or ray.cluster_resources().get("GPU", 0) > 0:
        t.cpus_per_worker = 1.0
        return t.cpus_per_worker
    r = cfg.reference
    streaming = r.mode == "streaming" and r.backend == "hf"
    concurrent = pool_size(r.num_actors)[1] * r.num_cpus_per_actor if streaming else 0.0
    cores = os.cpu_count() or 1
    t.cpus_per_worker = float(default_train_cpus(t.num_workers, cores, concurrent, ray.available_resources().get("CPU", 0.0)))
    console.get().say(f"train: {t.cpus_per_worker:g} CPU(s) and torch thread(s) per worker ({cores} cores, "
                      f"{t.num_workers} worker(s){', a streaming reference pool' if concurrent else ''}; "
                      "train.cpus_per_worker overrides)")
    return t.cpus_per_worker
