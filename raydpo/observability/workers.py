"""Where each worker of a run lives: ``<output.dir>/workers/<name>.json`` (process, host, Ray node).

Written by every Ray Train worker (``rank<r>``) and every reference actor (``reference-<pid>``) when
it starts, so operators can find, inspect or stop a process and check that each stage ran on the
node group its config pins it to (``train.resources``, ``reference.resources``).
"""

from __future__ import annotations

import os
import socket
import time

from raydpo import storage


def peak_memory() -> dict:
    """This process's memory high-water marks: host RSS (``VmHWM``) and, on a GPU, the CUDA
    allocator's peak, in MB (what an operator sizes nodes by; bench/zero3_memory.py reads them)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            out["peak_rss_mb"] = round(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024, 1)
    except (OSError, StopIteration):  # not Linux
        pass
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def record(workers_dir: str, name: str, **extra) -> None:
    """Write ``workers_dir/name.json`` with this process's pid, host, Ray node id and IP, and ``extra``."""
    import ray

    ctx = ray.get_runtime_context()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "started": time.time(), **extra}
    storage.write_json(storage.join(workers_dir, f"{name}.json"), info, indent=None)
