"""Foreign chatter filtered where it is made, in every process of a run.

raydpo's console is its own ``[raydpo]`` lines. Ray Data, Ray Train and DeepSpeed announce routine
steps (each dataset execution, each worker group, each checkpoint, each op build) on the same
console; in ``normal`` and ``quiet`` mode those announcements are turned down at their source --
the library's own handler level, context flag or config -- so that their warnings and errors still
come through, their log files still get everything, and ``--verbose`` shows it all again.

:func:`setup_process` runs in the driver (:func:`raydpo.cluster.ensure_ray`), in every Ray worker
process of a cluster raydpo starts or joins (Ray's ``worker_process_setup_hook``), and at the top of
raydpo's own worker entry points (a cluster somebody else started has no hook).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import sys
import warnings

#: The console level (``quiet``, ``normal``, ``verbose``), handed to Ray's worker processes.
LEVEL_ENV = "RAYDPO_CONSOLE"
#: ``1``: deprecation and future warnings raised by raydpo's own modules are errors (the suite sets it).
STRICT_ENV = "RAYDPO_STRICT_WARNINGS"

#: One-time Ray Data notice on every process that iterates a dataset with bars off (raydpo draws its own).
_RAY_DATA_NOTICES = re.compile(r"^Progress bars disabled")
#: DeepSpeed's ZeRO calls a torch collective that torch has deprecated (DeepSpeed's to change, not
#: the user's): shown in verbose mode only.
_DEEPSPEED_FUTURE = r"`torch.distributed.all_gather_into_tensor` is deprecated"
#: DeepSpeed's bare print() after loading its shared-memory comm op, once per backend per worker.
_DEEPSPEED_PRINTS = re.compile(r"^DeepSpeed \S+ built successfully")

#: bitsandbytes' CPU backend, on a CPU with AVX512-BF16, tries to fetch a 4-bit GEMM kernel from the
#: Hugging Face hub (the ``kernels`` package) when it is imported and warns when it cannot. raydpo
#: downloads nothing at run time and bitsandbytes falls back to its own kernel, so the warning (once
#: per process that imports peft or transformers' quantizers) says nothing a user can act on.
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_NOTICES = re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community")

#: Ray Train 2.60's placement-group cleaner asks the State API (the dashboard's) every second whether
#: the controller lives, and warns at each failed ask: on a cluster started without a dashboard that
#: is a line a second for the whole run. The first one is news (the cleaner cannot watch); it stays.
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PG_CLEANER_NOTICES = re.compile(r"^Failed to query Ray Train Controller actor state")


def level() -> str:
    """This process's console level (``normal`` unless set by :func:`setup_process`)."""
    return os.environ.get(LEVEL_ENV, "normal")


def verbose() -> bool:
    return level() == "verbose"


class _DropMessages(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__("raydpo.quiet")
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _DropRepeats(_DropMessages):
    """Lets the first matching message through, drops the ones after it."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        first, self.seen = not self.seen, True
        return first


def _drop_on(target: logging.Logger | logging.Handler, pattern: re.Pattern, drop: bool,
             kind: type[_DropMessages] = _DropMessages) -> None:
    """Replace raydpo's message filter on ``target`` (idempotent); ``drop=False`` just removes it."""
    for f in [f for f in target.filters if isinstance(f, _DropMessages)]:
        target.removeFilter(f)
    if drop:
        target.addFilter(kind(pattern))


def quiet_ray_data(is_verbose: bool) -> None:
    """Ray Data's console handler: its INFO lines (each execution's start, plan and finish) and the
    progress-bar notice only in verbose mode; its file log keeps every level.

    Ray Data configures its ``ray.data`` logger when ``ray.data`` is first imported, so this imports
    it first (a level set before that import is undone by it)."""
    import ray.data

    ray.data.DataContext.get_current().print_on_execution_start = is_verbose
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() != "console":
            continue
        handler.setLevel(logging.INFO if is_verbose else logging.WARNING)
        _drop_on(handler, _RAY_DATA_NOTICES, not is_verbose)


def quiet_bitsandbytes(is_verbose: bool) -> None:
    """bitsandbytes' hub-kernel notice only in verbose mode. Set on its logger by name before the
    import that logs it (loggers are created on first ``getLogger``), so every later import sees it."""
    _drop_on(logging.getLogger(_BNB_LOGGER), _BNB_NOTICES, not is_verbose)


#: Ray Train 2.60 logs every ``ray.train.report`` at INFO on a logger named after this module's
#: *file*, outside ``ray.train``, so ``RunConfig(logging_config=...)`` does not reach it.
_RAY_TRAIN_REPORTS = "ray.train.v2._internal.execution.context"


def quiet_ray_train(is_verbose: bool) -> None:
    """Ray Train's per-report INFO line only in verbose mode (its other routine lines follow
    :func:`raydpo.train.stage.train_logging`), where Ray Train is loaded already (a train worker);
    its placement-group cleaner's State API warning once per process unless verbose."""
    _drop_on(logging.getLogger(_PG_CLEANER_LOGGER), _PG_CLEANER_NOTICES, not is_verbose, _DropRepeats)
    module = sys.modules.get(_RAY_TRAIN_REPORTS)
    if module is not None:
        logging.getLogger(module.__file__).setLevel(logging.INFO if is_verbose else logging.WARNING)


def strict_warnings() -> None:
    """With ``RAYDPO_STRICT_WARNINGS=1``: a deprecated or future-changing API called from a raydpo
    module raises instead of warning, in this process (the test suite turns it on everywhere)."""
    if os.environ.get(STRICT_ENV) != "1":
        return
    from ray.util.annotations import RayDeprecationWarning

    for category in (RayDeprecationWarning, FutureWarning):
        warnings.filterwarnings("error", category=category, module=r"raydpo(\.|$)")


def setup_process(console_level: str | None = None) -> None:
    """Apply the console level to this process (idempotent). ``None``: the level handed down in
    ``RAYDPO_CONSOLE`` (a worker), else ``normal``."""
    if console_level is not None:
        os.environ[LEVEL_ENV] = console_level
    quiet_ray_data(verbose())
    quiet_ray_train(verbose())
    quiet_bitsandbytes(verbose())
    if not verbose():
        warnings.filterwarnings("ignore", message=_DEEPSPEED_FUTURE, category=FutureWarning)
    strict_warnings()


def worker_setup_hook() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every worker process of the job, Ray's own
    actors (Ray Train's controller, Ray Data's split coordinator) included."""
    setup_process()


@contextlib.contextmanager
def deepspeed_quietly():
    """Around DeepSpeed's process-group set-up: no accelerator auto-detect warning on a CPU worker
    (the accelerator is named instead) and no op-build print, unless verbose. Its errors pass."""
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed warns "unable to detect" when it falls back to CPU; the worker knows it is CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if verbose():
        yield
        return
    current = builtins.print

    def filtered(*objects, **kwargs):
        if not _DEEPSPEED_PRINTS.search(" ".join(map(str, objects))):
            current(*objects, **kwargs)

    builtins.print = filtered
    try:
        yield
    finally:
        builtins.print = current
