"""Small clusters: no stage waits silently for CPUs that its own actors hold.

On a ``ray start --num-cpus=2`` cluster, ``data.num_workers: 2`` tokenizer actors used to take both
CPUs, so the read tasks that feed them never ran and the run sat still with nothing printed. The pool
now leaves a CPU for the reads (on one CPU the actor and the reads share it), and a pool the
cluster has no room for is named at once with the resources it waits for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from cluster import RayNodes


def _config(tiny_model_dir, synthetic_dir, tmp_path, gcs, **reference) -> str:
    raw = {"model": {"name_or_path": tiny_model_dir},
           "reference": {"cache_dir": str(tmp_path / "cache"), **reference},
           "data": {"train": f"{synthetic_dir}/train.jsonl", "eval": f"{synthetic_dir}/eval.jsonl", "max_length": 64,
                    "num_workers": 2},
           "output": {"dir": str(tmp_path / "run")}, "ray": {"address": gcs}}
    path = tmp_path / f"cfg-{len(reference)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("cpus", [1, 2])
def test_the_data_stage_finishes_on_a_one_or_two_cpu_cluster(cpus, tiny_model_dir, synthetic_dir, tmp_path):
    nodes = RayNodes(f"/tmp/raydpo-small-{os.getpid()}-{cpus}", str(tmp_path))  # short: socket paths
    try:
        nodes.head(cpus, {"head_node": 1})
        nodes.wait(1)
        env = nodes.env | {"RAYDPO_TRACEBACK": "1"}
        run = subprocess.run([sys.executable, "-m", "raydpo", "validate-data", _config(tiny_model_dir, synthetic_dir, tmp_path, nodes.gcs)],
                             env=env, capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert "tokenizing on 1 actor(s) (data.num_workers=2 would hold every CPU" in run.stdout
        assert '"rows_read": 320' in run.stdout and '"rows_quarantined": 0' in run.stdout
        if cpus == 2:  # a reference pool no node has room for is named within seconds
            cfg = _config(tiny_model_dir, synthetic_dir, tmp_path, nodes.gcs, resources={"gpu_node": 1})
            proc = subprocess.Popen([sys.executable, "-m", "raydpo", "precompute", cfg], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, cwd=tempfile.gettempdir(), start_new_session=True)
            try:
                deadline, said = time.time() + 180, ""
                while time.time() < deadline and "waiting for" not in said:
                    said += proc.stdout.readline()
                assert ("reference eval: waiting for 1 actor(s) of {CPU: 1, gpu_node: 1}; the cluster's nodes have room for 0"
                        in said), said[-2000:]
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
    finally:
        nodes.stop()
