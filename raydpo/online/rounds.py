"""The round queue: how the driver hands rounds to the long-lived Ray Train workers.

One async Ray actor, created by the driver and passed to the workers in ``train_loop_config``. The
driver puts each round's *job* (the pairs, split per data-parallel rank and held in Ray's object
store, the step count, whether to sync); every worker blocks in :meth:`RoundQueue.job` until the job
for the round it is at exists, trains, and rank 0 posts the round's result (metrics and, when
syncing, an object-store reference to the full weights). A worker group restarted by Ray Train
from a round checkpoint asks again for the round after the checkpoint, which the queue still holds.
A missing job past the end (``None``) ends the workers' loop.

The queue keeps no weights: a round's result (and its weights ref) is handed to the driver once and
dropped here, so the object store holds a synced state dict only until every generator has loaded
it. A generator that joins later asks for the trainer's current weights (:meth:`RoundQueue.weights`):
the idle workers, waiting for their next round, gather them on request.
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
        self.requests = 0  # weight requests made (each is answered by the workers once)
        self.served: dict[int, list] = {}
        self.waiting: set[int] = set()  # requests whose caller still waits
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait(self, predicate) -> None:
        async with self.changed:
            await self.changed.wait_for(predicate)

    async def worker_ready(self, rank: int, info: dict) -> int:
        """A worker started (fresh or from a checkpoint): ``info`` has its pid and ``rounds_done``.
        Returns the weight requests made so far (a restarted worker does not answer old ones)."""
        self.ready[rank] = info
        await self._notify()
        return self.requests

    async def wait_ready(self, workers: int) -> dict[int, dict]:
        """Every worker's start info, once all have started; handed out once (the weights ref in it
        is then the caller's only copy)."""
        await self._wait(lambda: len(self.ready) >= workers)
        ready, self.ready = self.ready, {}
        return ready

    async def put_job(self, round_: int, job: dict) -> None:
        self.jobs[round_] = job
        await self._notify()

    async def stop(self, round_: int, abort: bool = False) -> None:
        """No rounds from ``round_`` on: workers asking for one leave their loop (and, with ``abort``,
        the run: the driver failed, so no final model is exported)."""
        self.stop_at, self.aborted = round_, abort
        await self._notify()

    async def job(self, round_: int, answered: int = 0) -> dict | None:
        """Round ``round_``'s job; None when the run ends before it; ``{"abort": True}`` when it
        failed; ``{"weights_only": True, "request": n}`` when weight request ``n`` (past the
        ``answered`` ones this worker served) waits for the workers' current weights."""
        await self._wait(lambda: round_ in self.jobs or (self.stop_at is not None and round_ >= self.stop_at)
                         or self.requests > answered)
        if self.requests > answered:
            return {"weights_only": True, "request": answered + 1}
        if round_ not in self.jobs and self.aborted:
            return {"abort": True}
        return self.jobs.get(round_)

    async def weights(self) -> list:
        """The workers' current full weights, gathered on request (``[ref]``: a list, so that Ray
        hands the caller the ref and not the state dict)."""
        self.requests += 1
        request = self.requests
        self.waiting.add(request)
        await self._notify()
        try:
            await self._wait(lambda: request in self.served)
            return self.served.pop(request)
        finally:
            self.waiting.discard(request)

    async def post_weights(self, request: int, weights: list) -> None:
        if request in self.waiting:  # else nobody will take it: dropping it frees the weights
            self.served[request] = weights
            await self._notify()

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
        """Round ``round_``'s result, handed out once."""
        await self._wait(lambda: round_ in self.results)
        return self.results.pop(round_)
