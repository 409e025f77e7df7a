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


def record(workers_dir: str, name: str, **extra) -> None:
    """Write ``workers_dir/name.json`` with this process's pid, host, Ray node id and IP, and ``extra``."""
    import ray

    ctx = ray.get_runtime_context()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "started": time.time(), **extra}
    storage.write_json(storage.join(workers_dir, f"{name}.json"), info, indent=None)
