"""What the driver holds as the data grows: ``raydpo train`` (2 steps) joining a ``ray start``
cluster, at several pair counts, cold caches; then the same command again (both caches hit).

    .venv/bin/python bench/data_scale.py [--pairs 100000 1000000] [--kind synthetic|hh] [--loss simpo]

``synthetic``: short unique pairs (a prompt, two one-line answers). ``hh``: the hh-rlhf rows of
``../shared/data`` repeated with a counter appended to every text, so each pair is unique and the
lengths are real ones. The driver is its own process (``python -m raydpo train``, measured alone:
the cluster's workers are ``ray start``'s); reported per pair count:

- ``driver_peak_rss_mb``: the driver's VmHWM (``/proc/<pid>/status``);
- ``object_store_peak_mb``: the most shared memory in use on the node (``/dev/shm``, where the Ray
  object store's pages live), less what was in use before the run;
- ``data_s_per_kpair`` / ``reference_s_per_kpair``: the stages' seconds (``summary.json``'s
  ``timings_s``) per thousand pairs read;
- ``hit_to_train_s``: on the second run (both caches hit), seconds from the data stage's end to
  the first optimizer step (``timings_s.first_step - timings_s.data``), of which ``hit_reference_s``
  is the reference stage's and ``hit_train_start_s`` the rest (starting the trainers and loading
  their splits).

The goals of issue 35 are ratios between the pair counts (peak RSS at 1M <= 1.25x that at 100k and
under 1 GB; s/pair at 1M <= 1.1x that at 100k), printed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import RayNodes  # noqa: E402
from cluster_storage import driver_run  # noqa: E402

HH = os.path.join(ROOT, "..", "shared", "data", "harmless-base-test.jsonl.gz")


def write_pairs(path: str, n: int, kind: str) -> None:
    """``n`` unique preference rows (jsonl) of ``kind``, written in one pass."""
    base = []
    if kind == "hh":
        with gzip.open(HH, "rt") as f:
            base = [json.loads(line) for line in f if line.strip()]
    with open(path, "w") as out:
        for i in range(n):
            # Numbers at a fixed width: every size has the same token lengths (49 per synthetic pair
            # with the tiny tokenizer), so seconds per pair compare like with like. Unpadded, the
            # 1M set's pairs were 7% longer than the 100k set's.
            if kind == "hh":
                row = base[i % len(base)]
                row = {"chosen": f"{row['chosen']} ({i:07d})", "rejected": f"{row['rejected']} ({i:07d})"}
            else:
                row = {"prompt": f"Question {i:07d}: what is {i % 97:02d} plus {i // 97:05d}?",
                       "chosen": f"It is {i % 97 + i // 97:05d}.", "rejected": f"Maybe {i % 13:02d}."}
            out.write(json.dumps(row) + "\n")


def shm_used() -> int:
    return shutil.disk_usage("/dev/shm").used


def config(model: str, data: str, work: str, gcs: str, loss: str | None = None) -> dict:
    return {"model": {"name_or_path": model}, **({"loss": {"type": loss}} if loss else {}),
            "reference": {"cache_dir": f"{work}/ref-cache", "batch_size": 64},
            "data": {"train": data, "max_length": 128, "num_workers": 1, "cache_dir": f"{work}/data-cache"},
            "train": {"num_workers": 1, "micro_batch_size": 8, "cpus_per_worker": 1, "max_steps": 2,
                      "checkpoint_every": 0, "eval_every": 0},
            "output": {"dir": f"{work}/run"}, "ray": {"address": gcs}}


def measured_run(cfg_path: str, env: dict, out_dir: str) -> dict:
    """One ``raydpo train``: the driver's figures plus the object store's peak and the stage timings."""
    base, peak, done = shm_used(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], shm_used() - base)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = driver_run(["train", cfg_path], env)
    finally:
        done.set()
        watcher.join()
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    t = summary["timings_s"]
    reference = summary.get("reference") if isinstance(summary.get("reference"), dict) else {}  # a string when unused
    return result | {"object_store_peak_mb": round(peak[0] / 1e6, 1), "timings_s": t,
                     "cache_hits": {k: v.get("cache_hit") for k, v in reference.items() if isinstance(v, dict)}}


def one_size(n: int, kind: str, model: str, work: str, loss: str | None = None) -> dict:
    import yaml

    data = os.path.join(work, f"pairs-{n}.jsonl")
    write_pairs(data, n, kind)
    nodes = RayNodes(f"/tmp/raydpo-bench-scale-{os.getpid()}", work)
    try:
        nodes.head(2, {"head_node": 8})
        nodes.wait(1)
        results = {}
        for label in ("cold", "hit"):  # the same caches, a fresh run directory each
            cfg = config(model, data, os.path.join(work, f"run-{n}"), nodes.gcs, loss)
            cfg["output"]["dir"] += f"-{label}"
            path = os.path.join(work, f"cfg-{n}-{label}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            results[label] = measured_run(path, nodes.env, cfg["output"]["dir"])
            print(n, label, json.dumps(results[label]), flush=True)
        cold, hit = results["cold"], results["hit"]
    finally:
        nodes.stop()
        os.remove(data)
    t = cold["timings_s"]
    return {"pairs": n, "driver_peak_rss_mb": cold["driver_peak_rss_mb"], "object_store_peak_mb": cold["object_store_peak_mb"],
            "data_s_per_kpair": round(1000 * t["data"] / n, 4), "reference_s_per_kpair": round(1000 * t.get("reference", 0.0) / n, 4),
            "wall_s": cold["wall_s"], "hit_driver_peak_rss_mb": hit["driver_peak_rss_mb"],
            "hit_to_train_s": round(hit["timings_s"].get("first_step", float("nan")) - hit["timings_s"]["data"], 2),
            "hit_reference_s": hit["timings_s"].get("reference", 0.0),
            # what starting the trainers costs whatever the data size (worker processes, model, DeepSpeed)
            "hit_train_start_s": round(hit["timings_s"].get("first_step", float("nan")) - hit["timings_s"]["data"]
                                       - hit["timings_s"].get("reference", 0.0), 2),
            "hit_cache_hits": hit["cache_hits"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--kind", choices=["synthetic", "hh"], default="synthetic")
    p.add_argument("--loss", default=None, help="loss.type (default sigmoid DPO); a reference-free one (simpo) "
                                                  "measures the data stage and training at sizes whose scoring would not fit")
    args = p.parse_args()
    from raydpo.fixtures.tiny import write_tiny_model

    work = tempfile.mkdtemp(prefix="raydpo-bench-scale-")
    model = write_tiny_model(os.path.join(work, "model"))
    rows = [one_size(n, args.kind, model, work, args.loss) for n in args.pairs]
    out = {"date": time.strftime("%Y-%m-%d"), "kind": args.kind, "loss": args.loss or "sigmoid", "cpus": os.cpu_count(), "sizes": rows}
    if len(rows) > 1:
        small, big = rows[0], rows[-1]
        out["ratios_largest_vs_smallest"] = {
            k: round(big[k] / small[k], 3) for k in ("driver_peak_rss_mb", "object_store_peak_mb", "data_s_per_kpair",
                                                     "reference_s_per_kpair") if small[k]}
    print(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
