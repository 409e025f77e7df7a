"""The tracker fan-out in-process (real TensorBoard, MLflow and wandb, offline): a resumed run
continues the same tracker runs, and a tracker that fails mid-run is dropped with a warning."""

import glob
import json
import os
import time

from raydpo.observability import trackers
from raydpo.config import from_dict


def _settings(tmp_path):
    cfg = from_dict({"model": {"name_or_path": "m"}, "output": {"dir": str(tmp_path / "run")},
                     "logging": {"backends": ["tensorboard", "mlflow", "wandb"], "wandb_mode": "offline", "console": "quiet"}})
    os.makedirs(cfg.output.dir)
    return trackers.resolve(cfg, env={}), {"loss": {"beta": 0.1}}


def _row(step):
    return {"step": step, "loss": 1.0 / step, "rewards/accuracies": 0.5, "grad_norm": None, "time": time.time()}


def test_defaults_are_local_and_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in to wandb
    cfg = from_dict({"model": {"name_or_path": "m"}, "output": {"dir": str(tmp_path / "sweep" / "beta0.1")}})
    s = trackers.resolve(cfg, env={"WANDB_API_KEY": "k"})
    assert s["mlflow_tracking_uri"] == f"file://{tmp_path}/sweep/beta0.1/mlruns" and s["wandb_mode"] == "online"
    assert s["run_name"] == "beta0.1" and s["tensorboard_dir"] == f"{tmp_path}/sweep/beta0.1/tensorboard"
    s = trackers.resolve(cfg, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "WANDB_MODE": "disabled"})
    assert s["mlflow_tracking_uri"] == "http://mlflow:5000" and s["wandb_mode"] == "disabled"
    # Relative stores are made absolute: Ray Train workers run in a directory of their own.
    assert trackers.resolve(cfg, env={})["wandb_mode"] == "offline"  # no login: offline rather than a failed start
    s = trackers.resolve(cfg, env={"MLFLOW_TRACKING_URI": "file:./mlruns"})
    assert s["mlflow_tracking_uri"] == f"file://{os.getcwd()}/mlruns"
    shared = from_dict({"model": {"name_or_path": "m"}, "output": {"dir": str(tmp_path / "b")},
                        "logging": {"tensorboard_dir": str(tmp_path / "tb")}})
    assert trackers.resolve(shared, env={})["tensorboard_dir"] == f"{tmp_path}/tb/b"
    assert trackers.scalars({"step": 3, "time": 1.0, "loss": 0.5, "grad_norm": None, "ok": True, "nan": float("nan")}) == {"loss": 0.5}


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path):
    s, params = _settings(tmp_path)
    first = trackers.Trackers(s, params)
    for step in (1, 2, 3):
        first.log(_row(step))
    first.close(ok=False)  # the attempt died after step 3; its checkpoint is at step 2
    ids = json.load(open(s["state_file"]))
    resumed = trackers.Trackers(s, params, resume_step=2)
    for step in (3, 4):
        resumed.log(_row(step))
    resumed.close(ok=True)
    assert json.load(open(s["state_file"])) == ids

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=s["mlflow_tracking_uri"])
    assert client.get_run(ids["mlflow_run_id"]).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(ids["mlflow_run_id"], "loss")) == [1, 2, 3, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(s["tensorboard_dir"])
    tb.Reload()
    assert [e.step for e in tb.Scalars("loss")] == [1, 2, 3, 4]  # the crashed attempt's step 3 purged
    # Both attempts logged to one wandb run id (a directory each; wandb adds -1 within the same second).
    attempts = glob.glob(f"{s['wandb_dir']}/wandb/offline-run-*")
    assert len(attempts) == 2 and all(f"-{ids['wandb_run_id']}" in a for a in attempts)


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path, capsys):
    s, params = _settings(tmp_path)
    s["backends"] = ["tensorboard", "mlflow"]
    t = trackers.Trackers(s, params)
    t.log(_row(1))
    t.active["mlflow"].run_id = "no-such-run"  # as if the tracking server lost the run
    t.log(_row(2))
    t.log(_row(3))
    t.close()
    err = capsys.readouterr().err
    assert err.count("the mlflow tracker failed and is dropped") == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(s["tensorboard_dir"])
    tb.Reload()
    assert [e.step for e in tb.Scalars("loss")] == [1, 2, 3]


def test_a_tracker_that_cannot_start_is_left_out(tmp_path, capsys):
    s, params = _settings(tmp_path)
    s["backends"] = ["mlflow", "tensorboard"]
    s["mlflow_tracking_uri"] = "nosuchstore://host/path"  # no store registered for this scheme
    t = trackers.Trackers(s, params)
    assert list(t.active) == ["tensorboard"]
    t.log(_row(1))
    t.close()
    assert "the mlflow tracker could not start and is left out of this run" in capsys.readouterr().err
