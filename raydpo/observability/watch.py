"""Trainer progress on the console: the driver follows what rank 0 posts while Ray Train runs.

Printing from the driver, not the workers, keeps the lines free of Ray's per-worker prefixes and
colours and lets a terminal show one live status line. The rows come through Ray
(:mod:`raydpo.train.relay`), so this works wherever rank 0 runs and wherever it writes its files.
"""

from __future__ import annotations

import threading
from typing import Callable

from raydpo.observability import console


def _quality(row: dict, prefix: str = "") -> str:
    """Reward accuracy of pairs, or KTO's KL estimate (unpaired examples have no accuracy)."""
    acc = row.get(f"{prefix}rewards/accuracies")
    return f"acc {acc:.3f}" if acc is not None else f"kl {row.get(f'{prefix}kl', float('nan')):.4f}"


def train_line(row: dict, total: int, eta: str, verbose: bool) -> str:
    """One training row as a console line: step / total, loss, reward accuracy (KTO: KL), pairs/s, MFU
    (where the device's peak is known) and ETA."""
    unit = "pairs" if "rewards/accuracies" in row else "examples"
    line = (f"train: step {row['step']}/{total} loss {row['loss']:.4f} {_quality(row)} "
            f"{row['pairs_per_s']:.1f} {unit}/s" + (f" MFU {row['mfu']:.1%}" if "mfu" in row else "") + f" {eta}")
    if verbose:
        grad = row.get("grad_norm")
        line += (f" | epoch {row['epoch']} margin {row.get('rewards/margins', float('nan')):+.4f} chosen {row['rewards/chosen']:+.4f} "
                 f"rejected {row['rewards/rejected']:+.4f} logps {row['logps/chosen']:.2f}/{row['logps/rejected']:.2f} "
                 f"lr {row['learning_rate']:.2e}" + (f" grad_norm {grad:.3f}" if grad is not None else "")
                 + f" {row['tokens_per_s']:,.0f} tokens/s"
                 + (f" ({row['tokens_per_s_per_device']:,.0f}/device, {row['tflops_per_device']:.3g} TFLOP/s/device)"
                    if "tflops_per_device" in row else ""))
    return line


def eval_line(row: dict) -> str:
    unit = "pairs" if "eval/rewards/accuracies" in row else "examples"
    return (f"eval @ step {row['step']}: loss {row['eval/loss']:.4f} {_quality(row, 'eval/')} "
            f"margin {row.get('eval/rewards/margins', float('nan')):+.4f} ({int(row['eval/pairs']):,} {unit})")


class MetricsWatcher:
    """Prints the rows rank 0 logs while training runs (a background thread; a context manager).

    ``fetch(cursor) -> (events, cursor)`` returns what was posted since ``cursor``: rows, and a
    ``{"kind": "start"}`` marker whenever a worker group (re)starts (:class:`raydpo.train.relay.RunRelay`;
    :func:`raydpo.train.relay.follow` makes one). After a restart the steps logged again are shown
    again and the ETA starts over."""

    def __init__(self, fetch: Callable[[int], tuple[list[dict], int]], total_steps: int,
                 out: console.Console | None = None, poll_s: float = 0.5):
        self.fetch, self.total, self.poll_s = fetch, total_steps, poll_s
        self.out = out or console.get()
        self.cursor = 0
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
        """Show the rows posted since the last poll."""
        try:
            events, self.cursor = self.fetch(self.cursor)
        except Exception:  # noqa: BLE001 - the relay is gone with a failed run: the error comes from fit()
            return
        for row in events:
            try:
                self.show(row)
            except (ValueError, KeyError, TypeError):
                continue  # a row from another version of raydpo: the file has it, the console skips it

    def show(self, row: dict) -> None:
        if row.get("kind") == "start":
            self.first = None
            return
        if "loss" not in row:
            self.out.say(eval_line(row))
            return
        step, now = row["step"], row["time"]
        if self.first is None:  # from this row's own step time until there are two rows
            self.first = (step - 1, now - row["step_time_s"])
        eta = console.eta(step - self.first[0], self.total - self.first[0], now - self.first[1])
        self.out.update("train", train_line(row, self.total, eta, self.out.enabled("verbose")), final=step >= self.total)
