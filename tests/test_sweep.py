"""`raydpo sweep`: a 2x2 grid as Ray Tune trials on the tiny model, the shared stages run once."""

import json
import os

import pytest
import yaml

from raydpo.cli import main
from raydpo.config import ConfigError
from raydpo.sweep.grid import parse_grid, points, run_name
from raydpo.sweep.run import capacity
from ray_actors import actors_created

# Two keys (the grid's product and the run names), two runs: each trial is a whole training run.
GRID = ["loss.beta=0.1,0.5", "train.learning_rate=5e-4"]


def write_config(tiny_model_dir, synthetic_dir, tmp) -> str:
    raw = {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": str(tmp / "cache"), "batch_size": 32},
        "data": {"train": [os.path.join(synthetic_dir, "train.jsonl")], "eval": [os.path.join(synthetic_dir, "eval.jsonl")],
                 "max_length": 64, "num_workers": 1},
        "train": {"num_workers": 1, "micro_batch_size": 4, "max_steps": 3, "zero_stage": 2},
        "output": {"dir": str(tmp / "sweep")},
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_grid_parsing_and_names():
    grid = parse_grid(["loss.beta=0.1,0.5", "loss.type=[sigmoid,sft],ipo"])
    assert grid == {"loss.beta": ["0.1", "0.5"], "loss.type": ["[sigmoid,sft]", "ipo"]}
    assert [p["loss.type"] for p in points(grid)] == ["[sigmoid,sft]", "ipo", "[sigmoid,sft]", "ipo"]
    assert run_name({"loss.type": "[sigmoid,sft]", "loss.beta": "0.1"}) == "loss.type=_sigmoid,sft_,loss.beta=0.1"
    for bad in (["loss.beta"], ["loss.beta="], ["loss.beta=0.1,,0.2"], ["loss.beta=1", "loss.beta=2"], []):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_capacity_counts_trial_drivers_and_workers():
    from raydpo.config import Config

    cfg = Config()
    cfg.train.num_workers, cfg.train.cpus_per_worker = 2, 1.0
    assert capacity(cfg, 8, 0) == 2  # (1 driver + 2 workers) per run
    assert capacity(cfg, 2, 0) == 1  # never 0: one run at a time always goes
    cfg.train.use_gpu = True
    assert capacity(cfg, 64, 4) == 2


def test_bad_grid_stops_before_any_run(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, synthetic_dir, tmp_path)
    assert main(["sweep", cfg, "--grid", "loss.betta=0.1,0.2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key loss.betta (did you mean loss.beta?)" in err and "valid keys are" in err
    assert main(["sweep", cfg, "--grid", "loss.beta=0.1,fast"]) == 2
    err = capsys.readouterr().err
    assert "sweep run 'loss.beta=fast' (grid keys loss.beta)" in err
    assert not os.path.exists(tmp_path / "sweep")


@pytest.mark.slow
def test_a_two_key_sweep_shares_stages_finishes_reports_and_resumes(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path, capsys):
    cfg = write_config(tiny_model_dir, synthetic_dir, tmp_path)
    tokenizers, scorers = actors_created("Preprocess"), actors_created("ReferenceScorer")
    assert main(["sweep", cfg, *sum((["--grid", g] for g in GRID), []), "--concurrent", "99"]) == 0
    said = capsys.readouterr()
    out = said.out + said.err
    sweep_dir = tmp_path / "sweep"
    summary = json.load(open(sweep_dir / "sweep.json"))
    names = [r["run"] for r in summary["runs"]]
    assert names == ["loss.beta=0.1,train.learning_rate=5e-4", "loss.beta=0.5,train.learning_rate=5e-4"]
    # The data and reference stages ran once for both: one tokenizer actor for both splits and one
    # reference actor per split (train and eval files); the later runs and every trial read the caches.
    assert actors_created("Preprocess") - tokenizers == 1
    assert actors_created("ReferenceScorer") - scorers == 2
    shared = summary["shared"]
    assert [s["data_hit"] for s in shared] == [False, True]
    assert [s["reference_hit"] for s in shared] == [False, True]
    assert len({json.dumps(s["reference"], sort_keys=True) for s in shared}) == 1
    assert "2 runs share 1 tokenized-data entry and 1 reference entry" in out
    assert "clamped to" in out
    for name in names:
        run = json.load(open(sweep_dir / "runs" / name / "summary.json"))
        assert run["finished"] and run["steps"] == 3
        assert run["data_cache"]["hit"] is True and all(r["cache_hit"] for r in run["reference"].values())
        assert os.path.exists(sweep_dir / "runs" / name / "model" / "config.json")
    rows = {r["run"]: r for r in summary["runs"]}
    assert all(r["status"] == "fresh" and r["steps"] == 3 and "eval/loss" in r for r in rows.values())
    # The grid changes training: the runs end with different losses; the table shows each.
    assert len({round(r["eval/loss"], 6) for r in rows.values()}) == 2
    assert all(name in out for name in names) and "eval/loss" in out
    report = open(summary["report"]).read()
    assert "loss.beta" in report and "learning_rate" in report

    # A rerun skips the finished runs (each trial finds its finished run directory).
    assert main(["sweep", cfg, *sum((["--grid", g] for g in GRID), [])]) == 0
    again = json.load(open(sweep_dir / "sweep.json"))
    assert [r["status"] for r in again["runs"]] == ["finished"] * 2
    assert actors_created("Preprocess") - tokenizers == 1 and actors_created("ReferenceScorer") - scorers == 2


def test_default_cores_rule(ray_cluster):
    from raydpo.cluster import default_train_cpus, resolve_train_cpus
    from raydpo.config import Config

    assert default_train_cpus(1, cores=2, concurrent_cores=0, free_cpus=8) == 2  # one worker: the whole machine
    assert default_train_cpus(2, cores=2, concurrent_cores=0, free_cpus=8) == 1
    assert default_train_cpus(2, cores=16, concurrent_cores=4, free_cpus=8) == 4  # placeable: 8 free CPUs / 2
    assert default_train_cpus(2, cores=16, concurrent_cores=4, free_cpus=32) == 6  # a streaming pool keeps 4 cores
    assert default_train_cpus(4, cores=2, concurrent_cores=1, free_cpus=1) == 1  # never below 1
    # On the session's one-node CPU cluster: the cores divided among the workers; an explicit value wins.
    cfg = Config()
    cfg.train.num_workers = 1
    expected = default_train_cpus(1, os.cpu_count(), 0, ray_cluster.available_resources()["CPU"])
    assert resolve_train_cpus(cfg) == cfg.train.cpus_per_worker == expected
    cfg.train.cpus_per_worker = 3.0
    assert resolve_train_cpus(cfg) == 3.0
    cfg.train.cpus_per_worker, cfg.train.use_gpu = None, True
    assert resolve_train_cpus(cfg) == 1.0


def test_trials_get_absolute_local_paths(tiny_model_dir, tmp_path, monkeypatch):
    """A Tune trial runs in its own working directory: relative local paths are anchored on the
    driver (the README's `raydpo sweep examples/tiny.yaml` names runs/tiny-model); hub ids and URIs stay."""
    import shutil

    from raydpo.config import from_dict
    from raydpo.sweep.run import anchored

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    cfg = anchored(from_dict({"model": {"name_or_path": "model"}, "reference": {"cache_dir": "cache"},
                              "data": {"train": ["data/*.jsonl", "org/set:train"], "eval": ["s3://bucket/eval.jsonl"]},
                              "train": {"storage_path": "s3://bucket/ckpt"}}))
    assert cfg.model.name_or_path == str(tmp_path / "model") and cfg.reference.cache_dir == str(tmp_path / "cache")
    assert cfg.data.train == [str(tmp_path / "data" / "*.jsonl"), "org/set:train"] and cfg.data.eval == ["s3://bucket/eval.jsonl"]
    assert cfg.train.storage_path == "s3://bucket/ckpt" and cfg.reference.name_or_path is None
