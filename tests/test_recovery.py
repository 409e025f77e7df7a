"""Fault tolerance with real processes: a Ray Train worker killed by its pid, a driver killed and the
command run again, and the early failure messages. Recovered runs must end where an uninterrupted
run ends: the same loss at every step and the same weights (float32, CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import shared_cache

STEPS = 24


def _raw(tiny_model_dir, synthetic_dir, tmp_path, name):
    # 2 workers x 128 pairs, micro-batches of 16: 8 steps per epoch, so 24 steps cross 2 epoch ends,
    # both after the restart points (the kills wait for steps 14 and 10).
    return {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": shared_cache(), "batch_size": 64},
        "data": {"train": f"{synthetic_dir}/train.jsonl", "max_length": 64},
        "train": {"num_workers": 2, "zero_stage": 2, "micro_batch_size": 16, "learning_rate": 1e-3, "max_steps": STEPS,
                  "num_epochs": 5, "checkpoint_every": 4, "keep_checkpoints": 2, "max_failures": 1, "seed": 0},
        "output": {"dir": str(tmp_path / name)},
    }


def _losses(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _weights(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


def _same_run(run_dir, reference_dir):
    got, want = _losses(run_dir), _losses(reference_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # every step logged once, none repeated
    assert [s for s, _ in want] == [s for s, _ in got]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-5
    w, ref = _weights(os.path.join(run_dir, "model")), _weights(os.path.join(reference_dir, "model"))
    assert max((w[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def _wait_for_step(run_dir, step: int, timeout: float = 300) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(s >= step for s, _ in _losses(run_dir)):
            return
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {path}")


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path_factory):
    from raydpo.config import from_dict
    from raydpo.pipeline import run

    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = run(from_dict(_raw(tiny_model_dir, synthetic_dir, tmp, "run")))
    assert result.status == "fresh" and result.summary["steps"] == STEPS
    return str(tmp / "run")


@pytest.mark.slow
def test_killed_worker_is_recovered_to_the_same_model(uninterrupted, tiny_model_dir, synthetic_dir, tmp_path):
    """SIGKILL rank 1's process mid-run: Ray Train restarts the worker group from the latest
    checkpoint, which continues at the exact next micro-batch."""
    from raydpo.config import from_dict
    from raydpo.pipeline import run

    run_dir = str(tmp_path / "run")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(r=run(from_dict(_raw(tiny_model_dir, synthetic_dir, tmp_path, "run")))))
    thread.start()
    _wait_for_step(run_dir, 14)
    with open(os.path.join(run_dir, "workers", "rank1.json")) as f:
        killed = json.load(f)["pid"]
    os.kill(killed, signal.SIGKILL)
    thread.join(timeout=600)
    assert "r" in outcome, "the run did not recover"
    with open(os.path.join(run_dir, "workers", "rank1.json")) as f:
        now = json.load(f)
    # A new worker process took rank 1 and started from a checkpoint (every 4 steps), not from step 0:
    # the latest one Ray Train's controller had registered when the worker died.
    assert now["pid"] != killed and now["start_step"] >= 4 and now["start_step"] % 4 == 0
    assert outcome["r"].summary["steps"] == STEPS
    _same_run(run_dir, uninterrupted)


@pytest.mark.slow
def test_killed_driver_then_the_same_command_resumes(uninterrupted, ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """``raydpo train`` killed with SIGKILL mid-run; the same command run again resumes from the
    checkpoint and ends with the uninterrupted model; a third run says the run is finished."""
    from raydpo.cli import main

    raw = _raw(tiny_model_dir, synthetic_dir, tmp_path, "run")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "raydpo", "train", str(cfg_path), f"ray.address={address}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(raw["output"]["dir"], 10)
    finally:
        driver.kill()
        driver.wait()
    time.sleep(3)  # Ray ends the dead driver's job and its Train workers
    assert main(["train", str(cfg_path)]) == 0
    summary = json.load(open(os.path.join(raw["output"]["dir"], "summary.json")))
    assert summary["start"] == "resume" and summary["finished"]
    with open(os.path.join(raw["output"]["dir"], "workers", "rank0.json")) as f:
        assert json.load(f)["start_step"] >= 4
    _same_run(raw["output"]["dir"], uninterrupted)
    before = os.path.getmtime(os.path.join(raw["output"]["dir"], "summary.json"))
    assert main(["train", str(cfg_path)]) == 0  # finished: nothing to do
    assert os.path.getmtime(os.path.join(raw["output"]["dir"], "summary.json")) == before


def test_resuming_with_other_numbers_is_refused(tmp_path):
    from raydpo.train.resume import config_changes, prepare_run_dir

    old = {"train": {"learning_rate": 1e-3, "max_failures": 0}, "ray": {"num_cpus": 4}, "loss": {"beta": 0.1}}
    new = {"train": {"learning_rate": 2e-3, "max_failures": 3}, "ray": {"num_cpus": 8}, "loss": {"beta": 0.1}}
    assert config_changes(old, new) == ["train.learning_rate"]
    out = tmp_path / "run"
    # Two runs' checkpoints in one train.storage_path, each under its own run name.
    mine, theirs = out / "ray_train" / "raydpo-run-aaaa", out / "ray_train" / "raydpo-other-bbbb"
    (mine / "step_00000004").mkdir(parents=True)
    (theirs / "step_00000002").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    paths = {k: str(out / v) for k, v in {"dir": "", "config": "config.yaml", "summary": "summary.json", "metrics": "metrics.jsonl",
                                           "train_result": "train_result.json", "guard": "guard.json", "model": "model"}.items()}
    with pytest.raises(ValueError, match=r"other values of train.learning_rate; .* --force"):
        prepare_run_dir(paths, new, str(mine), force=False)
    assert prepare_run_dir(paths, old, str(mine), force=False) == "resume"
    assert prepare_run_dir(paths, old, str(theirs.parent / "raydpo-new-cccc"), force=False) == "fresh"  # not another run's
    assert prepare_run_dir(paths, new, str(mine), force=True) == "restart"
    assert not mine.exists() and (theirs / "step_00000002").is_dir()  # --force removed its own checkpoints only


def _fails(capsys, cfg_path, *overrides) -> str:
    from raydpo.cli import main

    assert main(["train", str(cfg_path), *overrides]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("case", ["unwritable", "missing_model", "no_pad_token", "cannot_fit"])
def test_early_failures_say_what_to_change(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path, capsys, case):
    """Each stops on the driver before any worker starts, with one line naming the problem."""
    raw = _raw(tiny_model_dir, synthetic_dir, tmp_path, "run")
    if case == "unwritable":
        (tmp_path / "a-file").write_text("")
        raw["output"]["dir"] = str(tmp_path / "a-file" / "run")
        expected = "is not writable"
    elif case == "missing_model":
        raw["model"]["name_or_path"] = str(tmp_path / "no-such-model")
        expected = "is not a Hugging Face model directory"
    elif case == "no_pad_token":
        model = tmp_path / "no-pad"
        shutil.copytree(tiny_model_dir, model)
        tok = json.loads((model / "tokenizer_config.json").read_text())
        tok.update(pad_token=None, eos_token=None)
        (model / "tokenizer_config.json").write_text(json.dumps(tok))
        for name in ("special_tokens_map.json",):
            if (model / name).exists():
                (model / name).unlink()
        raw["model"]["name_or_path"] = str(model)
        expected = "has neither a pad nor an EOS token"
    else:  # a 7B Llama config (no weights needed: parameters are counted on the meta device)
        model = tmp_path / "big"
        shutil.copytree(tiny_model_dir, model)
        config = json.loads((model / "config.json").read_text())
        config.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=128, vocab_size=32000)
        (model / "config.json").write_text(json.dumps(config))
        raw["model"]["name_or_path"] = str(model)
        raw["train"]["zero_stage"] = 0
        expected = "the policy does not fit: 6.74B parameters"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    err = _fails(capsys, cfg_path)
    assert expected in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run" / "workers")  # no train worker ever started


def test_disk_check():
    from raydpo.config import from_dict
    from raydpo.train.preflight import GB, check_disk, disk_need

    cfg = from_dict({"model": {"name_or_path": "m"}, "train": {"checkpoint_every": 100, "keep_checkpoints": 2}})
    need = disk_need(10**9, cfg)  # 1B float32: 4 GB export + 3 x (16 GB of state) checkpoints
    assert 50 * GB < need < 60 * GB
    check_disk(need, 100 * GB, "/runs")
    with pytest.raises(OSError, match=r"not enough disk space under /runs: .* need about 5\d\.\d GiB and 10\.0 GiB are free"):
        check_disk(need, 10 * GB, "/runs")
