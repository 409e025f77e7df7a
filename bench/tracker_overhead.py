"""What the experiment trackers cost rank 0: start-up and time per logged metrics.jsonl row.

    .venv/bin/python bench/tracker_overhead.py [--rows 500]

Each backend (TensorBoard, MLflow's local file store, wandb offline) gets the same rows the trainer
writes (13 metrics each) through ``raydpo.observability.trackers.Trackers``, in a temporary run directory. The
figure to compare is the per-row time against a training step (tens of ms to seconds): the
trackers' share of a step is that ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from raydpo.observability import trackers
from raydpo.config import from_dict

ROW = {"epoch": 0, "loss": 0.69, "rewards/chosen": 0.1, "rewards/rejected": 0.0, "rewards/accuracies": 0.5,
       "rewards/margins": 0.1, "logps/chosen": -10.0, "logps/rejected": -11.0, "learning_rate": 1e-6, "grad_norm": 1.0,
       "pairs_per_s": 10.0, "tokens_per_s": 1000.0, "step_time_s": 1.0}


def measure(backend: str, rows: int, root: str) -> dict[str, float]:
    cfg = from_dict({"model": {"name_or_path": "unused"}, "output": {"dir": os.path.join(root, backend)},
                     "logging": {"backends": [backend], "wandb_mode": "offline", "console": "quiet"}})
    os.makedirs(cfg.output.dir)
    t0 = time.perf_counter()
    fanout = trackers.Trackers(trackers.resolve(cfg), {"loss": {"beta": 0.1}})
    t1 = time.perf_counter()
    for step in range(1, rows + 1):
        fanout.log(ROW | {"step": step, "time": time.time()})
    t2 = time.perf_counter()
    fanout.close()
    return {"start_s": t1 - t0, "ms_per_row": 1000 * (t2 - t1) / rows, "close_s": time.perf_counter() - t2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=500)
    args = p.parse_args()
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores; {args.rows} rows of {len(ROW)} metrics per backend")
    print(f"{'backend':<12} {'start (s)':>10} {'ms per row':>11} {'close (s)':>10}")
    with tempfile.TemporaryDirectory() as root:
        for backend in ("tensorboard", "mlflow", "wandb"):
            m = measure(backend, args.rows, root)
            print(f"{backend:<12} {m['start_s']:>10.2f} {m['ms_per_row']:>11.2f} {m['close_s']:>10.2f}")


if __name__ == "__main__":
    main()
