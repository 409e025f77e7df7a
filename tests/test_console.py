"""The console of a real run is raydpo's: the demo config (examples/tiny.yaml, on the session's
synthetic data) through ``raydpo train`` in a subprocess, every line counted; ``--verbose`` brings
the libraries' own lines back."""

import contextlib
import glob
import logging
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = re.compile(r"^(\(\w+ pid=\d+(, ip=[\d.]+)?\) )?\[raydpo\] ")
#: Lines Ray's core worker prints that raydpo cannot turn down at their source: an actor created
#: with its arguments in the object store and restarts allowed, once per process -- Ray Data's map
#: workers (it always puts their transformer in the store). Ray Train's PreemptionWatcher printed
#: it too; an embedded cluster (the suite's, the demo's) turns that actor off.
FOREIGN_ALLOWED = 1
#: The raylet's note when its node's worker processes first reach 4x, 5x, ... its startup
#: concurrency (the machine's cores: 2 here). The suite's shared cluster declares 8 CPUs on 2 cores
#: and keeps its processes across tests, so which test's run crosses the next multiple depends on
#: what ran before it; it is about that cluster, not about the run being checked.
SUITE_CLUSTER_NOTE = re.compile(r"^\(raylet\) WARNING: \d+ PYTHON worker processes have been started on node")


def raydpo(args: list[str], cwd, timeout=600) -> str:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "raydpo", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stdout[-5000:]
    return out.stdout


def overrides(ray_cluster, tiny_model_dir, synthetic_dir, tmp) -> list[str]:
    return [f"model.name_or_path={tiny_model_dir}", f"data.train={synthetic_dir}/train.jsonl", f"data.eval={synthetic_dir}/eval.jsonl",
            f"reference.cache_dir={tmp}/cache", f"output.dir={tmp}/run", "train.checkpoint_every=8",
            f"ray.address={ray_cluster.get_runtime_context().gcs_address}"]


@pytest.mark.slow
def test_the_demo_config_console_is_raydpos_lines(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    log = raydpo(["train", os.path.join(ROOT, "examples", "tiny.yaml"), *overrides(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path)],
                 cwd=tmp_path)
    lines = [line for line in log.splitlines() if line.strip()]
    foreign = [line for line in lines if not OURS.match(line) and not SUITE_CLUSTER_NOTE.match(line)]
    assert len(foreign) <= FOREIGN_ALLOWED, "\n".join(foreign)
    # Every stage was really run (tokenized, scored, trained with checkpoints, evaluated) and said so.
    for start in ("data: 256 rows read", "reference train: 256 pairs scored", "reference eval: 64 pairs scored",
                  "policy: ", "eval @ step 0: ", "eval @ step 10: ", "train: step 16/16 ", "done: 16 steps"):
        assert any(OURS.sub("", line).startswith(start) for line in lines), (start, log)
    assert glob.glob(str(tmp_path / "run" / "ray_train" / "raydpo-run-*" / "step_00000008"))  # the run's own checkpoints
    # The eval set is split once for the run: no Ray Data execution per evaluation, on any process.
    assert "execution finished" not in log and "Starting execution" not in log


@pytest.mark.slow
def test_verbose_shows_the_libraries_own_lines(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    args = ["validate-data", os.path.join(ROOT, "examples", "tiny.yaml"), *overrides(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path)]
    normal = raydpo(args, cwd=tmp_path)
    assert "Execution plan of Dataset" not in normal
    verbose = raydpo(args + ["data.cache=false", "--verbose"], cwd=tmp_path)
    assert "Execution plan of Dataset" in verbose and "execution finished" in verbose


def test_setup_turns_ray_datas_console_handler_down_and_verbose_back_up(monkeypatch):
    import logging

    import ray.data

    from raydpo.observability import quiet

    monkeypatch.setenv(quiet.LEVEL_ENV, "normal")
    (handler,) = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    level, filters = handler.level, list(handler.filters)
    try:
        quiet.setup_process("normal")
        quiet.setup_process("normal")  # idempotent: one filter, not two
        assert handler.level == logging.WARNING and not ray.data.DataContext.get_current().print_on_execution_start
        notice = logging.LogRecord("ray.data._internal.progress", logging.WARNING, "", 0, "Progress bars disabled. To enable, ...", (), None)
        other = logging.LogRecord("ray.data", logging.WARNING, "", 0, "Task failed: out of memory", (), None)
        assert not handler.filter(notice) and handler.filter(other)  # a real warning still passes
        quiet.setup_process("verbose")
        assert handler.level == logging.INFO and handler.filter(notice)
        assert ray.data.DataContext.get_current().print_on_execution_start
    finally:
        handler.setLevel(level)
        handler.filters[:] = filters
        ray.data.DataContext.get_current().print_on_execution_start = True


@contextlib.contextmanager
def messages_of(name: str, monkeypatch):
    """The messages logger ``name`` emits inside the block, at raydpo's normal console level."""
    from raydpo.observability import quiet

    monkeypatch.setenv(quiet.LEVEL_ENV, "normal")  # restored after the test; setup_process sets it
    logger = logging.getLogger(name)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield logger, seen
    finally:
        logger.removeHandler(handler)
        quiet.setup_process("normal")


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_its_other_warnings_pass(monkeypatch):
    """Logged through bitsandbytes' own CPU-backend logger, as it does on an AVX512-BF16 CPU."""
    from raydpo.observability import quiet

    notice = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please ..."
    with messages_of("bitsandbytes.backends.cpu.ops", monkeypatch) as (bnb, seen):
        quiet.setup_process("normal")
        quiet.setup_process("normal")
        bnb.warning(notice)
        bnb.warning("4-bit weights on CPU: slow path")
        assert seen == ["4-bit weights on CPU: slow path"]
        quiet.setup_process("verbose")
        bnb.warning(notice)
        assert seen[-1] == notice
        quiet.setup_process("normal")


def test_strict_warnings_fail_raydpos_deprecated_calls_only(monkeypatch):
    import types
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from raydpo.observability import quiet

    monkeypatch.setenv(quiet.STRICT_ENV, "1")
    caller = types.ModuleType("raydpo.some_stage")  # a warning attributed to a raydpo module ...
    exec(compile("import warnings\ndef call(cat):\n    warnings.warn('old API', cat, stacklevel=1)\n", "raydpo/some_stage.py", "exec"),
         caller.__dict__)
    library = types.ModuleType("somelib")  # ... and one attributed to a library
    exec(compile("import warnings\ndef call(cat):\n    warnings.warn('old API', cat, stacklevel=1)\n", "somelib.py", "exec"), library.__dict__)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        quiet.strict_warnings()
        for category in (RayDeprecationWarning, FutureWarning):
            with pytest.raises(category):
                caller.call(category)
            with pytest.warns(category):
                library.call(category)


def test_the_placement_group_cleaners_state_api_warning_is_said_once_per_process(monkeypatch):
    """Ray Train's cleaner warns at every failed State API ask (each second, on a cluster without a
    dashboard); the first warning passes, repeats and verbose mode as before."""
    from raydpo.observability import quiet

    notice = "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor."
    with messages_of("ray.train.v2._internal.execution.controller.placement_group_cleaner", monkeypatch) as (cleaner, seen):
        quiet.setup_process("normal")
        for _ in range(3):
            cleaner.warning(notice)
        cleaner.warning("Failed to clean up placement group: gone")
        assert seen == [notice, "Failed to clean up placement group: gone"]
        quiet.setup_process("verbose")
        cleaner.warning(notice)
        cleaner.warning(notice)
        assert seen[-2:] == [notice, notice]
