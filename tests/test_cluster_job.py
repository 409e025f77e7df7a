"""``ray job submit`` end to end on a real two-node local Ray cluster (``ray start --head`` plus a
second ``ray start --address``, each with its own custom resource), and the cluster manifests.

The job must join the existing cluster, put the reference pool and the trainers on the nodes its
config pins them to, and export a loadable model; a broken job must exit non-zero with its error in
``ray job logs``. The cluster is separate from the session's embedded one (its own ports and
temp dir) and is stopped at the end.
"""

import glob
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from cluster import RayNodes, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _ray(*args, env, check=True, timeout=180):
    return subprocess.run([os.path.join(BIN, "ray"), *args], env=env, capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head node offering ``policy_node`` (with the dashboard, for jobs) and a second node offering
    ``reference_node``, on one disk (tests/cluster.py)."""
    tmp = tmp_path_factory.mktemp("cluster")
    dash = free_port()
    nodes = RayNodes(f"/tmp/raydpo-two-node-{os.getpid()}", str(tmp))  # short: Ray's socket paths must fit 107 bytes
    try:
        nodes.head(6, {"policy_node": 2}, dashboard_port=dash).node(4, {"reference_node": 1})
        ids = nodes.wait(2)
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:  # the job server answers once the dashboard is up
            if _ray("job", "list", f"--address={address}", env=nodes.env, check=False).returncode == 0:
                break
            time.sleep(2)
        yield {"address": address, "gcs": nodes.gcs, "env": nodes.env, "tmp": tmp, "ids": ids}
    finally:
        nodes.stop()


def _submit(cluster, workdir, config_path, submission_id: str) -> subprocess.CompletedProcess:
    """``ray job submit`` and wait (it streams the job log and exits with the job's status)."""
    for _ in range(60):  # the job agent may still be starting
        # No --working-dir: the config sits on the (here: local) shared file system, as it would on a
        # real cluster. (On this two-cluster machine Ray removed an uploaded working dir under the
        # running driver, whose imports then failed in os.getcwd().)
        out = _ray("job", "submit", f"--address={cluster['address']}", f"--submission-id={submission_id}",
                   '--runtime-env-json={"env_vars": {"RAYDPO_TRACEBACK": "1"}}',
                   "--", sys.executable, "-m", "raydpo", "train", str(workdir / config_path), env=cluster["env"], check=False,
                   timeout=900)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(2)
    return out


@pytest.mark.slow
def test_job_runs_each_stage_on_its_pinned_node(two_node_cluster, tiny_model_dir, synthetic_dir):
    cluster = two_node_cluster
    tmp = cluster["tmp"]
    workdir = tmp / "job"
    workdir.mkdir()
    raw = yaml.safe_load(open(os.path.join(ROOT, "examples", "smoke.yaml")))
    raw["model"]["name_or_path"] = tiny_model_dir
    raw["data"] |= {"train": f"{synthetic_dir}/train.jsonl", "eval": f"{synthetic_dir}/eval.jsonl"}
    raw["reference"] |= {"cache_dir": str(tmp / "cache"), "resources": {"reference_node": 1}}
    raw["train"] |= {"resources": {"policy_node": 1}, "max_steps": 4}
    raw["output"]["dir"] = str(tmp / "run")
    (workdir / "cfg.yaml").write_text(yaml.safe_dump(raw))
    job = _submit(cluster, workdir, "cfg.yaml", f"raydpo-smoke-{os.getpid()}")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "[raydpo] done: 4 steps" in job.stdout  # progress lands in the job log
    nodes = cluster["ids"]
    trainers = [json.load(open(p)) for p in glob.glob(str(tmp / "run" / "workers" / "rank*.json"))]
    actors = [json.load(open(p)) for p in glob.glob(str(tmp / "run" / "workers" / "reference-*.json"))]
    assert len(trainers) == 2 and {w["node_id"] for w in trainers} == {nodes["policy_node"]}
    assert actors and {a["node_id"] for a in actors} == {nodes["reference_node"]}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp / "run" / "model") is not None


@pytest.mark.slow
def test_broken_job_fails_with_its_error_in_the_job_log(two_node_cluster, tiny_model_dir, synthetic_dir):
    cluster = two_node_cluster
    workdir = cluster["tmp"] / "broken"
    workdir.mkdir()
    raw = yaml.safe_load(open(os.path.join(ROOT, "examples", "smoke.yaml")))
    raw["model"]["name_or_path"] = str(cluster["tmp"] / "no-such-model")
    raw["output"]["dir"] = str(cluster["tmp"] / "broken-run")
    (workdir / "cfg.yaml").write_text(yaml.safe_dump(raw))
    job_id = f"raydpo-broken-{os.getpid()}"
    job = _submit(cluster, workdir, "cfg.yaml", job_id)
    assert job.returncode != 0
    logs = _ray("job", "logs", f"--address={cluster['address']}", job_id, env=cluster["env"]).stdout
    assert "raydpo: error: model path" in logs and "is not a Hugging Face model directory" in logs


def test_cluster_manifests_are_complete_and_consistent():
    """The manifests parse, carry the fields KubeRay / the cluster launcher require, and offer the
    custom resources that the multi-node example config pins its stages to."""
    from raydpo.config import load

    job = yaml.safe_load(open(os.path.join(ROOT, "cluster", "rayjob.yaml")))
    standing = yaml.safe_load(open(os.path.join(ROOT, "cluster", "raycluster.yaml")))
    assert (job["apiVersion"], job["kind"], standing["kind"]) == ("ray.io/v1", "RayJob", "RayCluster")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["raydpo", "train"] and os.path.exists(os.path.join(ROOT, entry[2]))
    for spec in (job["spec"]["rayClusterSpec"], standing["spec"]):
        head = spec["headGroupSpec"]
        assert head["template"]["spec"]["containers"][0]["image"]
        offered = {}
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and group["replicas"] >= 1 and group["template"]["spec"]["containers"][0]["image"]
            offered |= yaml.safe_load(json.loads(group["rayStartParams"]["resources"]))
        cfg = load(os.path.join(ROOT, entry[2]))
        assert set(cfg.reference.resources) <= set(offered) and set(cfg.train.resources) <= set(offered)
        assert set(cfg.reference.resources).isdisjoint(cfg.train.resources)  # separate node groups
    launcher = yaml.safe_load(open(os.path.join(ROOT, "cluster", "aws.yaml")))
    assert launcher["head_node_type"] in launcher["available_node_types"] and launcher["provider"]["type"] == "aws"
    launcher_offers = set().union(*(t["resources"] for t in launcher["available_node_types"].values()))
    assert set(cfg.reference.resources) | set(cfg.train.resources) <= launcher_offers
    runtime_env = yaml.safe_load(open(os.path.join(ROOT, "cluster", "runtime_env.yaml")))
    assert set(runtime_env) <= {"excludes", "env_vars", "pip", "py_modules", "working_dir", "conda", "uv"}
    workflow = yaml.safe_load(open(os.path.join(ROOT, "cluster", "github", "raydpo-smoke.yml")))
    steps = workflow["jobs"]["smoke"]["steps"]
    submit = [s["run"] for s in steps if "submit.sh" in s.get("run", "")]
    assert submit and os.path.exists(os.path.join(ROOT, submit[0].split()[1]))
    assert os.access(os.path.join(ROOT, "cluster", "submit.sh"), os.X_OK)
    out = subprocess.run(["bash", "-n", os.path.join(ROOT, "cluster", "submit.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_object_storage_manifests_share_no_disk():
    """The object-storage manifests mount no volume, give every pod HF_TOKEN from a secret, run the
    config whose every path is a URI; the AWS launcher bind-mounts no host directory (not shared)."""
    from raydpo import storage
    from raydpo.config import load
    from raydpo.storage.probe import written_dirs

    def pods(spec):
        yield spec["headGroupSpec"]["template"]["spec"]
        yield from (g["template"]["spec"] for g in spec["workerGroupSpecs"])

    job = yaml.safe_load(open(os.path.join(ROOT, "cluster", "rayjob-s3.yaml")))
    standing = yaml.safe_load(open(os.path.join(ROOT, "cluster", "raycluster-s3.yaml")))
    assert standing["spec"] == job["spec"]["rayClusterSpec"]
    for manifest in ("rayjob-s3.yaml", "raycluster-s3.yaml", "rayjob.yaml", "raycluster.yaml"):
        m = yaml.safe_load(open(os.path.join(ROOT, "cluster", manifest)))
        for pod in pods(m["spec"].get("rayClusterSpec", m["spec"])):
            env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token", manifest
            if manifest.endswith("-s3.yaml"):
                assert "volumes" not in pod and not any("volumeMounts" in c for c in pod["containers"]), manifest
    cfg = load(os.path.join(ROOT, job["spec"]["entrypoint"].split()[2]))
    paths = [*written_dirs(cfg).values(), *cfg.data.train, *cfg.data.eval]
    assert paths and all(storage.is_uri(p) for p in paths), paths
    launcher = open(os.path.join(ROOT, "cluster", "aws.yaml")).read()
    assert "-v /" not in launcher and "multinode-s3.yaml" in launcher
