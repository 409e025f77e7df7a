"""Real multi-node Ray clusters on this machine, for the tests that need more than one node.

Each node is a ``ray start --block`` process in its own session (process group), so the test stops
exactly its own nodes by process group, never with ``ray stop`` (which ends every Ray process on
the machine, the suite's own cluster included). All nodes get the test's own ``--temp-dir``: every
``ray start`` writes Ray's address file there, and in the default place any other raydpo run on
the machine would join this cluster.

A node can be given a private view of a directory: it starts inside ``unshare -m`` with a tmpfs
mounted over that directory, so its processes see it empty, as a second host sees its own disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """Free ports for a node's agents: the defaults may be held by another Ray on this machine."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def unshare_works() -> str | None:
    """None if a private mount namespace with a tmpfs can be made here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt && umount /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -m with a tmpfs is refused here: {probe.stderr.strip()}"


class RayNodes:
    """A head node and further nodes started with ``ray start``; :meth:`stop` ends them all."""

    def __init__(self, temp_dir: str, log_dir: str):
        self.temp_dir, self.log_dir = temp_dir, log_dir
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
        self.port = free_port()
        self.gcs = f"127.0.0.1:{self.port}"

    def _start(self, args: list[str], private_dir: str | None = None) -> None:
        cmd = [os.path.join(BIN, "ray"), "start", "--block", f"--temp-dir={self.temp_dir}", *agent_ports(), *args]
        if private_dir is not None:
            inner = " ".join(f"'{a}'" for a in cmd)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs '{private_dir}' && exec {inner}"]
        log = open(os.path.join(self.log_dir, f"node{len(self.procs)}.log"), "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def head(self, num_cpus: int, resources: dict, dashboard_port: int | None = None) -> "RayNodes":
        dash = (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
                if dashboard_port else ["--include-dashboard=false"])
        self._start(["--head", f"--port={self.port}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
                     "--disable-usage-stats", *dash])
        return self

    def node(self, num_cpus: int, resources: dict, private_dir: str | None = None) -> "RayNodes":
        self._start([f"--address={self.gcs}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}"], private_dir)
        return self

    def wait(self, nodes: int, timeout_s: float = 180.0) -> dict[str, str]:
        """Wait until ``nodes`` nodes are alive; returns custom resource name -> node id."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps([[n['NodeID'], list(n['Resources'])] for n in ray.nodes() if n['Alive']]))") % self.gcs
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({p.returncode}); see {self.log_dir}")
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                alive = json.loads(out.stdout.strip().splitlines()[-1])
                if len(alive) >= nodes:
                    return {r: node for node, resources in alive for r in resources if r.endswith("_node")}
            time.sleep(1)
        raise RuntimeError(f"{nodes} Ray nodes did not come up in {timeout_s:.0f}s; see {self.log_dir}")

    def stop(self) -> None:
        """End every node by its own process group, then whatever of this cluster outlived them
        (processes that name its temp dir), and remove the temp dir."""
        import psutil

        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # `ray start --block` may take its time: nothing here needs a clean exit
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        left = [p for p in psutil.process_iter(["cmdline"]) if any(self.temp_dir in a for a in (p.info["cmdline"] or []))]
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
