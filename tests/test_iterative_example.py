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
