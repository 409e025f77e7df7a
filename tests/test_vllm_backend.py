"""The vLLM reference backend equals the transformers one in float32 (runs where vllm is installed:
``make test`` runs this file in ``.venv-vllm``, which holds the optional ``vllm`` extra)."""

import os

import pytest

vllm = pytest.importorskip("vllm", reason="vllm is not installed here; `make test-vllm` runs this file in .venv-vllm")

# The engine runs in this process: no engine-core subprocess to spawn from inside pytest.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_vllm_prompt_logprobs_equal_hf(tiny_model_dir, tokenizer):
    from raydpo.data.tokenize import TokenizeSettings, tokenize_normalized
    from raydpo.data.validate import Pair
    from raydpo.reference.scorer import HfBackend, ReferenceScorer
    from raydpo.synthetic import make_pairs

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
