"""Connecting to Ray: join an existing cluster (a job, RAY_ADDRESS) or start an embedded local one."""

from __future__ import annotations

import os
import sys

from raydpo.config import Config


def ensure_ray(cfg: Config) -> str:
    """Initialise Ray once per process; returns 'existing', 'joined' or 'embedded'."""
    import logging

    import ray

    from raydpo import console

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
