"""A 4-run ``loss.beta`` sweep: ``raydpo sweep`` (Ray Tune trials, shared data and reference stages)
against TRL's DPOTrainer run four times in a row, on ``make bench``'s model, data and machine.

Prints the sweep's wall time against TRL's, each run's fixed cost (its wall time minus its training
steps) and the default-config (``train.cpus_per_worker`` unset) throughput of the cache-hit runs.

    .venv/bin/python bench/sweep_vs_trl.py [--steps 60] [--padding-free]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_batching import DEFAULT_DATA, bench_model  # noqa: E402
from train_vs_trl import explicit_rows, machine, raydpo_config, trl_trainer  # noqa: E402

BETAS = ["0.05", "0.1", "0.2", "0.5"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="TRL's torch threads")
    ap.add_argument("--padding-free", action="store_true", help="raydpo's runs padding-free")
    ap.add_argument("--skip-trl", action="store_true")
    args = ap.parse_args()
    args.device, args.warmup = "cpu", 5
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from raydpo.sweep import sweep
    from raydpo.fixtures.tiny import build_tokenizer

    texts = [json.loads(line) for line in gzip.open(args.data, "rt")]
    tokenizer = build_tokenizer(2048, [r["chosen"] for r in texts] + [r["rejected"] for r in texts])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model(tmp, tokenizer, 256, 4, args.max_length)
        rows, _ = explicit_rows(args.data, tokenizer, args.max_length, args.pairs)
        jsonl = os.path.join(tmp, "pairs.jsonl")
        with open(jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"machine: {machine(args)}; {len(rows)} hh-rlhf pairs, batch {args.batch_size}, {args.steps} steps per run")
        raw = raydpo_config(jsonl, model_dir, tmp, "sweep", args, args.padding_free)
        raw["train"].pop("cpus_per_worker")  # the default rule, as a new user runs it
        raw["logging"] = {"console": "quiet"}
        t0 = time.perf_counter()
        summary = sweep(raw, [f"loss.beta={','.join(BETAS)}"], concurrent=1)
        r_total = time.perf_counter() - t0
        per_run = []
        for row in summary["runs"]:
            run_dir = os.path.join(tmp, "sweep", "runs", row["run"])
            s = json.load(open(os.path.join(run_dir, "summary.json")))
            steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
            step_s = sum(m["step_time_s"] for m in steps)
            rate = sum(1 for _ in steps[5:]) * args.batch_size / sum(m["step_time_s"] for m in steps[5:])
            per_run.append((row["run"], s["timings_s"], step_s, rate))
        print(f"\nraydpo sweep: {r_total:.1f} s (shared stages {summary['timings_s']['shared_stages']:.1f} s, "
              f"trials {summary['timings_s']['trials']:.1f} s)")
        for name, timings, step_s, rate in per_run:
            print(f"  {name}: run {timings['total']:.1f} s, steps {step_s:.1f} s, fixed {timings['total'] - step_s:.1f} s "
                  f"(data {timings['data']:.1f}, reference {timings['reference']:.1f}, train stage {timings['train']:.1f}), "
                  f"{rate:.2f} pairs/s after warm-up")
        if args.skip_trl:
            return
        t_times = []
        for beta in BETAS:
            t1 = time.perf_counter()
            trl_trainer(rows, model_dir, os.path.join(tmp, f"trl-{beta}"), args, False, beta=float(beta)).train()
            t_times.append(time.perf_counter() - t1)
        t_total = sum(t_times)
        print(f"TRL, 4 runs in a row: {t_total:.1f} s ({', '.join(f'{t:.1f}' for t in t_times)})")
        print(f"4-run beta sweep: raydpo {r_total:.1f} s vs TRL {t_total:.1f} s: {t_total / r_total:.2f}x")


if __name__ == "__main__":
    main()
