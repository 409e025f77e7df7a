"""Shared fixtures: one local Ray cluster per session, a tiny model and the synthetic task on disk."""

from __future__ import annotations

import os

import pytest

# A local ray.init() in Ray 2.60 turns on token auth; the suite's cluster is private to it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Deprecated or future-changing APIs called from raydpo's modules are errors, in every process
# (raydpo.observability.quiet.strict_warnings; pyproject.toml's filterwarnings for this one).
os.environ["RAYDPO_STRICT_WARNINGS"] = "1"

# Test-only reward functions (tests/online_rewards.py) must import in Ray's worker processes too.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

# Ray Train's controller checks on its workers this often (default 2 s): a finished run or a
# reported checkpoint waits up to one interval before the controller sees it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# The session's cluster is embedded, as `raydpo train`'s own is: no preemption watcher per run.
from raydpo.cluster import NO_PREEMPTION_WATCHER  # noqa: E402 (after the environment above)

os.environ.setdefault(*NO_PREEMPTION_WATCHER)

# The S3-compatible server's address and credentials, in the standard AWS variables, before any Ray
# cluster starts: every worker and `ray start` node of the suite inherits them (tests/s3.py).
from s3 import S3Server, aws_environment, free_port  # noqa: E402

S3_PORT = free_port()
os.environ.update(aws_environment(S3_PORT))

_SESSION: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _session_dirs(tmp_path_factory):
    _SESSION["cache"] = str(tmp_path_factory.mktemp("shared-cache"))


def on_session_cluster(ray_cluster) -> dict:
    """The environment of a subprocess (a benchmark, an example) that joins the session's cluster
    through RAY_ADDRESS instead of starting its own."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def shared_cache() -> str:
    """One reference (and tokenized-data) cache root for the tests that train rather than test the
    caches. Entries are content-addressed by everything that changes their numbers, so a test that
    reads another's entry gets exactly what it would have computed, without re-scoring it."""
    return _SESSION["cache"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from raydpo.fixtures.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from raydpo.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
    from raydpo.fixtures.synthetic import write_task

    out = tmp_path_factory.mktemp("synthetic")
    write_task(out, n_train=256, n_eval=64, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for the whole session (starting one costs seconds)."""
    import ray

    from raydpo.cluster import configure_data

    # address="local": the session's own cluster, even if another one is live on the machine. The
    # setup hook gives its workers raydpo's console level and the strict warnings, as ensure_ray does.
    ray.init(address="local", num_cpus=8, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": "raydpo.observability.quiet.worker_setup_hook"})
    configure_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (behind a proxy that can drop connections); skips where moto
    is not installed or the server cannot start."""
    import importlib.util

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
        pytest.skip("moto[server] is not installed (a test dependency: pip install 'moto[server]')")
    try:
        server = S3Server(S3_PORT)
    except (RuntimeError, OSError) as e:
        pytest.skip(f"moto's S3 server could not start here: {e}")
    yield server
    server.stop()


def make_config(tiny_model_dir: str, data_path, tmp_path, **sections):
    """A Config for ``tiny_model_dir`` writing under ``tmp_path``; ``sections`` override per section."""
    from raydpo.config import from_dict

    raw = {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": str(tmp_path / "cache"), "batch_size": 16},
        "data": {"train": data_path, "max_length": 64, "num_workers": 1},
        "train": {"num_workers": 2, "micro_batch_size": 4},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)
