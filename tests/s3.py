"""An S3-compatible server on 127.0.0.1 for the suite: moto's server mode (what s3fs tests against),
and a TCP proxy in front of it that can drop connections, for real transient network errors.

The session points the standard AWS variables at the proxy (``conftest.py`` sets them before any Ray
cluster starts, so every worker and ``ray start`` node inherits them), exactly as a user's nodes
read ``AWS_ENDPOINT_URL`` and credentials from their environment.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlakyProxy:
    """Forwards TCP connections from its port to ``target``; ``down()`` resets every open
    connection and every new one until ``up()`` (what a dropped network looks like to a client)."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.is_down = threading.Event()
        self.refused = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", port))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()

    def down(self) -> None:
        self.is_down.set()
        with self._lock:
            for c in list(self._conns):
                _reset(c)
            self._conns.clear()

    def up(self) -> None:
        self.is_down.clear()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self.down()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.is_down.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return
                    key.data.sendall(data)
                if self._stop.is_set():
                    return
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._conns -= {a, b}
            # One side closed: a plain close passes that on after the data already sent (a reset
            # here would make the client's kernel drop a response it has not read yet).
            for s in (a, b):
                (_reset if self.is_down.is_set() else socket.socket.close)(s)


def _reset(s: socket.socket) -> None:
    try:  # SO_LINGER 0: close with a TCP reset, as a dropped connection does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    except OSError:
        pass


class S3Server:
    """moto's server on its own port, behind a :class:`FlakyProxy` on ``port``."""

    def __init__(self, port: int):
        self.moto_port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.moto_port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start")
                time.sleep(0.2)
        self.proxy = FlakyProxy(port, self.moto_port)
        self.endpoint = f"http://127.0.0.1:{port}"

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if new); returns ``s3://name``."""
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if getattr(self, "proxy", None) is not None:
            self.proxy.close()
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


#: The standard variables every process of the suite reads (set in conftest before any cluster).
def aws_environment(port: int) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
