"""A cluster whose nodes do not share a disk, and object storage for every path.

The cluster: a head node and a second node started inside ``unshare -m`` with a tmpfs over the
test's local run directory, so the second node's processes see that directory empty, as a second
host sees its own disk (:mod:`cluster`). The object store: moto's S3 server on 127.0.0.1
(:mod:`s3`). ``raydpo`` runs as a separate driver process joining the cluster, as a user's would.

- data, both caches and ``output.dir`` on ``s3://``, trainers and reference actors pinned to the
  second node: the run finishes, the model read back from S3 loads, ``metrics.jsonl`` in S3 has
  every step, the console showed the steps; a second run hits both caches; ``raydpo report`` and
  ``raydpo cache list`` work on the URIs;
- local paths the second node cannot see: the run stops before any stage, naming path and node;
- two ``raydpo precompute`` of one config at once on one cache, on a disk both nodes share and on
  S3: both succeed with identical log-probs and one published entry;
- two runs sharing ``train.storage_path`` stay apart and ``--force`` keeps the other's checkpoints.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest
import yaml

from cluster import RayNodes, unshare_works
from raydpo import storage
from raydpo.storage import entries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Head (``head_node``) plus a second node (``second_node``) that sees ``local`` as an empty tmpfs."""
    why = unshare_works()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("split")
    local = base / "local"
    local.mkdir()
    nodes = RayNodes(f"/tmp/raydpo-split-{os.getpid()}", str(base))  # short: Ray's socket paths must fit 107 bytes
    try:
        nodes.head(num_cpus=3, resources={"head_node": 8}).node(num_cpus=4, resources={"second_node": 8}, private_dir=str(local))
        yield {"gcs": nodes.gcs, "ids": nodes.wait(2), "local": local, "base": base, "env": nodes.env}
    finally:
        nodes.stop()


def raydpo(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydpo", *args], env=env | {"RAYDPO_TRACEBACK": "1"}, capture_output=True,
                          text=True, timeout=timeout, cwd=tempfile.gettempdir())


def config(split, tiny_model_dir, data: str, cache: str, out: str, **train) -> dict:
    """Trainers (2) and reference actors pinned to the second node; the tokenizer actor anywhere."""
    return {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": cache, "batch_size": 64, "resources": {"second_node": 1}},
        "data": {"train": f"{data}/train.jsonl", "eval": f"{data}/eval.jsonl", "max_length": 64, "num_workers": 1},
        "train": {"num_workers": 2, "micro_batch_size": 8, "cpus_per_worker": 1, "resources": {"second_node": 1},
                  "learning_rate": 1e-3, "eval_every": 0, **train},
        "output": {"dir": out},
        "ray": {"address": split["gcs"]},
    }


@pytest.mark.slow
def test_a_run_on_object_storage_with_its_workers_on_a_node_without_the_drivers_disk(split, s3_server, tiny_model_dir, synthetic_dir, tmp_path):
    bucket = s3_server.bucket("raydpo-run")
    for name in ("train.jsonl", "eval.jsonl"):
        storage.write_bytes(f"{bucket}/data/{name}", open(os.path.join(synthetic_dir, name), "rb").read())
    out, cache = f"{bucket}/runs/a", f"{bucket}/cache/reference"
    raw = config(split, tiny_model_dir, f"{bucket}/data", cache, out, max_steps=6, checkpoint_every=3)
    storage.write_text(f"{bucket}/configs/a.yaml", yaml.safe_dump(raw))  # the config itself on S3 too

    run = raydpo(["train", f"{bucket}/configs/a.yaml"], split["env"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert "train: step 6/6" in said and "[raydpo] done: 6 steps" in said  # the console showed the steps
    rows = [json.loads(line) for line in storage.read_text(f"{out}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    summary = storage.read_json(f"{out}/summary.json")
    assert summary["steps"] == 6 and summary["model_dir"] == f"{out}/model"
    # Every trainer and reference actor ran on the second node (their records are in S3 too).
    records = [storage.read_json(e.path) for e in storage.listing(f"{out}/workers")]
    trainers, actors = [r for r in records if "rank" in r], [r for r in records if r.get("backend")]
    assert len(trainers) == 2 and actors and {r["node_id"] for r in trainers + actors} == {split["ids"]["second_node"]}
    # Ray Train's checkpoints went to S3, under this run's own name.
    assert any("/step_00000003/" in k for k in s3_server.keys("raydpo-run", "runs/a/ray_train/raydpo-a-"))
    with storage.local_copy(f"{out}/model") as model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert AutoModelForCausalLM.from_pretrained(model).num_parameters() > 0
        assert AutoTokenizer.from_pretrained(model).pad_token is not None

    again = raydpo(["precompute", f"{bucket}/configs/a.yaml", "output.dir=" + f"{bucket}/runs/a-again"], split["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    second = storage.read_json(f"{bucket}/runs/a-again/summary.json")
    assert second["data_cache"]["hit"] and all(r["cache_hit"] for r in second["reference"].values())
    assert "tokenized-data cache hit" in again.stdout and again.stdout.count("(no model loaded)") == 2

    report = raydpo(["report", out, "--out", str(tmp_path / "report")], split["env"])
    assert report.returncode == 0 and (tmp_path / "report" / "report.html").exists(), report.stderr[-2000:]
    listed = raydpo(["cache", "list", "--cache-dir", cache, "--json"], split["env"])
    assert listed.returncode == 0, listed.stderr[-2000:]
    found = json.loads(listed.stdout)
    assert sorted((e["kind"], e["status"]) for e in found) == [("reference", "complete")] * 2 + [("tokenized", "complete")]


@pytest.mark.slow
def test_local_paths_a_node_cannot_see_stop_the_run_before_any_stage(split, tiny_model_dir, synthetic_dir):
    local = split["local"]
    raw = config(split, tiny_model_dir, synthetic_dir, str(local / "cache"), str(local / "run"), max_steps=2)
    cfg_path = split["base"] / "local-paths.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = raydpo(["train", str(cfg_path)], split["env"])
    assert run.returncode == 2
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("raydpo: error: these local paths are not visible on every node"), run.stderr[-2000:]
    assert f"output.dir '{local / 'run'}' on node" in error and f"reference.cache_dir '{local / 'cache'}'" in error
    assert "s3://" in error  # the fix
    assert "data:" not in run.stderr  # no stage started
    assert not glob.glob(str(local / "run" / ".raydpo-probe-*"))  # the probes are removed


@pytest.mark.slow
@pytest.mark.parametrize("where", ["shared disk", "s3"])
def test_two_precomputes_of_one_config_at_once_publish_one_entry(split, s3_server, tiny_model_dir, synthetic_dir, where):
    if where == "s3":
        root = f"{s3_server.bucket('raydpo-race')}/race"
    else:
        root = str(split["base"] / "shared")  # outside the second node's private directory: both nodes see it
    raw = config(split, tiny_model_dir, synthetic_dir, f"{root}/cache", f"{root}/run-0")
    cfg_path = split["base"] / f"race-{where.replace(' ', '-')}.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    exports = [split["base"] / f"export-{where.replace(' ', '-')}-{i}.jsonl" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "raydpo", "precompute", str(cfg_path), f"output.dir={root}/run-{i}",
                               "--export", str(exports[i])], env=split["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tempfile.gettempdir()) for i in range(2)]
    results = [(p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, stdout, stderr in results:
        assert code == 0, stderr[-3000:]
    entries_printed = [stdout.strip().splitlines()[-1] for _, stdout, _ in results]
    assert entries_printed[0] == entries_printed[1] == storage.join(f"{root}/cache", entries_printed[0].rsplit("/", 1)[-1])
    assert exports[0].read_text() == exports[1].read_text() and len(exports[0].read_text().splitlines()) == 320
    for kind, cache in (("reference", f"{root}/cache"), ("tokenized", f"{root}/tokenized")):
        keys = {e.relative.split("/")[0] for e in storage.listing(cache, recursive=True)}
        for key in keys:
            manifest = entries.read_manifest(cache, key)
            assert manifest is not None, (kind, key)  # no unpublished leftovers
            files = {e.relative for e in storage.listing(storage.join(cache, key), recursive=True) if not e.is_dir}
            assert files == {s["file"] for s in manifest["shards"]} | {entries.MANIFEST}, (kind, key)
        assert len(keys) == (2 if kind == "reference" else 1)


@pytest.mark.slow
def test_runs_sharing_a_storage_path_stay_apart(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """Run B, started after run A finished with the same ``train.storage_path``, starts fresh (not
    from A's checkpoint); ``--force`` on B removes B's own checkpoints and nothing of A's."""
    from conftest import make_config, shared_cache
    from raydpo.cli import main
    from raydpo.config import to_dict
    from raydpo.pipeline.rundir import run_paths
    from raydpo.train.resume import prepare_run_dir
    from raydpo.train.stage import run_storage

    shared = tmp_path / "checkpoints"
    cfgs = {}
    for name in ("a", "b"):
        cfgs[name] = make_config(tiny_model_dir, f"{synthetic_dir}/train.jsonl", tmp_path,
                                 reference={"cache_dir": shared_cache(), "batch_size": 64},
                                 train={"num_workers": 1, "max_steps": 4, "checkpoint_every": 2, "storage_path": str(shared)},
                                 output={"dir": str(tmp_path / name)})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(to_dict(cfgs[name])))
    assert main(["train", str(tmp_path / "a.yaml")]) == 0  # (not --quiet: that would stay set for later tests in this process)
    mine = lambda name: sorted(glob.glob(str(shared / f"raydpo-{name}-*" / "**"), recursive=True))  # noqa: E731
    a_files = mine("a")
    assert any(f.endswith("step_00000002") for f in a_files)
    assert main(["train", str(tmp_path / "b.yaml")]) == 0
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl") if '"loss"' in line]
    assert steps == [1, 2, 3, 4]  # from the start: A's checkpoint was not resumed
    assert any(f.endswith("step_00000002") for f in mine("b"))
    # What `raydpo train b.yaml --force` does before training again: B's checkpoints go, A's stay.
    assert prepare_run_dir(run_paths(cfgs["b"]), to_dict(cfgs["b"]), run_storage(cfgs["b"]), force=True) == "restart"
    assert mine("b") == [] and mine("a") == a_files


def _hub_cache(root, tiny_model_dir, commits: list[str], main: str) -> None:
    """A Hugging Face hub cache holding snapshots of ``org/tiny`` at ``commits``, ``main`` its head."""
    import shutil

    repo = root / "models--org--tiny"
    for commit in commits:
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)


def test_a_hub_id_is_pinned_to_the_drivers_revision_on_every_node(tiny_model_dir, tmp_path):
    """The driver ships ``id@commit``; a node resolves that commit from its own cache even where the
    branch has moved on, and a node that cannot get it says which id, revision and token."""
    old, new = "a" * 40, "b" * 40
    driver, node, empty = tmp_path / "driver-hf", tmp_path / "node-hf", tmp_path / "empty-hf"
    _hub_cache(driver, tiny_model_dir, [old], main=old)
    _hub_cache(node, tiny_model_dir, [old, new], main=new)  # this node's cache saw a later push
    empty.mkdir()
    code = ("import sys; from raydpo.models import pin, resolve_local\n"
            "try:\n    print(pin(sys.argv[1]) if sys.argv[2] == 'pin' else resolve_local(sys.argv[1]))\n"
            "except FileNotFoundError as e:\n    print('error:', e)")

    def on(cache, *args):
        env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    pinned = on(driver, "org/tiny", "pin")
    assert pinned == f"org/tiny@{old}"
    assert on(node, pinned, "resolve") == str(node / "models--org--tiny" / "snapshots" / old)
    assert on(node, "org/tiny", "resolve") == str(node / "models--org--tiny" / "snapshots" / new)  # unpinned: the branch
    error = on(empty, pinned, "resolve")
    assert error.startswith("error: cannot resolve model 'org/tiny' at revision " + old) and "HF_TOKEN" in error
    assert on(driver, tiny_model_dir, "pin") == os.path.abspath(tiny_model_dir)  # a local directory stays a path


def test_the_probe_costs_nothing_on_one_node(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    from conftest import make_config
    from raydpo.storage.probe import check_nodes_see, other_nodes, run_paths

    cfg = make_config(tiny_model_dir, f"{synthetic_dir}/train.jsonl", tmp_path)
    writes, reads = run_paths(cfg)
    assert set(writes) == {"output.dir", "reference.cache_dir", "data.cache_dir"}
    assert set(reads) == {"model.name_or_path", "reference.name_or_path", "data.train[0]"}
    assert other_nodes() == []
    check_nodes_see(cfg)  # one node: no probe file, no task
    assert not (tmp_path / "run").exists()
