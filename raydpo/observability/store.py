"""Ray's object store, as ``ray memory --stats-only`` reads it: bytes held and objects, all nodes."""

from __future__ import annotations


def object_store_stats() -> dict[str, int]:
    """{"bytes_used", "objects", "bytes_spilled"} summed over every node of the connected cluster.

    Ray's own route for ``ray memory`` (one raylet asks all nodes); a private module of Ray, so
    the fields read here are the ones its CLI prints."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # The connected cluster's own address: auto-detection refuses a machine running two clusters.

    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return {"bytes_used": int(stats.object_store_bytes_used), "objects": int(stats.num_local_objects),
            "bytes_spilled": int(stats.spilled_bytes_total)}
