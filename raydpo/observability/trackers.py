"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed by rank 0.

Each gets exactly the rows metrics.jsonl gets (same names: ``loss``, ``rewards/accuracies``,
``eval/loss``, ...) at their optimizer step, plus the resolved config and the data counts when
the run starts. Defaults keep everything on local disk (no server, no network): TensorBoard event
files and an MLflow file store under ``output.dir``, and wandb when ``logging.wandb_mode=offline``.

A resumed run continues the same tracker runs (ids kept in ``<output.dir>/trackers.json``).
A tracker that fails mid-run is reported once and dropped: a tracking outage does not stop training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
import tempfile
import time

from raydpo.config.schema import flatten

#: Tracker -> (module it needs, the raydpo extra that installs it).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
STATE_FILE = "trackers.json"


class MissingExtra(ValueError):
    """A configured tracker's package is not installed; the message names the extra to install."""


def check_installed(backends: list[str]) -> None:
    """Raise MissingExtra for the first tracker whose package is missing."""
    for name in backends:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(f"logging.backends includes {name!r}, but the {module} package is not installed: "
                               f"pip install 'raydpo[{extra}]' (or drop {name!r} from logging.backends)")


def _mlflow_uri(uri: str) -> str:
    """A path or relative ``file:`` URI made absolute: Ray Train workers run in their own directory."""
    if "://" in uri and not uri.startswith("file://"):
        return uri  # a server or database
    path = uri.removeprefix("file://").removeprefix("file:")
    return "file://" + os.path.abspath(os.path.expanduser(path))


def _wandb_logged_in(env) -> bool:
    import netrc

    if env.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve(cfg, env: dict | None = None) -> dict:
    """The trackers' settings with every default filled in on the driver (the train workers may run
    on other nodes, without the driver's environment variables or working directory)."""
    from raydpo import storage

    env = os.environ if env is None else env
    lg, out = cfg.logging, storage.normalize(cfg.output.dir)
    run_name = lg.run_name or storage.basename(out)
    remote_out = storage.is_uri(out)
    mlflow_uri = lg.mlflow_tracking_uri or env.get("MLFLOW_TRACKING_URI")
    for name, missing, key in (("tensorboard", not lg.tensorboard_dir, "logging.tensorboard_dir"),
                               ("mlflow", not mlflow_uri, "logging.mlflow_tracking_uri (or MLFLOW_TRACKING_URI)")):
        if remote_out and name in lg.backends and missing:
            raise ValueError(f"the {name} tracker writes local files, and output.dir {out} is not local: set {key} to a "
                             "local path or a mount every node shares, or a tracking server")
    # wandb with no login would fail in the worker (no terminal to ask on): offline then, said on the console.
    wandb_mode = lg.wandb_mode or env.get("WANDB_MODE") or ("online" if _wandb_logged_in(env) else "offline")
    return {
        "backends": list(lg.backends),
        "project": lg.project,
        "run_name": run_name,
        # A shared directory gets one subdirectory per run, so runs do not mix their curves.
        "tensorboard_dir": os.path.join(os.path.abspath(os.path.expanduser(lg.tensorboard_dir)), run_name) if lg.tensorboard_dir
        else os.path.join(out, "tensorboard"),
        "mlflow_tracking_uri": _mlflow_uri(mlflow_uri or os.path.join(out, "mlruns")),
        "wandb_mode": wandb_mode,
        "wandb_entity": lg.wandb_entity,
        # wandb keeps its files in a local directory: a node-local one when output.dir is a URI.
        "wandb_dir": os.path.join(tempfile.gettempdir(), "raydpo-wandb", run_name) if remote_out else out,
        "state_file": storage.join(out, STATE_FILE),
        "quiet": lg.console == "quiet",
    }


def describe(s: dict) -> str:
    """'tensorboard, mlflow (file:///run/mlruns), wandb (offline)': where each tracker writes, for the console."""
    where = {"tensorboard": s["tensorboard_dir"], "mlflow": s["mlflow_tracking_uri"], "wandb": s["wandb_mode"]}
    return ", ".join(f"{name} ({where[name]})" for name in s["backends"])


def scalars(row: dict) -> dict[str, float]:
    """The numeric metrics of a metrics.jsonl row (``step`` and ``time`` are its coordinates)."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def params(config: dict) -> dict[str, str]:
    """{'loss': {'beta': 0.1}} -> {'loss.beta': '0.1'} (MLflow params are flat strings)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(config).items()}


class TensorBoard:
    def __init__(self, s: dict, config: dict, state: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        import yaml

        # purge_step drops what an earlier attempt logged after the checkpoint this one resumes from
        # (everything, for a fresh start: --force, or a restart before the first checkpoint).
        self.writer = SummaryWriter(s["tensorboard_dir"], purge_step=0 if resume_step is None else resume_step + 1)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, values: dict[str, float], when: float) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step, walltime=when)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, s: dict, config: dict, state: dict, resume_step: int | None):
        uri = s["mlflow_tracking_uri"]
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the store
            # that needs no server and no database, which is what an offline run wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if resume_step is not None and state.get("mlflow_run_id") and state.get("mlflow_tracking_uri") == uri:
            self.run_id = state["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        state["mlflow_tracking_uri"] = uri
        exp = self.client.get_experiment_by_name(s["project"])
        exp_id = exp.experiment_id if exp else self.client.create_experiment(s["project"])
        self.run_id = self.client.create_run(exp_id, run_name=s["run_name"]).info.run_id
        state["mlflow_run_id"] = self.run_id
        flat = [Param(k[:250], v[:6000]) for k, v in params(config).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=flat[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, step: int, values: dict[str, float], when: float) -> None:
        from mlflow.entities import Metric

        ms = int(when * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class Wandb:
    def __init__(self, s: dict, config: dict, state: dict, resume_step: int | None):
        import wandb

        run_id = state.get("wandb_run_id") if resume_step is not None else None
        run_id = run_id or secrets.token_hex(4)
        state["wandb_run_id"] = run_id
        self.run = wandb.init(
            project=s["project"], entity=s["wandb_entity"], name=s["run_name"], dir=s["wandb_dir"], mode=s["wandb_mode"],
            id=run_id, resume="allow", config=config,
            # console="off": wandb would otherwise wrap this Ray worker's stdout, which Ray forwards.
            settings=wandb.Settings(console="off", silent=s["quiet"]),
        )

    def log(self, step: int, values: dict[str, float], when: float) -> None:
        self.run.log(values, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


class Trackers:
    """The configured trackers of one run (rank 0 only; an empty fan-out elsewhere).

    ``config``: what to record as the run's parameters (the resolved config, data counts).
    ``resume_step``: the checkpoint step a resumed run continues from (None: a fresh run).
    """

    def __init__(self, s: dict | None, config: dict, resume_step: int | None = None):
        self.active: dict[str, object] = {}
        if not s or not s["backends"]:
            return
        state = {}
        from raydpo import storage

        if resume_step is not None and storage.exists(s["state_file"]):
            state = storage.read_json(s["state_file"])
        for name in s["backends"]:
            try:
                check_installed([name])
                self.active[name] = BACKENDS[name](s, config, state, resume_step)
            except Exception as e:  # noqa: BLE001 - as mid-run: a tracker that cannot start does not stop training
                _warn(f"the {name} tracker could not start and is left out of this run: {type(e).__name__}: {e}")
        storage.write_json(s["state_file"], state, indent=None)

    def log(self, row: dict) -> None:
        values, when = scalars(row), row.get("time") or time.time()
        for name, backend in list(self.active.items()):
            try:
                backend.log(int(row["step"]), values, when)
            except Exception as e:  # noqa: BLE001 - any tracker failure: say it once, keep training
                _warn(f"the {name} tracker failed and is dropped for the rest of the run: {type(e).__name__}: {e}")
                del self.active[name]

    def close(self, ok: bool = True) -> None:
        for name, backend in self.active.items():
            try:
                backend.close(ok)
            except Exception as e:  # noqa: BLE001
                _warn(f"closing the {name} tracker failed: {type(e).__name__}: {e}")
        self.active = {}


def _warn(message: str) -> None:
    sys.stderr.write(f"[raydpo] warning: {message}\n")
    sys.stderr.flush()
