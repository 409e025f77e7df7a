"""Before any stage: every node that may host a stage's actors must see the run's local paths.

A local ``output.dir`` or cache directory on a cluster whose nodes do not share a disk would let a
run train for an hour and then fail to find what a worker wrote on another host. So when the
cluster has nodes besides the driver's, the driver writes a probe file under each local directory
the run writes to, and a zero-CPU task pinned to every other node checks that it sees those files
and the local inputs (model directories, data files). One message names every path and node that
fails, with the fix. URIs need no probe: every node reaches them. On a one-node (or embedded)
cluster nothing is done.
"""

from __future__ import annotations

import os
import uuid

from raydpo.storage import uri


def written_dirs(cfg) -> dict[str, str]:
    """Every directory (local path or URI) the run writes to, by config key."""
    from raydpo.config import uses_reference
    from raydpo.data.cache import cache_root

    writes = {"output.dir": cfg.output.dir}
    if uses_reference(cfg):
        writes["reference.cache_dir"] = cfg.reference.cache_dir
    if cfg.data.cache:
        writes["data.cache_dir"] = cache_root(cfg)
    if cfg.train.storage_path:
        writes["train.storage_path"] = cfg.train.storage_path
    return {k: uri.normalize(v) for k, v in writes.items() if v}


def run_paths(cfg) -> tuple[dict[str, str], dict[str, str]]:
    """(local directories the run writes, by config key; local inputs it reads, by config key)."""
    from raydpo.config import reference_path, uses_reference
    from raydpo.data.sources import local_sources

    writes = written_dirs(cfg)
    reads = {"model.name_or_path": cfg.model.name_or_path}
    if uses_reference(cfg):
        reads["reference.name_or_path"] = reference_path(cfg)
    if cfg.data.chat_template and cfg.data.chat_template.endswith(".jinja"):
        reads["data.chat_template"] = cfg.data.chat_template
    for split in ("train", "eval"):
        for i, path in enumerate(local_sources(getattr(cfg.data, split))):
            reads[f"data.{split}[{i}]"] = path
    local = lambda p: p and not uri.is_uri(p) and (os.path.exists(os.path.expanduser(p)) or p.startswith((".", "/", "~")))  # noqa: E731
    return ({k: v for k, v in writes.items() if not uri.is_uri(v)},
            {k: uri.normalize(v) for k, v in reads.items() if local(v)})


def _sees(paths: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """On a node: (its address, the (key, path) pairs it does not see)."""
    import ray

    return ray.util.get_node_ip_address(), [(k, p) for k, p in paths if not os.path.exists(p)]


def other_nodes() -> list[dict]:
    """Alive nodes that can host work (CPUs or GPUs), other than the driver's."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here
            and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


def check_nodes_see(cfg, timeout_s: float = 300.0) -> None:
    """Stop with one message when a node cannot see a local path of the run (see the module doc)."""
    nodes = other_nodes()
    if not nodes:
        return
    writes, reads = run_paths(cfg)
    if not writes and not reads:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = f".raydpo-probe-{uuid.uuid4().hex[:12]}"
    probes = {key: uri.join(path, token) for key, path in writes.items()}
    for path in probes.values():
        uri.write_text(path, "written by the raydpo driver to check that every node sees this directory\n")
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(_sees)
        checks = list(probes.items()) + list(reads.items())
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(checks)
                for n in nodes]
        found = ray.get(refs, timeout=timeout_s)
    finally:
        for path in probes.values():
            uri.delete_file(path)
    missing = [(ip, key, writes.get(key, reads.get(key))) for ip, pairs in found for key, _ in pairs]
    if missing:
        lines = "; ".join(f"{key} {path!r} on node {ip}" for ip, key, path in missing)
        raise ValueError(
            f"these local paths are not visible on every node of the Ray cluster: {lines}. The cluster's nodes do not "
            "share that disk, so workers there could not read or write them. Use a URI that every node reaches "
            "(s3://bucket/prefix, gs://..., abfs://...) or a mount all nodes share (NFS, a ReadWriteMany volume) "
            "for these keys; model directories can also be hub ids")
