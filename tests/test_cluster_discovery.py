"""Finding the cluster a run stands on, without ray.address or RAY_ADDRESS.

The rule (``choose_cluster``) on real files and real sockets, then a real ``ray start --head`` in
its own Ray temp dir: a run joins it and says so, ``ray.address: local`` still starts an embedded
cluster beside it, and once it is stopped (by its own pid, not ``ray stop``, which would stop
every cluster on the machine) its address file is stale, named, and ignored.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from raydpo.cluster import answers, choose_cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_rule_on_real_files_and_sockets(tmp_path):
    file = tmp_path / "ray_current_cluster"
    assert choose_cluster(None, None, str(file)) == ("local", "started an embedded local Ray cluster")
    with socket.socket() as server:  # something listening: a live GCS as far as the rule can tell
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        file.write_text(live + "\n")
        assert answers(live)
        address, said = choose_cluster(None, None, str(file))
        assert address == live and said.startswith(f"joined the local Ray cluster at {live} (from {file}")
        # Explicit choices win over the file.
        assert choose_cluster("local", None, str(file))[0] == "local"
        assert choose_cluster("10.0.0.1:6379", "10.0.0.2:6379", str(file))[0] == "10.0.0.1:6379"
        assert choose_cluster(None, "10.0.0.2:6379", str(file)) == ("10.0.0.2:6379", "joined the Ray cluster at 10.0.0.2:6379 (RAY_ADDRESS)")
    dead = f"127.0.0.1:{free_port()}"
    file.write_text(dead)
    assert not answers(dead)
    assert choose_cluster(None, None, str(file)) == (
        "local", f"started an embedded local Ray cluster; ignored the stale {file} (no Ray cluster answers at {dead})")
    file.write_text("")
    assert "ignored the stale" in choose_cluster(None, None, str(file))[1]


CONNECT = """
import json, sys, ray
from raydpo.config import from_dict
from raydpo.cluster import ensure_ray
cfg = from_dict({"model": {"name_or_path": "unused"}, "ray": {"address": sys.argv[1] or None, "num_cpus": 2}})
kind = ensure_ray(cfg)
print(json.dumps({"kind": kind, "gcs": ray.get_runtime_context().gcs_address, "task": ray.get(ray.remote(lambda: 7).remote())}))
"""


def connect(env: dict, address: str = "") -> tuple[dict, str]:
    import json

    out = subprocess.run([sys.executable, "-c", CONNECT, address], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout + out.stderr


@pytest.mark.slow
def test_a_live_local_cluster_is_joined_and_a_stale_address_file_is_ignored():
    # A short private temp dir: Ray's sockets live under it (AF_UNIX paths are limited to 107 bytes),
    # and its ray_current_cluster file is this test's alone.
    temp = tempfile.mkdtemp(prefix="rdq", dir="/tmp")
    env = os.environ | {"RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    file = os.path.join(temp, "ray", "ray_current_cluster")
    try:
        deadline = time.time() + 120
        while not (os.path.exists(file) and open(file).read().strip() and answers(open(file).read().strip())):
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        address = open(file).read().strip()
        joined, said = connect(env)
        assert joined == {"kind": "joined", "gcs": address, "task": 7}
        assert f"[raydpo] joined the local Ray cluster at {address} (from {file}; ray.address: local" in said
        beside, said = connect(env, "local")
        assert beside["kind"] == "embedded" and beside["gcs"] != address and beside["task"] == 7
        assert "[raydpo] started an embedded local Ray cluster (2 logical CPUs) (ray.address: local)" in said
    finally:
        # Stopped by its own pid (and its own session's processes), never `ray stop`.
        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    deadline = time.time() + 60
    while answers(address) and time.time() < deadline:
        time.sleep(0.5)
    assert os.path.exists(file) and not answers(address)  # what a killed cluster leaves behind
    stale, said = connect(env)
    assert stale["kind"] == "embedded" and stale["gcs"] != address
    assert f"ignored the stale {file} (no Ray cluster answers at {address})" in said
    shutil.rmtree(temp, ignore_errors=True)
