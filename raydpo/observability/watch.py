"""Trainer progress on the console: the driver follows rank 0's metrics.jsonl while Ray Train runs.

Printing from the driver, not the workers, keeps the lines free of Ray's per-worker prefixes and
colours, lets a terminal show one live status line, and works wherever rank 0 runs (the run
directory is on storage every node and the driver share, as for the rest of the run).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time

from raydpo.observability import console


def _quality(row: dict, prefix: str = "") -> str:
    """Reward accuracy of pairs, or KTO's KL estimate (unpaired examples have no accuracy)."""
    acc = row.get(f"{prefix}rewards/accuracies")
    return f"acc {acc:.3f}" if acc is not None else f"kl {row.get(f'{prefix}kl', float('nan')):.4f}"


def train_line(row: dict, total: int, eta: str, verbose: bool) -> str:
    """One training row as a console line: step / total, loss, reward accuracy (KTO: KL), pairs/s and ETA."""
    unit = "pairs" if "rewards/accuracies" in row else "examples"
    line = (f"train: step {row['step']}/{total} loss {row['loss']:.4f} {_quality(row)} "
            f"{row['pairs_per_s']:.1f} {unit}/s {eta}")
    if verbose:
        grad = row.get("grad_norm")
        line += (f" | epoch {row['epoch']} margin {row.get('rewards/margins', float('nan')):+.4f} chosen {row['rewards/chosen']:+.4f} "
                 f"rejected {row['rewards/rejected']:+.4f} logps {row['logps/chosen']:.2f}/{row['logps/rejected']:.2f} "
                 f"lr {row['learning_rate']:.2e}" + (f" grad_norm {grad:.3f}" if grad is not None else "")
                 + f" {row['tokens_per_s']:,.0f} tokens/s")
    return line


def eval_line(row: dict) -> str:
    unit = "pairs" if "eval/rewards/accuracies" in row else "examples"
    return (f"eval @ step {row['step']}: loss {row['eval/loss']:.4f} {_quality(row, 'eval/')} "
            f"margin {row.get('eval/rewards/margins', float('nan')):+.4f} ({int(row['eval/pairs']):,} {unit})")


class MetricsWatcher:
    """Prints the rows rank 0 appends to ``path`` (a background thread; use as a context manager).

    Rows written before the watcher started (a resumed run's earlier attempt) are skipped. When
    rank 0 replaces the file (it trims it back to the checkpoint whenever a worker group starts,
    also after a restart within this run), the rows kept from before are skipped and the steps
    logged again are shown again."""

    def __init__(self, path: str, total_steps: int, out: console.Console | None = None, poll_s: float = 0.5):
        self.path, self.total, self.poll_s = path, total_steps, poll_s
        self.out = out or console.get()
        self.started = time.time()
        self.offset, self.file_id = 0, None
        self.seen: set[tuple[str, int, float]] = set()  # (kind, step, time): a step logged again is new
        self.first: tuple[int, float] | None = None  # (step, time) of the first training row shown
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydpo-metrics-watcher", daemon=True)

    def __enter__(self) -> "MetricsWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # whatever landed since the last poll

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Show the complete rows appended since the last poll."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != self.file_id or st.st_size < self.offset:
                    self._replaced()
                    self.file_id = (st.st_dev, st.st_ino)
                f.seek(self.offset)
                chunk = f.read()
        except OSError:  # not written yet, or being replaced
            return
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        for line in chunk[:end].splitlines():
            try:
                self.show(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a row from another version of raydpo: the file has it, the console skips it

    def _replaced(self) -> None:
        """A new file (or one cut short): read it from the start; the rows already shown are
        known by their time, and the ETA restarts with the new attempt."""
        if self.file_id is not None:
            self.first = None
        self.offset = 0

    def show(self, row: dict) -> None:
        kind = "train" if "loss" in row else "eval"
        key = (kind, int(row["step"]), row.get("time"))
        # One second of slack for clocks of other nodes; rows without a time are from an older raydpo.
        if key in self.seen or row.get("time", -math.inf) < self.started - 1.0:
            return
        self.seen.add(key)
        if kind == "eval":
            self.out.say(eval_line(row))
            return
        step, now = row["step"], row["time"]
        if self.first is None:  # from this row's own step time until there are two rows
            self.first = (step - 1, now - row["step_time_s"])
        eta = console.eta(step - self.first[0], self.total - self.first[0], now - self.first[1])
        self.out.update("train", train_line(row, self.total, eta, self.out.enabled("verbose")), final=step >= self.total)
