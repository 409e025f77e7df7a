"""Connecting to Ray: join the cluster a run stands on (``ray.address``, ``RAY_ADDRESS``, or the live
local cluster ``ray start`` left its address for) or start an embedded local one."""

from __future__ import annotations

import os
import socket
import sys

from raydpo.config import Config


def address_file() -> str:
    """The file ``ray start`` writes the address of the cluster it started to (Ray's temp dir:
    ``$RAY_TMPDIR/ray`` or ``/tmp/ray``) and ``ray stop`` removes -- unless that cluster died."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts connections at ``address`` (``host:port``, a GCS)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def choose_cluster(configured: str | None, env: str | None, file: str, alive=answers) -> tuple[str, str]:
    """Which cluster to use: ``(address for ray.init, what to tell the user)``; ``"local"`` starts
    an embedded cluster.

    ``ray.address`` first (``local`` forces an embedded cluster), then ``RAY_ADDRESS``, then the
    cluster whose address ``ray start`` left in ``file`` if its GCS answers; a file whose cluster
    is gone (killed, machine rebooted) is ignored and named, so a stale file never hangs a run."""
    if configured == "local":
        return "local", "started an embedded local Ray cluster (ray.address: local)"
    if configured:
        return configured, f"joined the Ray cluster at {configured} (ray.address)"
    if env:
        return env, f"joined the Ray cluster at {env} (RAY_ADDRESS)"
    try:
        with open(file) as f:
            found = f.read().strip()
    except OSError:
        return "local", "started an embedded local Ray cluster"
    if found and alive(found):
        return found, (f"joined the local Ray cluster at {found} (from {file}; "
                       "ray.address: local starts an embedded one instead)")
    return "local", (f"started an embedded local Ray cluster; ignored the stale {file} "
                     f"(no Ray cluster answers at {found or 'an empty address'})")


#: Ray Train's switch for its per-run preemption watcher, off on an embedded cluster.
NO_PREEMPTION_WATCHER = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def ensure_ray(cfg: Config) -> str:
    """Initialise Ray once per process; returns 'existing', 'joined' or 'embedded'.

    Every worker process of the job gets raydpo's console level through Ray's
    ``worker_process_setup_hook`` (:mod:`raydpo.observability.quiet`)."""
    import logging

    import ray

    from raydpo.observability import console, quiet

    quiet.setup_process(cfg.logging.console)
    if cfg.logging.console == "quiet":
        logging.getLogger("ray").setLevel(logging.WARNING)
    if ray.is_initialized():
        configure_data(progress_bars=None)
        return "existing"
    address, said = choose_cluster(cfg.ray.address, os.environ.get("RAY_ADDRESS"), address_file())
    # quiet: no worker output on the console (a worker's error still comes back as the exception).
    # Ray's own start-up lines (with colour codes in them) only in verbose mode; raydpo says the gist.
    env_vars = {quiet.LEVEL_ENV: cfg.logging.console}
    if os.environ.get(quiet.STRICT_ENV):
        env_vars[quiet.STRICT_ENV] = os.environ[quiet.STRICT_ENV]
    options = {"log_to_driver": cfg.logging.console != "quiet",
               "logging_level": logging.INFO if cfg.logging.console == "verbose" else logging.WARNING,
               "runtime_env": {"worker_process_setup_hook": f"{quiet.__name__}.worker_setup_hook", "env_vars": env_vars}}
    if address == "local":
        # Declare more logical CPUs than cores so the tokenizer actors, the reference pool and the
        # train workers can all be placed at once on a small machine; they are mostly not busy together.
        num_cpus = cfg.ray.num_cpus or max(8, os.cpu_count() or 1)
        # One node that this process starts and stops: nothing can drain or preempt it, so Ray
        # Train's preemption watcher (an actor per run polling Ray Core's drain state) has nothing
        # to watch. Ray Train reads the flag from the driver's environment.
        os.environ.setdefault(*NO_PREEMPTION_WATCHER)
        ctx = ray.init(address="local", num_cpus=num_cpus, **options)
        said = said.replace("cluster", f"cluster ({num_cpus} logical CPUs)", 1)
    else:
        ctx = ray.init(address=address, **options)
    dashboard = getattr(ctx, "dashboard_url", None)
    console.get().say(said + (f"; dashboard http://{dashboard}" if dashboard else ""))
    # raydpo's console shows each stage's progress; Ray Data's own bars only with logging.console=verbose.
    configure_data(progress_bars=cfg.logging.console == "verbose")
    return "embedded" if address == "local" else "joined"


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


def room_for(need: dict[str, float]) -> int:
    """How many actors needing ``need`` (``{"CPU": 1, "GPU": 0, "reference_node": 1}``) the alive
    nodes can hold at once, by their total resources (what is busy now frees up later)."""
    import ray

    need = {k: v for k, v in need.items() if v}
    if not need:
        return 1 << 30
    return sum(min(int(n["Resources"].get(k, 0.0) / v + 1e-9) for k, v in need.items())
               for n in ray.nodes() if n.get("Alive"))


def tokenizer_pool(num_workers: int) -> tuple[int, float, float | None]:
    """(actors, CPUs per actor, CPUs per read task, None for Ray Data's default) of the data stage.

    The tokenizer actors hold their CPUs for the whole stage while the read tasks that feed them
    need CPUs too: with every CPU held by an actor no read could run and the stage would wait
    forever. So the pool leaves one CPU for the reads; on a one-CPU cluster the actor and the reads
    share it."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus >= num_workers + 1:
        return num_workers, 1.0, None
    if cpus >= 2:
        return int(cpus) - 1, 1.0, None
    share = max(cpus, 0.02) / 2
    return 1, share, share


def say_if_waiting(what: str, count: int, need: dict[str, float]) -> None:
    """Say at once when the cluster has room for fewer than ``count`` of ``what`` (each needing
    ``need``): Ray then waits, for busy resources to free up or an autoscaler to add nodes, and the
    user should know what it waits for rather than watch a silent stage."""
    from raydpo.observability import console

    room = room_for(need)
    if room < count:
        wants = ", ".join(f"{k}: {v:g}" for k, v in need.items() if v)
        console.get().say(f"{what}: waiting for {count} actor(s) of {{{wants}}}; the cluster's nodes have room for {room} "
                          "(an autoscaler may add nodes; otherwise lower the count or the resources each one asks for)")
