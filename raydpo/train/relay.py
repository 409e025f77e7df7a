"""What the trainers tell the driver comes back through Ray, never through a file.

Rank 0 may run on another host than the driver, with ``output.dir`` on an object store or on a disk
the driver does not see. So the driver starts one small actor per training run and hands its
handle to the workers: rank 0 posts each logged row (the console and the run's result read them
here), the exactness guard's verdict and the final result. The files rank 0 writes
(``metrics.jsonl``, ``model/``) are for later readers, not for the driver.
"""

from __future__ import annotations

import time


class RunRelay:
    """A Ray actor (zero CPUs) holding one training run's messages from rank 0.

    ``events`` is what the console follows: every row as logged, plus a ``{"kind": "start"}`` marker
    each time a worker group (re)starts. ``rows`` is ``metrics.jsonl``'s content as rank 0 keeps it
    (cut back to the checkpoint on a restart)."""

    def __init__(self):
        self.events: list[dict] = []
        self.rows: list[dict] = []
        self.guard: dict | None = None
        self.result: dict | None = None

    def start(self, kept_rows: list[dict], step: int) -> None:
        """A worker group starts at ``step`` with ``kept_rows`` already in the metrics file."""
        self.rows = list(kept_rows)
        self.events.append({"kind": "start", "step": step, "time": time.time()})

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self.events.append(row)

    def since(self, cursor: int) -> tuple[list[dict], int]:
        """Events after the first ``cursor`` ones, and the new cursor."""
        return self.events[cursor:], len(self.events)

    def set_guard(self, verdict: dict) -> None:
        self.guard = verdict

    def finish(self, result: dict) -> None:
        self.result = result

    def outcome(self) -> dict:
        """``{"result": ..., "guard": ..., "rows": [...]}`` (result None if training did not finish)."""
        return {"result": self.result, "guard": self.guard, "rows": self.rows}


def start_relay():
    """A new relay actor for one run, on the driver's node where it can be (it lives and dies with
    the driver, not with a worker node; it holds a few KB per logged step)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(RunRelay).options(num_cpus=0, scheduling_strategy=here).remote()


def follow(relay):
    """A ``fetch(cursor) -> (events, cursor)`` for :class:`raydpo.observability.watch.MetricsWatcher`."""
    import ray

    return lambda cursor: ray.get(relay.since.remote(cursor))
