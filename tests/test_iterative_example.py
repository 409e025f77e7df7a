"""examples/iterative_dpo.py: online rounds from the Python API with prompts handed in as
``ray.data.Dataset`` s (no prompt or pair files), the held-out reward printed per round."""

import json
import os
import subprocess
import sys

import pytest

from conftest import on_session_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_iterative_example_runs_rounds_on_datasets(ray_cluster, tiny_model_dir, tmp_path):
    import yaml

    # The example's own config with one trainer (data parallelism is test_online's subject), run as
    # a job on the session's cluster (RAY_ADDRESS: the example's ensure_ray joins it).
    with open(os.path.join(ROOT, "examples", "online.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["train"]["num_workers"] = 1
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "iterative_dpo.py"), "--config", str(tmp_path / "online.yaml"),
         "--policy", tiny_model_dir, "--out", str(tmp_path / "it"), "--rounds", "2", "--prompts", "16", "--steps", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=on_session_cluster(ray_cluster),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("[iterative]")]
    assert [l.split(":")[0] for l in lines[:2]] == ["[iterative] round 0", "[iterative] round 1"], lines
    assert "held-out reward" in lines[-1] and str(tmp_path / "it" / "model") in lines[-1]
    with open(tmp_path / "it" / "summary.json") as f:
        summary = json.load(f)
    assert summary["rounds"] == 2 and summary["steps"] == 4 and summary["prompts"]["train"] == 16 and summary["prompts"]["eval"] == 8
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "it" / "model") is not None


@pytest.mark.slow
def test_shipped_online_example_ends_above_its_first_round_and_keeps_the_best(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """examples/online.yaml as shipped (2 trainers, 4 rounds, RPO) ends with a held-out reward above
    its first round's; with ``online.keep: best`` the exported model is the round whose held-out
    reward was highest, and summary.json says which."""
    import yaml

    from raydpo.config import from_dict
    from raydpo.online.run import run_online

    with open(os.path.join(ROOT, "examples", "online.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["model"]["name_or_path"] = tiny_model_dir
    raw["data"] |= {"train": os.path.join(synthetic_dir, "train.jsonl"), "eval": os.path.join(synthetic_dir, "eval.jsonl")}
    raw["reference"]["cache_dir"] = str(tmp_path / "cache")
    raw["online"]["keep"] = "best"
    raw["output"]["dir"] = str(tmp_path / "online")
    result = run_online(from_dict(raw))
    held = [r["eval/reward_mean"] for r in result.rounds]  # round starts, then after the last round
    assert len(held) == 5 and held[-1] > held[0] + 3.0, held
    s = result.summary
    best = max(range(len(held)), key=lambda i: (held[i], i))  # of equal rewards the later weights
    assert s["keep"] == "best" and s["kept_round"] == best and s["kept_eval_reward"] == held[best], (s, held)
    assert s["final_eval_reward"] == held[-1] and s["initial_eval_reward"] == held[0]
    files = os.listdir(result.model_path)
    assert "model.safetensors" in files and "adapter_config.json" not in files and "tokenizer.json" in files
