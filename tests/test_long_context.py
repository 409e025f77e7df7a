"""Long sequences: chunked log-probs equal the full-logits ones, and sequence parallelism (DeepSpeed
Ulysses over gloo) trains to the same weights as one rank, on real models and real DeepSpeed engines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import shared_cache
from raydpo.data.collate import collate_packed, collate_pairs
from raydpo.logprobs import forward_logps

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from raydpo.fixtures.families import write_family_model

    root = tmp_path_factory.mktemp("long")
    return {name: write_family_model(str(root / name), name) or str(root / name)
            for name in ("llama", "gemma2", "gpt2", "mistral", "qwen2_moe", "mixtral")}


def pairs(seed: int = 1, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    lengths = ((3, 30), (1, 25), (1, 25))
    return [[torch.randint(5, 200, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
            for lo, hi in lengths]


def load(path):
    from transformers import AutoModelForCausalLM

    from raydpo.models import zero_dropout

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    zero_dropout(model)
    return model.train()


def logps_and_grads(model, batch, chunk):
    model.zero_grad()
    lp = forward_logps(model, batch, chunk)
    # A non-uniform weight per sequence, as DPO's loss gives: a bug that mixes sequences shows.
    (lp * torch.arange(1, lp.shape[0] + 1)).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])  # plain, soft-capped + windows, tied embeddings
@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_chunked_logps_and_gradients_equal_full_logits(family_dirs, family, layout):
    model = load(family_dirs[family])
    cols = pairs()
    batch = collate_pairs(*cols, 0) if layout == "padded" else collate_packed(*cols, 0)
    full, full_grads = logps_and_grads(model, batch, 0)
    for chunk in (None, 4):  # one automatic chunk; many checkpointed chunks
        lp, grads = logps_and_grads(model, batch, chunk)
        torch.testing.assert_close(lp, full, rtol=1e-5, atol=1e-5)
        assert grads.keys() == full_grads.keys()
        for name, g in grads.items():
            scale = full_grads[name].abs().max().clamp(min=1.0)
            assert (g - full_grads[name]).abs().max() / scale < 1e-5, name


def test_packed_reference_rows_chunked_equal_full(family_dirs):
    from raydpo.data.shared import collate_shared

    model = load(family_dirs["gemma2"]).eval()
    batch = collate_shared(*pairs(seed=3), 0)
    with torch.inference_mode():
        full = forward_logps(model, batch, 0)
        for chunk in (None, 5):
            torch.testing.assert_close(forward_logps(model, batch, chunk), full, rtol=1e-5, atol=1e-5)


def test_unknown_logit_transform_stops(family_dirs):
    """A model whose logits are more than lm_head's output (here scaled by a hook) is refused."""
    model = load(family_dirs["llama"])
    model.register_forward_hook(lambda m, args, out: out.__setitem__("logits", out.logits * 2.0) or out)
    with pytest.raises(RuntimeError, match="logits_chunk_tokens: 0"):
        forward_logps(model, collate_pairs(*pairs(), 0))
    forward_logps(model, collate_pairs(*pairs(), 0), 0)  # the full-logits path still works


def test_automatic_chunk_bounds_memory():
    from raydpo.logprobs.chunked import auto_chunk

    assert auto_chunk(151_646) * 151_646 * 4 <= 128 * 2**20
    assert auto_chunk(2048) == 16_384 and auto_chunk(10**9) == 128


def test_sequence_parallel_settings_are_refused_up_front():
    from raydpo.config import from_dict
    from raydpo.config.rules import validate

    base = {"model": {"name_or_path": "x"}, "train": {"num_workers": 3, "sequence_parallel_size": 2}}
    with pytest.raises(ValueError, match="does not divide train.num_workers 3; allowed: 1, 3"):
        validate(from_dict(base))
    with pytest.raises(ValueError, match="allowed: sdpa, flash_attention_2"):
        validate(from_dict(base | {"model": {"name_or_path": "x", "attn_implementation": "eager"},
                                   "train": {"num_workers": 2, "sequence_parallel_size": 2}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, sp: int, model_dir: str, out: str, zero: int, layout: str, lora: int) -> tuple[list, str]:
    """One process group of ``world`` ranks (tests/sp_worker.py) on its own port, started, not waited for."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "sp_worker.py"), str(r), str(world), str(sp), model_dir, out,
                               str(zero), layout, str(lora)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    return procs, out


def finish_ranks(group: tuple[list, str]) -> dict:
    procs, out = group
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:]
    return torch.load(out)


@pytest.mark.parametrize("family,zero,layout,lora", [("llama", 0, "padded", 0), ("llama", 2, "padding_free", 1),
                                                     ("llama", 3, "padding_free", 0), ("gemma2", 1, "padded", 0),
                                                     ("mistral", 1, "padding_free", 0), ("qwen2_moe", 2, "padding_free", 0),
                                                     ("mixtral", 1, "padded", 0)])
def test_sequence_parallel_trains_to_the_same_weights(family_dirs, tmp_path, family, zero, layout, lora):
    """SP=2 on 2 ranks against 1 rank: the same loss at every step and the same weights after 3 SGD
    steps (gradient checkpointing on; LoRA on one case; Gemma 2's 24-token windows on rows of up to
    ~85 tokens; Mistral's, which it passes as an argument, not an attribute, on packed sequences; the
    MoE router loss, weight 1, whose sums each rank takes over its own columns; a gradient off by any
    factor would show)."""
    # Both groups at once (their own ports): most of each process's time is its imports.
    groups = [start_ranks(n, n, family_dirs[family], str(tmp_path / f"sp{n}.pt"), zero, layout, lora) for n in (1, 2)]
    one, two = map(finish_ranks, groups)
    assert len(one["losses"]) == 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5)
    moved = max((one["state"][k] - one["initial"][k]).abs().max().item() for k in one["state"])
    assert moved > 1e-3  # the steps really changed the weights
    for k, w in one["state"].items():
        torch.testing.assert_close(two["state"][k], w, rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.slow
def test_a_16k_pair_goes_through_tokenization_reference_and_sequence_parallel_training(ray_cluster, synthetic_dir, tmp_path):
    """One pair of 16k+ tokens among short ones, end to end on the embedded cluster: tokenized (no
    truncation at data.max_length 20,000), scored by the reference pool alone in its batch (token
    budget 4,096, over its 4,096-token packed-row limit), trained by 2 workers in one sequence-parallel
    group. The step-0 guard compares the SP policy's log-probs with the actor's on the long pair
    (the seed puts it first): they agree to float32 rounding."""
    import json

    import numpy as np

    from raydpo.config import from_dict
    from raydpo.pipeline import run
    from raydpo.fixtures.synthetic import WORDS
    from raydpo.fixtures.tiny import TinyModelSpec, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", TinyModelSpec(max_position_embeddings=32768))
    short = [json.loads(line) for line in open(f"{synthetic_dir}/train.jsonl").readlines()[:3]]
    words = lambda n, k: " " + " ".join(WORDS[(i * k) % len(WORDS)] for i in range(n))  # noqa: E731
    long = {"prompt": "Count on from window:" + words(12_000, 7), "chosen": words(2_500, 3), "rejected": words(2_000, 5)}
    rows = [long] + short
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The seed whose epoch order puts the long pair (row 0) first, so the guard checks it.
    seed = next(s for s in range(100) if np.random.default_rng([s, 0]).permutation(len(rows))[0] == 0)
    cfg = from_dict({
        "model": {"name_or_path": model_dir},
        "reference": {"cache_dir": str(tmp_path / "cache"), "batch_size": 4, "max_tokens_per_batch": 4096},
        "data": {"train": str(data), "max_length": 20_000, "num_workers": 1},
        "train": {"num_workers": 2, "sequence_parallel_size": 2, "zero_stage": 2, "micro_batch_size": 1,
                  "gradient_accumulation_steps": 2, "learning_rate": 1e-4, "seed": seed},
        "output": {"dir": str(tmp_path / "run")},
    })
    result = run(cfg)
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["counts_add_up"] and summary["rows_used"] == 4 and summary["steps"] == 2, summary
    guard = json.load(open(tmp_path / "run" / "guard.json"))
    assert guard["ok"] and guard["max_token_drift"] < 1e-4, guard
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)
    # The first step holds the long pair: its real tokens (both sequences) are counted once.
    assert steps[0]["tokens_per_s"] * steps[0]["step_time_s"] > 2 * 14_000
    assert result is not None


@pytest.mark.slow
def test_sequence_parallel_run_recovers_a_killed_worker_to_the_same_model(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """SP=2 on 2 workers with checkpoints: rank 1 killed mid-run, Ray Train restarts the group from
    the latest checkpoint and the run ends with the uninterrupted run's losses and weights."""
    import json
    import signal
    import threading
    import time

    from transformers import AutoModelForCausalLM

    from raydpo.config import from_dict
    from raydpo.pipeline import run

    def raw(name):
        return {"model": {"name_or_path": tiny_model_dir},
                "reference": {"cache_dir": shared_cache(), "batch_size": 64},
                "data": {"train": f"{synthetic_dir}/train.jsonl", "max_length": 64},
                "train": {"num_workers": 2, "sequence_parallel_size": 2, "zero_stage": 2, "micro_batch_size": 8,
                          "learning_rate": 1e-3, "max_steps": 6, "checkpoint_every": 2, "max_failures": 1, "seed": 0,
                          "padding_free": True},
                "output": {"dir": str(tmp_path / name)}}

    def losses(name):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / name / "metrics.jsonl")) if "loss" in r]

    run(from_dict(raw("whole")))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(r=run(from_dict(raw("killed")))))
    thread.start()
    deadline = time.time() + 300
    # Step 5: the checkpoint of step 2 is registered by then (that of step 4 may still be in flight).
    while not ((tmp_path / "killed" / "metrics.jsonl").exists() and any(s >= 5 for s, _ in losses("killed"))):
        assert time.time() < deadline
        time.sleep(0.02)
    killed = json.load(open(tmp_path / "killed" / "workers" / "rank1.json"))["pid"]
    os.kill(killed, signal.SIGKILL)
    thread.join(timeout=600)
    assert "r" in outcome, "the run did not recover"
    now = json.load(open(tmp_path / "killed" / "workers" / "rank1.json"))
    assert now["pid"] != killed and now["start_step"] in (2, 4)
    got, want = losses("killed"), losses("whole")
    assert [s for s, _ in got] == list(range(1, 7)) and [s for s, _ in want] == list(range(1, 7))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-5
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "model").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model").state_dict()
    assert max((w[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def packed_positions(lengths: list[int]) -> list[int]:
    return [i for n in lengths for i in range(n)]


@pytest.mark.parametrize("window", [None, 5])
def test_document_attention_equals_sdpa_with_the_dense_mask(window):
    """raydpo's SP core attention (per-sequence causal sdpa, windows in blocks, no [T, T] mask)
    against transformers' sdpa under :func:`sequence_mask`'s dense mask: outputs and q/k/v gradients,
    GQA (4 heads on 2), several sequences per row, runs of one-token pads, sequences shorter than,
    equal to and several times the window (with and without a remainder), batch > 1 with rows alike
    and rows unlike."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from raydpo.train.sequence_parallel import document_sdpa, sequence_mask

    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, sliding_window=window, training=True)
    masks = []

    def spy(m, q, k, v, mask, *a, **kw):
        masks.append(mask)
        return sdpa_attention_forward(m, q, k, v, mask, *a, **kw)

    attention = document_sdpa(spy)
    rows = {"one row": [[7, 1, 12, 5, 16, 1, 1, 1, 3, 11, 2]],
            "rows alike": [[9, 14, 1, 1, 6]] * 2,
            "rows unlike": [[20, 1, 1, 3], [4, 10, 11], [25]]}
    for name, lengths in rows.items():
        pos = torch.tensor([packed_positions(n) for n in lengths])
        b, t = pos.shape
        g = torch.Generator().manual_seed(t)
        q, k, v = (torch.randn(b, h, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
        weight = torch.randn(b, t, 4, 8, generator=g, dtype=torch.float64)
        got = attention(module, q, k, v, None, dropout=0.0, scaling=0.3, position_ids=pos)[0]
        got_grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
        mask = sequence_mask(pos, window)
        assert mask is not None  # every case here restarts in a row: plain causal attention would not do
        want = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)[0]
        want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))
        assert got.shape == want.shape == (b, t, 4, 8)
        # No [T, T] mask: none at all without a window, at most 2w x 2w with one.
        sizes = [m.numel() for m in masks if m is not None]
        assert not sizes if window is None else max(sizes) <= (2 * window) ** 2
        masks.clear()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
        for x, y in zip(got_grads, want_grads):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=name)


def test_sequence_parallel_policy_builds_no_local_masks_while_training():
    """Under Ulysses the model's own masks (a dense [T/P, T/P] one for packed rows) are dropped: the SP
    policy's are not built while it trains; in eval, and for any other model, they are as before."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask

    from raydpo.train.sequence_parallel import skip_local_masks

    def tiny():
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))

    policy, other = tiny(), tiny()
    pos = torch.tensor([packed_positions([5, 3, 4])])
    embeds = torch.zeros(1, 12, 16)
    mask = lambda model: create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,  # noqa: E731
                                            past_key_values=None, position_ids=pos)
    saved = dict(ALL_MASK_ATTENTION_FUNCTIONS._local_mapping)
    try:
        assert mask(policy.train()) is not None
        skip_local_masks(policy)
        skip_local_masks(policy)  # once more (a second setup): still one wrapper
        assert mask(policy.train()) is None
        assert mask(other.train()) is not None and mask(policy.eval()).shape == (1, 1, 12, 12)
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_MASK_ATTENTION_FUNCTIONS._local_mapping.update(saved)
