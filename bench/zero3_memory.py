"""A real-sized model through raydpo on CPU: ZeRO-3 + LoRA trainers' host memory, and a cache hit's
reference stage (issue 36's goals).

    .venv/bin/python bench/zero3_memory.py [--tree DIR] [--layers 16] [--hidden 1024]

1. ``raydpo train`` (embedded local Ray cluster, 2 Ray Train workers, ZeRO-3 over gloo, LoRA r=8,
   2 steps, then the merged export) with the tiny model and with a random Llama of ``--layers`` x
   ``--hidden`` (16 x 1024, vocabulary 24,576: 1.3 GB float32), on the same pairs and tokenizer. Each
   worker's host RSS high-water mark: ``workers/rank<r>.json``'s ``peak_rss_mb`` where the tree
   records it, else ``VmHWM`` of the worker's pid polled while it runs. Reported: per rank, the big
   run's peak less the tiny run's, as a multiple of the model's size (goals: <= 0.6x on the rank
   that does not export, <= 1.5x on rank 0, which writes the model).
2. ``raydpo precompute`` of the big model's run again (the reference cache hits): the reference
   stage's seconds (``summary.json`` ``timings_s.reference``: fingerprints, lookup, read), first
   with the digest memo removed (every weight file read, as every run did before the memo), then
   with it (goal: under 1 s).

``--tree``: run another checkout's raydpo (its ``raydpo`` package on PYTHONPATH of the driver and,
through the embedded cluster, of every worker), e.g. the code before this change.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def big_model(out: str, tiny: str, layers: int, hidden: int) -> float:
    """A random Llama of ``layers`` x ``hidden`` with the tiny model's tokenizer; its size in MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=24_576, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512,
                         tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for f in os.listdir(tiny):
        if "token" in f or f.endswith(".jinja"):
            shutil.copy(os.path.join(tiny, f), out)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6


def config(model: str, data: str, cache: str, out: str) -> dict:
    return {"model": {"name_or_path": model, "dtype": "float32", "lora": {"r": 8, "target_modules": ["all-linear"]},
                      "gradient_checkpointing": True},
            "reference": {"num_actors": 1, "batch_size": 16, "cache_dir": cache},
            "data": {"train": data, "max_length": 48, "num_workers": 1},
            "train": {"num_workers": 2, "zero_stage": 3, "micro_batch_size": 2, "max_steps": 2, "eval_every": 0,
                      "checkpoint_every": 0, "cpus_per_worker": 1},
            "output": {"dir": out}}


def watch_workers(out: str, done: threading.Event, peaks: dict) -> None:
    """Poll ``VmHWM`` of the trainers named in ``out/workers/rank*.json`` until ``done``."""
    while not done.is_set():
        for path in glob.glob(os.path.join(out, "workers", "rank*.json")):
            try:
                with open(path) as f:
                    pid = json.load(f)["pid"]
                with open(f"/proc/{pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
            except (OSError, ValueError, KeyError, StopIteration):
                continue
            name = os.path.basename(path)[:-5]
            peaks[name] = max(peaks.get(name, 0.0), kb / 1024)
        time.sleep(0.2)


def run(command: str, cfg: dict, work: str, tree: str | None) -> dict:
    """``raydpo <command> cfg.yaml``; its summary.json and the trainers' peak RSS (MB)."""
    import yaml

    path = os.path.join(work, f"{os.path.basename(cfg['output']['dir'])}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAYDPO_STAT_CACHE": os.path.join(work, "stat-cache.json")} | (
        {"PYTHONPATH": tree} if tree else {})
    done, polled = threading.Event(), {}
    watcher = threading.Thread(target=watch_workers, args=(cfg["output"]["dir"], done, polled), daemon=True)
    watcher.start()
    force = ["--force"] if command == "train" else []
    proc = subprocess.run([sys.executable, "-m", "raydpo", command, path, *force], env=env, capture_output=True, text=True,
                          cwd=work)
    done.set()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    with open(os.path.join(cfg["output"]["dir"], "summary.json")) as f:
        summary = json.load(f)
    peaks = dict(polled)
    for p in glob.glob(os.path.join(cfg["output"]["dir"], "workers", "rank*.json")):
        with open(p) as f:
            recorded = json.load(f).get("peak_rss_mb")
        if recorded is not None:  # the worker's own figure at its end (export included)
            peaks[os.path.basename(p)[:-5]] = recorded
    return {"summary": summary, "peak_rss_mb": peaks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", help="a raydpo checkout to run instead of this one")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--pairs", type=int, default=32)
    args = p.parse_args()
    from raydpo.fixtures.synthetic import write_task
    from raydpo.fixtures.tiny import write_tiny_model

    work = tempfile.mkdtemp(prefix="zero3-bench-")
    try:
        tiny = write_tiny_model(os.path.join(work, "tiny"))
        size_mb = big_model(os.path.join(work, "big"), tiny, args.layers, args.hidden)
        write_task(os.path.join(work, "data"), n_train=args.pairs, n_eval=0)
        data, cache = os.path.join(work, "data", "train.jsonl"), os.path.join(work, "cache")
        small = run("train", config(tiny, data, cache, os.path.join(work, "tiny-run")), work, args.tree)
        big_cfg = config(os.path.join(work, "big"), data, cache, os.path.join(work, "big-run"))
        big = run("train", big_cfg, work, args.tree)
        if os.path.exists(os.path.join(work, "stat-cache.json")):  # the digest memo (this run's own file)
            os.remove(os.path.join(work, "stat-cache.json"))
        unremembered = run("precompute", big_cfg | {"output": {"dir": os.path.join(work, "hit1")}}, work, args.tree)
        remembered = run("precompute", big_cfg | {"output": {"dir": os.path.join(work, "hit2")}}, work, args.tree)
        result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, no GPU", "tree": args.tree or ROOT,
                  "model_mb": round(size_mb, 1), "tiny_peak_rss_mb": small["peak_rss_mb"], "big_peak_rss_mb": big["peak_rss_mb"]}
        for rank in sorted(big["peak_rss_mb"]):
            extra = big["peak_rss_mb"][rank] - small["peak_rss_mb"].get(rank, 0.0)
            result[f"{rank}_extra_mb"] = round(extra, 1)
            result[f"{rank}_extra_x_model"] = round(extra / size_mb, 2)
        result["hit_reference_s_without_memo"] = unremembered["summary"]["timings_s"]["reference"]
        result["hit_reference_s"] = remembered["summary"]["timings_s"]["reference"]
        result["hit"] = all(r.get("cache_hit") for r in remembered["summary"]["reference"].values())
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
