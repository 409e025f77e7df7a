"""Connecting to Ray: join an existing cluster (a job, RAY_ADDRESS) or start an embedded local one."""

from __future__ import annotations

import os
import sys

from raydpo.config import Config


def ensure_ray(cfg: Config) -> str:
    """Initialise Ray once per process; returns 'existing', 'joined' or 'embedded'."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        kind = "joined"
    else:
        # Declare more logical CPUs than cores so the tokenizer actors, the reference pool and the
        # train workers can all be placed at once on a small machine; they are mostly not busy together.
        num_cpus = cfg.ray.num_cpus or max(8, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, log_to_driver=True)
        kind = "embedded"
    configure_data()
    return kind


def configure_data() -> None:
    """Ray Data settings raydpo relies on: deterministic order, quiet progress when not on a terminal."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = sys.stderr.isatty()
