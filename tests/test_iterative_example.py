"""examples/iterative_dpo.py runs a round end to end: samples from the policy, ranks, pairs and
trains through the Dataset API, with no pair files."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_iterative_dpo_round(tiny_model_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "iterative_dpo.py"), "--policy", tiny_model_dir, "--out", str(tmp_path / "it"),
         "--rounds", "1", "--prompts", "32", "--samples", "4", "--max-new-tokens", "6", "--steps", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("[iterative]"))
    assert "'round': 0" in line and str(tmp_path / "it" / "round0" / "model") in line
    rows = [json.loads(l) for l in open(tmp_path / "it" / "round0" / "metrics.jsonl") if '"loss"' in l]
    assert [r["step"] for r in rows] == [1, 2]
    # The pairs went from sampler to trainer as Datasets: the run wrote no data files of its own.
    written = {os.path.basename(p) for p in glob.glob(str(tmp_path / "it" / "**" / "*.jsonl*"), recursive=True)}
    assert written <= {"metrics.jsonl", "quarantine.jsonl"}, written
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "it" / "round0" / "model") is not None
