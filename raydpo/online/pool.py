"""A fixed pool of Ray actors that replaces a dead actor and retries its batch.

Ray's own ``max_restarts`` would re-run the actor's constructor, which loads the *initial* weights:
a generator restarted that way would silently sample from a stale policy. Here a dead actor is
replaced by a new one and the pool's *state calls* (e.g. the latest ``load_weights``) are replayed
on it before its batch is retried, so a replacement always serves the current policy. A state call
may keep, instead of its arguments, a function that makes them again (the trainer's current
weights): the pool then holds no large object between calls.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


def actor_options(num_cpus: float, num_gpus: float, resources: dict, accelerator_type: str | None) -> dict:
    """Ray actor options placing one actor of a pool (a section's ``num_*_per_actor``, ``resources``,
    ``accelerator_type``)."""
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = dict(resources)
    if accelerator_type:
        options["accelerator_type"] = accelerator_type
    return options


class PoolError(RuntimeError):
    """An actor of the pool died more often than its ``max_restarts`` allows."""


class RestartingPool:
    """``size`` actors of ``cls(**kwargs)`` with Ray ``options``; ``name`` for messages;
    ``max_restarts``: dead actors replaced before the run stops (None: no limit)."""

    def __init__(self, cls, kwargs: dict, size: int, options: dict, max_restarts: int | None, name: str):
        import ray

        self.remote_cls = ray.remote(cls).options(**options)
        self.kwargs, self.max_restarts, self.name = kwargs, max_restarts, name
        self.state_calls: dict[str, tuple | Callable[[], tuple]] = {}
        self.restarts = 0
        self.actors = [self.remote_cls.remote(**kwargs) for _ in range(size)]

    def _replace(self, i: int, error: Exception) -> None:
        import ray

        self.restarts += 1
        if self.max_restarts is not None and self.restarts > self.max_restarts:  # None: no limit
            raise PoolError(f"{self.name}: an actor died {self.restarts} times (max_restarts={self.max_restarts}); last error: {error}")
        sys.stderr.write(f"[raydpo] {self.name}: actor {i} died ({type(error).__name__}); starting a new one and retrying its batch\n")
        try:
            ray.kill(self.actors[i])
        except Exception:  # noqa: BLE001 - already gone
            pass
        actor = self.remote_cls.remote(**self.kwargs)
        # The replacement gets the pool's current state before any work (ray.get: errors surface here).
        calls = {m: args() if callable(args) else args for m, args in self.state_calls.items()}
        ray.get([getattr(actor, m).remote(*args) for m, args in calls.items()])
        self.actors[i] = actor

    def map(self, method: str, items: list[tuple]) -> list[Any]:
        """``actor.method(*item)`` for every item, spread over the actors; results in item order.

        An item whose actor died is retried on its replacement; an exception raised *by* the method
        (the actor still alive) propagates."""
        import ray
        from ray.exceptions import RayActorError

        results: list[Any] = [None] * len(items)
        pending = {}  # ObjectRef -> (item index, actor slot)
        queue = list(range(len(items)))
        busy: set[int] = set()

        def dispatch():
            for slot in range(len(self.actors)):
                if slot not in busy and queue:
                    i = queue.pop(0)
                    pending[getattr(self.actors[slot], method).remote(*items[i])] = (i, slot)
                    busy.add(slot)

        dispatch()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i, slot = pending.pop(done[0])
            busy.discard(slot)
            try:
                results[i] = ray.get(done[0])
            except RayActorError as e:
                self._replace(slot, e)
                queue.insert(0, i)
            dispatch()
        return results

    def set_state(self, method: str, *args, replay: Callable[[], tuple] | None = None) -> None:
        """Call ``method(*args)`` on every actor at once and remember it for replacements (new
        weights): the arguments themselves, or with ``replay`` a function that makes them anew
        (then ``args`` are not kept once every actor has them)."""
        import ray
        from ray.exceptions import RayActorError

        self.state_calls[method] = args
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        for slot, ref in enumerate(refs):
            try:
                ray.get(ref)
            except RayActorError as e:
                self._replace(slot, e)  # the replacement runs the state calls, this one included
        if replay is not None:
            self.state_calls[method] = replay

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
