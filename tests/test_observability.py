"""Seeing a run: console progress of a real `raydpo train` piped to a file, the three experiment
trackers writing offline, and `raydpo report` over the real run directories.

One training run (a subprocess joining the session's Ray cluster, stdout and stderr piped) feeds
most tests here; a second, shorter one with another beta gives the comparison report.
"""

import glob
import html.parser
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

CONTROL = re.compile(r"[\r\x1b\x07\x08]")


@pytest.fixture(scope="module")
def piped_run(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path_factory):
    """A real run with every tracker in offline mode, its console output captured from a pipe."""
    tmp = tmp_path_factory.mktemp("observed")
    train = tmp / "train.jsonl"
    lines = open(os.path.join(synthetic_dir, "train.jsonl")).read().splitlines()
    # Two bad rows: the console and the report must account for them by reason.
    train.write_text("\n".join(lines + ['{"prompt": "p", "chosen": "c"}', "not json"]) + "\n")
    cfg = {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": str(tmp / "cache"), "batch_size": 32},
        "data": {"train": str(train), "eval": os.path.join(synthetic_dir, "eval.jsonl"), "max_length": 64, "num_workers": 1,
                 "tokenize_batch_size": 32},  # blocks of 32 pairs: the reference pool reports several times
        "train": {"num_workers": 2, "zero_stage": 0, "micro_batch_size": 8, "learning_rate": 1e-3, "max_steps": 8,
                  "eval_every": 4, "seed": 0},
        "output": {"dir": str(tmp / "run")},
        "logging": {"progress_every_s": 0, "backends": ["tensorboard", "mlflow", "wandb"], "wandb_mode": "offline",
                    "project": "raydpo-tests"},
        "ray": {"address": ray_cluster.get_runtime_context().gcs_address},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))} | {"RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "raydpo", "train", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, timeout=600)
    (tmp / "console.log").write_text(out.stdout)  # to read after a failure
    assert out.returncode == 0, out.stdout[-5000:]
    run = tmp / "run"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return {"dir": run, "log": out.stdout, "train": [r for r in rows if "loss" in r], "eval": [r for r in rows if "eval/loss" in r],
            "summary": json.load(open(run / "summary.json")), "tmp": tmp, "cfg": cfg}


@pytest.mark.slow
def test_piped_progress_has_each_stage_and_no_control_characters(piped_run):
    log, train = piped_run["log"], piped_run["train"]
    ours = [line for line in log.splitlines() if line.startswith("[raydpo] ")]
    assert not CONTROL.search(log), [line for line in log.splitlines() if CONTROL.search(line)][:3]
    # No console line glued onto a line Ray forwards from a worker (those start with "(Actor pid=...)").
    glued = [line for line in log.splitlines() if "[raydpo] " in line and not line.startswith(("[raydpo] ", "("))]
    assert not glued, glued[:3]
    data = next(line for line in ours if re.match(r"\[raydpo\] data: [\d,]+ rows read, ", line))
    assert "tokenized" in data and "quarantined" in data
    assert any(line.startswith("[raydpo] data: 322 rows read in ") and "2 quarantined (" in line for line in ours)
    assert any(re.match(r"\[raydpo\] reference train: [\d,]+/256 pairs scored, [\d,.]+ pairs/s, ETA \d+", line) for line in ours)
    assert any(line.startswith("[raydpo] reference train: 256 pairs scored in ") for line in ours)
    steps = [line for line in ours if line.startswith("[raydpo] train: step ")]
    # Written once per logged step (rank 0's rows only), in order, each with its values and an ETA.
    assert [int(re.search(r"step (\d+)/8", s).group(1)) for s in steps] == [r["step"] for r in train] == list(range(1, 9))
    for line, row in zip(steps, train):
        assert f"loss {row['loss']:.4f} acc {row['rewards/accuracies']:.3f} {row['pairs_per_s']:.1f} pairs/s ETA " in line
    assert [line for line in ours if line.startswith("[raydpo] eval @ step")][0].startswith("[raydpo] eval @ step 0: loss 0.6931")
    assert "[raydpo] done: 8 steps" in log


@pytest.mark.slow
def test_each_tracker_wrote_the_metrics_and_config_offline(piped_run):
    run, train, evals = piped_run["dir"], piped_run["train"], piped_run["eval"]
    state = json.load(open(run / "trackers.json"))
    # TensorBoard: every metrics.jsonl value at its step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    assert [(e.step, round(e.value, 5)) for e in tb.Scalars("loss")] == [(r["step"], round(r["loss"], 5)) for r in train]
    assert [e.step for e in tb.Scalars("eval/rewards/accuracies")] == [r["step"] for r in evals] == [0, 4, 8]
    assert "config/text_summary" in tb.Tags()["tensors"]  # the resolved config as text
    # MLflow: a local file store under the run directory (no server).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{run}/mlruns")
    mrun = client.get_run(state["mlflow_run_id"])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "run"
    assert mrun.data.params["loss.beta"] == "0.1" and mrun.data.params["train.max_steps"] == "8"
    history = client.get_metric_history(state["mlflow_run_id"], "rewards/margins")
    assert [(m.step, round(m.value, 5)) for m in history] == [(r["step"], round(r["rewards/margins"], 5)) for r in train]
    assert glob.glob(f"{run}/mlruns/*/{state['mlflow_run_id']}/artifacts/config.json")
    # wandb offline: the run file holds the metric names, the logged values and the config.
    files = glob.glob(f"{run}/wandb/offline-run-*-{state['wandb_run_id']}/run-{state['wandb_run_id']}.wandb")
    assert len(files) == 1
    blob = open(files[0], "rb").read()
    for key in ("loss", "rewards/accuracies", "eval/loss", "pairs_per_s", "learning_rate", "max_steps"):
        assert key.encode() in blob, key
    assert json.dumps(train[-1]["loss"]).encode() in blob


class _Checker(html.parser.HTMLParser):
    """Balanced tags and the images the page refers to."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def _check_report(path):
    page = open(path).read()
    checker = _Checker()
    checker.feed(page)
    assert page.startswith("<!DOCTYPE html>") and checker.stack == [], checker.stack
    from PIL import Image

    for name in checker.images:
        png = os.path.join(os.path.dirname(path), name)
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
            assert im.size[0] >= 600 and im.size[1] >= 300
    return page, checker


@pytest.mark.slow
def test_report_for_a_real_run_has_plots_and_the_metric_values(piped_run, tmp_path):
    from raydpo.cli import main
    from raydpo.observability.report.html import fmt

    assert main(["report", str(piped_run["dir"]), "--out", str(tmp_path / "rep")]) == 0
    page, checker = _check_report(tmp_path / "rep" / "report.html")
    assert sorted(checker.images) == sorted(["loss.png", "reward_accuracy.png", "reward_margins.png", "rewards.png", "logps.png",
                                             "learning_rate.png", "throughput.png", "token_lengths.png"])
    text = " ".join(checker.text)
    last, last_eval, s = piped_run["train"][-1], piped_run["eval"][-1], piped_run["summary"]
    for value in (last["loss"], last["rewards/accuracies"], last["rewards/margins"], last["logps/chosen"], last["learning_rate"],
                  last_eval["eval/loss"], last_eval["eval/rewards/margins"], piped_run["train"][0]["loss"]):
        assert fmt(value) in text, value
    assert fmt(s["rows_read"]) in text and "quarantined: missing_field" in text and "quarantined: invalid_json" in text
    assert s["token_length_histogram"]["edges"][-1] == 64
    assert sum(s["token_length_histogram"]["prompt"]) == s["rows_used"]


@pytest.mark.slow
def test_report_compares_runs_of_a_sweep(piped_run, tiny_model_dir, tmp_path):
    from raydpo.cli import main

    cfg = piped_run["cfg"] | {"loss": {"beta": 0.5}, "output": {"dir": str(tmp_path / "beta0.5")}}
    cfg["train"] = cfg["train"] | {"num_workers": 1, "max_steps": 2, "eval_every": 0}
    cfg["logging"] = {"console": "quiet"}
    cfg.pop("ray")  # in-process: the session's cluster
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    assert main(["report", str(piped_run["dir"]), str(tmp_path / "beta0.5"), "--out", str(tmp_path / "cmp")]) == 0
    page, checker = _check_report(tmp_path / "cmp" / "report.html")
    text = " ".join(checker.text)
    assert "run (loss.beta=0.1" in text and "beta0.5 (loss.beta=0.5" in text
    assert "Config differences" in text and "train.max_steps" in text
    assert "loss.png" in checker.images and "token_lengths.png" in checker.images


def test_report_of_a_data_only_run_and_of_a_wrong_directory(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path, capsys):
    from raydpo.cli import main

    cfg = {"model": {"name_or_path": tiny_model_dir}, "data": {"train": f"{synthetic_dir}/eval.jsonl", "max_length": 64, "num_workers": 1},
           "output": {"dir": str(tmp_path / "vd")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate-data", str(tmp_path / "cfg.yaml")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[raydpo\] data: 64 rows read in \d+s: 64 kept \(train 64\), 0 quarantined, 0 filtered", out)
    assert main(["validate-data", str(tmp_path / "cfg.yaml"), "--quiet"]) == 0
    quiet = capsys.readouterr().out
    assert "[raydpo]" not in quiet and json.loads(quiet)["rows_read"] == 64
    assert main(["report", str(tmp_path / "vd")]) == 0
    page, checker = _check_report(tmp_path / "vd" / "report" / "report.html")
    assert checker.images == ["token_lengths.png"] and "no metrics.jsonl" in page
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "is not a raydpo run directory" in capsys.readouterr().err


def test_a_missing_tracker_package_is_named_with_its_extra(tiny_model_dir, synthetic_dir, tmp_path, capsys, monkeypatch):
    from raydpo.observability import trackers
    from raydpo.cli import main

    # Point the wandb backend at a module that does not exist, as on a machine without the extra.
    monkeypatch.setitem(trackers.PACKAGES, "wandb", ("raydpo_no_such_wandb", "wandb"))
    cfg = {"model": {"name_or_path": tiny_model_dir}, "data": {"train": f"{synthetic_dir}/eval.jsonl"},
           "output": {"dir": str(tmp_path / "run")}, "logging": {"backends": ["tensorboard", "wandb"]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "logging.backends includes 'wandb'" in err and "pip install 'raydpo[wandb]'" in err
    assert not (tmp_path / "run").exists()  # refused before any stage ran
    assert main(["train", str(tmp_path / "cfg.yaml"), "logging.backends=[tensorboard,comet]"]) == 2
    assert "logging.backends" in capsys.readouterr().err
