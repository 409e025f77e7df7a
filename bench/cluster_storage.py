"""One run on two nodes that share no disk, with every path on S3, against the same run on one node
with local paths: wall time, and what crosses the driver process.

    .venv/bin/python bench/cluster_storage.py [--steps 20] [--repeats 2]

Two-node: a ``ray start`` head plus a second node inside ``unshare -m`` with a tmpfs over the run
directory (it sees its own empty disk, as a second host does); trainers and reference actors pinned
to the second node; data, both caches, checkpoints and ``output.dir`` on moto's S3 server on
127.0.0.1 (tests/s3.py, tests/cluster.py). One node: one ``ray start`` head with as many logical CPUs
as the two nodes together, everything on the local disk. The same ``raydpo train`` command, a fresh
driver process joining the cluster, cold caches each time.

What crosses the driver: its process's bytes through ``read``/``write`` system calls (``rchar`` and
``wchar`` of ``/proc/<pid>/io``: sockets, S3 and the Ray object store's transfers included, not
page-cache tricks), sampled at the end of the run, and its peak RSS. Needs ``unshare`` (root) and
``moto[server]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cluster import RayNodes, unshare_works  # noqa: E402
from s3 import S3Server, aws_environment, free_port  # noqa: E402


def _io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().split("\n") if line)}


def driver_run(args: list[str], env: dict) -> dict:
    """``raydpo`` as its own process; wall seconds, peak RSS and its bytes through read/write system
    calls, in all and from the data stage's first line on (after start-up's imports and Ray's start)."""
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "raydpo", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tempfile.gettempdir())
    lines, marks = [], {}

    def follow() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "data: reading" in line and "stages" not in marks:
                try:
                    marks["stages"] = _io(proc.pid)
                except OSError:
                    pass

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    io, rss = {}, 0
    while proc.poll() is None:
        try:
            io = _io(proc.pid)
            with open(f"/proc/{proc.pid}/status") as f:
                rss = max(rss, next(int(line.split()[1]) for line in f if line.startswith("VmHWM")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.1)
    reader.join()
    if proc.returncode:
        raise RuntimeError("".join(lines)[-3000:])
    base = marks.get("stages", {"rchar": 0, "wchar": 0})
    mb = lambda n: round(n / 1e6, 2)  # noqa: E731
    return {"wall_s": round(time.perf_counter() - start, 1), "driver_read_mb": mb(io.get("rchar", 0)),
            "driver_written_mb": mb(io.get("wchar", 0)), "driver_read_during_stages_mb": mb(io.get("rchar", 0) - base["rchar"]),
            "driver_written_during_stages_mb": mb(io.get("wchar", 0) - base["wchar"]), "driver_peak_rss_mb": round(rss / 1024, 1)}


def config(model: str, data: str, cache: str, out: str, gcs: str, steps: int, pin: bool) -> dict:
    where = {"resources": {"second_node": 1}} if pin else {}
    return {"model": {"name_or_path": model},
            "reference": {"cache_dir": cache, "batch_size": 64, **where},
            "data": {"train": f"{data}/train.jsonl", "eval": f"{data}/eval.jsonl", "max_length": 64, "num_workers": 1},
            "train": {"num_workers": 2, "micro_batch_size": 8, "cpus_per_worker": 1, "max_steps": steps, "checkpoint_every": steps // 2,
                      "eval_every": 0, **where},
            "output": {"dir": out}, "ray": {"address": gcs}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if unshare_works():
        sys.exit(f"needs a private mount namespace: {unshare_works()}")
    import yaml

    from raydpo import storage
    from raydpo.fixtures.synthetic import write_task
    from raydpo.fixtures.tiny import write_tiny_model

    work = tempfile.mkdtemp(prefix="raydpo-bench-cluster-")
    model = write_tiny_model(os.path.join(work, "model"))
    write_task(os.path.join(work, "data"), 2000, 200, 0)
    port = free_port()
    os.environ.update(aws_environment(port))
    s3 = S3Server(port)
    results = {"one node, local disk": [], "two nodes, no shared disk, S3": []}
    try:
        bucket = s3.bucket("bench-cluster")
        for name in ("train.jsonl", "eval.jsonl"):
            storage.write_bytes(f"{bucket}/data/{name}", open(os.path.join(work, "data", name), "rb").read())
        for r in range(args.repeats):
            for label in results:
                local = os.path.join(work, f"local-{label[:3]}-{r}")
                os.makedirs(local)
                nodes = RayNodes(f"/tmp/raydpo-bench-{os.getpid()}", work)
                try:
                    two = label.startswith("two")
                    if two:
                        nodes.head(3, {"head_node": 8}).node(4, {"second_node": 8}, private_dir=local)
                        cfg = config(model, f"{bucket}/data", f"{bucket}/{r}/cache", f"{bucket}/{r}/run", nodes.gcs, args.steps, True)
                    else:
                        nodes.head(7, {"head_node": 8})
                        cfg = config(model, os.path.join(work, "data"), f"{local}/cache", f"{local}/run", nodes.gcs, args.steps, False)
                    nodes.wait(2 if two else 1)
                    path = os.path.join(work, f"{label[:3]}-{r}.yaml")
                    with open(path, "w") as f:
                        yaml.safe_dump(cfg, f)
                    results[label].append(driver_run(["train", path], nodes.env))
                    print(label, results[label][-1], flush=True)
                finally:
                    nodes.stop()
    finally:
        s3.stop()
    summary = {label: {k: sorted(run[k] for run in runs) for k in runs[0]} for label, runs in results.items()}
    print(json.dumps({"steps": args.steps, "pairs": 2000, "runs": summary, "pair_bytes": pair_bytes(os.path.join(work, "data"))},
                     indent=1))


def pair_bytes(data_dir: str) -> dict:
    """What the driver still fetches per run (issue 35 removes it): the data stage's tokenized
    blocks (every row's token ids, Arrow bytes) and the reference log-prob columns (digest + two
    float32 per distinct pair), measured on this run's data, in MB."""
    import ray

    from raydpo.config import from_dict
    from raydpo.data.stage import prepare

    ray.init(address="local", num_cpus=4, log_to_driver=False)
    try:
        cfg = from_dict({"model": {"name_or_path": os.path.join(os.path.dirname(data_dir), "model")},
                         "data": {"train": f"{data_dir}/train.jsonl", "eval": f"{data_dir}/eval.jsonl", "max_length": 64,
                                  "num_workers": 1, "cache": False},
                         "output": {"dir": os.path.join(os.path.dirname(data_dir), "sizes")}})
        data = prepare(cfg, os.path.join(os.path.dirname(data_dir), "sizes-quarantine.jsonl"))
        tokenized = sum(ray.get(ref).nbytes for ref in data.processed.to_arrow_refs())
        pairs = data.n_train + data.n_eval
    finally:
        ray.shutdown()
    return {"tokenized_blocks_mb": round(tokenized / 1e6, 3), "logp_columns_mb": round(pairs * (32 + 8) / 1e6, 3)}


if __name__ == "__main__":
    main()
