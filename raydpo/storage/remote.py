"""Storage work that reads many files runs on the cluster, not on the driver.

The driver of a run is often a small head node far from the data; what it needs from a cache's
shards (a verdict, a few columns, the refs of blocks) comes back through Ray as a task's result.
"""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def on_cluster(fn: Callable[..., T], *args, num_returns: int = 1, fetch: bool = True, on_driver_node: bool = False,
               **kwargs) -> T:
    """``fn(*args, **kwargs)`` as a Ray task on some node (zero CPUs reserved, so it never waits
    behind the stages' actors), or in this process when Ray is not running. With ``num_returns``
    > 1 or ``fetch=False`` the task's results come back as object refs owned by the driver
    (nothing is fetched). ``on_driver_node``: run it on this process's node (a task that writes a
    local path the user gave the driver). A failure in the task raises the task's own exception here."""
    import ray

    if not ray.is_initialized():
        result = fn(*args, **kwargs)
        if num_returns > 1:
            return [ray.put(r) for r in result]
        return result if fetch else ray.put(result)
    options = {"name": f"raydpo.{fn.__name__}"}
    if on_driver_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=3, num_returns=num_returns)(fn).options(**options)
    refs = task.remote(*args, **kwargs)
    if num_returns > 1 or not fetch:
        return refs
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, BaseException) else e) from None
