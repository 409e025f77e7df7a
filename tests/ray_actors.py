"""Counting the actors a test's cluster has created (Ray's state API: alive and dead ones)."""

from __future__ import annotations


def actors_created(class_substring: str) -> int:
    """Actors ever created in this session's cluster whose class name contains ``class_substring``."""
    import ray
    from ray.util.state import list_actors

    # The bootstrap address of *this* session's cluster, in case another Ray instance runs on the machine.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, limit=10_000, raise_on_missing_output=False)
    return sum(class_substring in a.class_name for a in actors)
