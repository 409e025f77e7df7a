"""The round queue: how the driver hands rounds to the long-lived Ray Train workers.

One async Ray actor, created by the driver and passed to the workers in ``train_loop_config``. The
driver puts each round's *job* (the pairs, split per data-parallel rank and held in Ray's object
store, the step count, whether to sync); every worker blocks in :meth:`RoundQueue.job` until the job
for the round it is at exists, trains, and rank 0 posts the round's result (metrics and, when
syncing, an object-store reference to the full weights). A worker group restarted by Ray Train
from a round checkpoint asks again for the round after the checkpoint, which the queue still holds.
A missing job past the end (``None``) ends the workers' loop.
"""

from __future__ import annotations

import asyncio


class RoundQueue:
    """Jobs in, results out, keyed by round index (0-based)."""

    def __init__(self):
        self.jobs: dict[int, dict | None] = {}
        self.results: dict[int, dict] = {}
        self.ready: dict[int, dict] = {}
        self.stop_at: int | None = None
        self.aborted = False
        self.checkpointed = 0  # rounds covered by the latest round checkpoint
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait(self, predicate) -> None:
        async with self.changed:
            await self.changed.wait_for(predicate)

    async def worker_ready(self, rank: int, info: dict) -> None:
        """A worker started (fresh or from a checkpoint): ``info`` has its pid and ``rounds_done``."""
        self.ready[rank] = info
        await self._notify()

    async def wait_ready(self, workers: int) -> dict[int, dict]:
        await self._wait(lambda: len(self.ready) >= workers)
        return dict(self.ready)

    async def put_job(self, round_: int, job: dict) -> None:
        self.jobs[round_] = job
        await self._notify()

    async def stop(self, round_: int, abort: bool = False) -> None:
        """No rounds from ``round_`` on: workers asking for one leave their loop (and, with ``abort``,
        the run: the driver failed, so no final model is exported)."""
        self.stop_at, self.aborted = round_, abort
        await self._notify()

    async def job(self, round_: int) -> dict | None:
        """Round ``round_``'s job; None when the run ends before it; ``{"abort": True}`` when it failed."""
        await self._wait(lambda: round_ in self.jobs or (self.stop_at is not None and round_ >= self.stop_at))
        if round_ not in self.jobs and self.aborted:
            return {"abort": True}
        return self.jobs.get(round_)

    async def post_result(self, round_: int, result: dict) -> None:
        self.results[round_] = result
        if self.jobs.get(round_, {}).get("checkpoint"):
            self.checkpointed = round_ + 1
        # Jobs before the latest checkpoint are done with (a restarted group resumes after it): drop
        # their object refs so the store can free the pairs.
        for r in [r for r in self.jobs if r < self.checkpointed]:
            del self.jobs[r]
        await self._notify()

    async def result(self, round_: int) -> dict:
        await self._wait(lambda: round_ in self.results)
        return self.results[round_]
