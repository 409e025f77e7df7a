"""The vLLM reference backend equals the transformers one in float32 (runs where vllm is installed:
``make test`` runs this file in ``.venv-vllm``, which holds the optional ``vllm`` extra)."""

import os

import pytest

# An explicit KV cache (GiB) instead of a share of RAM minus this process's size: the second engine
# in this process would otherwise find its share already used by the first.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

vllm = pytest.importorskip("vllm", reason="vllm is not installed here; `make test-vllm` runs this file in .venv-vllm")

# The engine runs in this process: no engine-core subprocess to spawn from inside pytest.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_vllm_prompt_logprobs_equal_hf(tiny_model_dir, tokenizer):
    from raydpo.data.tokenize import TokenizeSettings, tokenize_normalized
    from raydpo.data.validate import Pair
    from raydpo.reference.scorer import HfBackend, ReferenceScorer
    from raydpo.fixtures.synthetic import make_pairs

    pairs = [Pair(p["prompt"], p["chosen"], p["rejected"], "text") for p in make_pairs(24, seed=3)]
    rows = tokenize_normalized(tokenizer, pairs, TokenizeSettings(64))
    ids = [[r[k] for r in rows] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    hf_chosen, hf_rejected = HfBackend(tiny_model_dir, "float32", tokenizer.pad_token_id).score(*ids)
    scorer = ReferenceScorer(tiny_model_dir, "float32", tokenizer.pad_token_id, backend="vllm",
                             backend_options={"max_model_len": 128, "gpu_memory_utilization": 0.3})
    v_chosen, v_rejected = scorer.score(*ids)
    print(f"largest gap vLLM vs hf: {max(abs(v_chosen - hf_chosen).max(), abs(v_rejected - hf_rejected).max()):.2e}")
    assert abs(v_chosen - hf_chosen).max() < 1e-4
    assert abs(v_rejected - hf_rejected).max() < 1e-4
    assert (hf_chosen != hf_rejected).all()  # real, distinct values were compared


def test_vllm_generator_matches_hf_and_takes_new_weights(tiny_model_dir, tokenizer):
    """The online generator's vLLM backend: greedy completions equal transformers' on the same
    weights, sampling gives K completions, and new weights loaded in place change what it generates
    exactly as they change the transformers generator's (no engine rebuilt, no file written)."""
    from raydpo.online.generate import Generator

    v = Generator(tiny_model_dir, "float32", False, "vllm", max_length=64, gpu_memory_utilization=0.3)
    hf = Generator(tiny_model_dir, "float32", False, "hf", max_length=64)
    prompts = [tokenizer(p)["input_ids"] for p in ("Count on from apple:", "Count on from river:", "Count on from cloud:")]
    greedy = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "greedy": True}
    before = v.generate(prompts, 1, greedy, 0)["ids"]
    assert before == hf.generate(prompts, 1, greedy, 0)["ids"]
    sampled = v.generate(prompts, 4, {**greedy, "greedy": False}, 0)
    assert [len(c) for c in sampled["ids"]] == [4, 4, 4] and sampled["tokens"] > 0
    import torch

    torch.manual_seed(0)
    new = {k: t + 0.05 * torch.randn_like(t) for k, t in hf.weights().items()}
    v.load_weights(new)
    hf.load_weights(new)
    after = v.generate(prompts, 1, greedy, 0)["ids"]
    assert after == hf.generate(prompts, 1, greedy, 0)["ids"] and after != before
