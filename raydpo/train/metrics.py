"""Training metrics: per-rank sums reduced over all ranks, and the metrics log rank 0 writes.

metrics.jsonl, the experiment trackers and the driver's relay are fed by :class:`MetricsLog`.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def global_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """All-reduce per-rank metric sums (a fixed key order on every rank)."""
    from raydpo.train.devices import all_reduce

    keys = sorted(sums)
    device = next(iter(sums.values())).device
    packed = torch.stack([torch.as_tensor(sums[k], device=device).float() for k in keys])
    return dict(zip(keys, all_reduce(packed).tolist()))


def add_sums(acc: dict, new: dict) -> dict:
    """Key-wise sum of two metric dicts (tensors or floats; a missing key counts as 0)."""
    return {k: acc.get(k, 0.0) + v for k, v in new.items()}


def float_or_none(value) -> float | None:
    """DeepSpeed's grad norm: a float, a 0-d tensor, or None where the stage does not compute it."""
    return None if value is None else float(value)


def say(line: str) -> None:
    # Not print(): Ray Train patches print into a logger *and* tees it to stdout, doubling every line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MetricsLog:
    """metrics.jsonl, the experiment trackers and the driver's relay, fed by rank 0 only.

    The driver shows these rows on the console from the relay (:mod:`raydpo.train.relay`), wherever
    rank 0 runs. The file is for later readers: appended in place on a filesystem; on an object
    store (no appends) the whole object is rewritten at most every ``flush_s`` seconds, at every
    checkpoint (:meth:`flush`) and at the end. ``rows``: what the file already holds."""

    def __init__(self, path: str | None, active: bool, trackers=None, relay=None, rows: list[dict] | None = None,
                 flush_s: float = 10.0):
        from raydpo import storage

        self.path, self.active, self.trackers, self.relay = path, active, trackers, relay
        self.remote = path is not None and storage.is_uri(path)
        self.rows, self.flush_s, self.flushed, self.dirty = list(rows or []), flush_s, time.monotonic(), False

    def write(self, row: dict) -> None:
        if not self.active:
            return
        from raydpo import storage

        if self.relay is not None:
            self.relay.log.remote(row)  # calls from one process arrive in order; nothing to wait for
        if self.path is not None and not self.remote:
            storage.append_text(self.path, json.dumps(row) + "\n")
        elif self.path is not None:
            self.rows.append(row)
            self.dirty = True
            if time.monotonic() - self.flushed > self.flush_s:
                self.flush()
        if self.trackers is not None:
            self.trackers.log(row)

    def flush(self) -> None:
        """Write out what an object store has not seen yet (a no-op on a filesystem)."""
        if self.active and self.remote and self.dirty:
            from raydpo import storage

            storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
            self.flushed, self.dirty = time.monotonic(), False
