"""ZeRO-3 policies built partitioned and exported as a stream of safetensors shards (raydpo.train.zero3,
raydpo.train.export), on real 2-rank DeepSpeed engines over gloo (tests/zero3_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from raydpo.fixtures.families import write_family_model

    root = tmp_path_factory.mktemp("zero3")
    dirs = {name: str(root / name) for name in ("llama", "gpt2", "mixtral")}
    for name, path in dirs.items():
        write_family_model(path, name)
    # llama as a sharded checkpoint (an index and several files), as large models come.
    AutoModelForCausalLM.from_pretrained(dirs["llama"]).save_pretrained(dirs["llama"], max_shard_size="40KB")
    os.remove(os.path.join(dirs["llama"], "model.safetensors"))
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(model_dir: str, out: str, lora: int, shard_bytes: int) -> dict:
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "zero3_worker.py"), str(r), "2", model_dir, out, str(lora),
                               str(shard_bytes)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-2000:]
    with open(os.path.join(out, "files.json")) as f:
        return torch.load(os.path.join(out, "rank0.pt")) | {"files": json.load(f), "log": logs[0]}


def plain_state(model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    seen, out = set(), {}
    for name, p in model.named_parameters():  # tied weights once, as the gathered model names them
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach()
    return out


SLOW = pytest.mark.slow


@pytest.mark.parametrize("family,lora,shard_bytes", [("llama", 0, 60_000), pytest.param("llama", 8, 1 << 30, marks=SLOW),
                                                     pytest.param("gpt2", 8, 1 << 30, marks=SLOW),
                                                     pytest.param("mixtral", 0, 1 << 30, marks=SLOW)])
def test_zero3_policy_is_loaded_partitioned_and_exported_as_the_trained_model(family_dirs, tmp_path, family, lora, shard_bytes):
    """Every parameter partitioned from the start; gathered, the weights equal a plain
    ``from_pretrained``; the exported directory loads with transformers and gives the engine's
    logits (LoRA merged; GPT-2: tied embeddings and Conv1D layers; Mixtral: transformers' own
    loader and save_pretrained, whose checkpoint names it converts); small shards make an index."""
    from transformers import AutoModelForCausalLM

    got = run_ranks(family_dirs[family], str(tmp_path), lora, shard_bytes)
    assert got["partitioned"]
    want = plain_state(family_dirs[family])
    assert set(want) <= set(got["loaded"])  # (gathered_state_dict also names tied weights twice)
    for name, value in want.items():
        torch.testing.assert_close(got["loaded"][name], value, rtol=0, atol=0, msg=name)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=got["ids"]).logits, got["logits"], rtol=1e-5, atol=1e-5)
    if shard_bytes < 1 << 20:
        assert "model.safetensors.index.json" in got["files"]
        assert sum(f.endswith(".safetensors") for f in got["files"]) > 2
    else:
        assert "model.safetensors" in got["files"]
    assert "config.json" in got["files"]
