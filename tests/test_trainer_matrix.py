"""One trainer, two drivers: ``raydpo train`` (epochs) and ``raydpo online`` (rounds) over the same
trainer features -- two padded rows per pair with chunked logits, shared-prompt units packed
padding-free with full logits (what a soft-capping family needs: ``model.logits_chunk_tokens: 0``) --
with the exactness guard checking step 0 in both. Real Ray Train workers, real DeepSpeed ZeRO-2 on gloo, the tiny model."""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import shared_cache

LAYOUTS = {
    "two-rows-padded-chunked": {"train": {"padding_free": False, "share_prompt": False}, "model": {"logits_chunk_tokens": 16}},
    "shared-padding-free-full-logits": {"train": {"padding_free": True}, "model": {"logits_chunk_tokens": 0}},
}


def _raw(driver: str, layout: str, tiny_model_dir: str, synthetic_dir: str, tmp_path) -> dict:
    raw = {
        "model": {"name_or_path": tiny_model_dir, **LAYOUTS[layout]["model"]},
        "reference": {"cache_dir": shared_cache(), "batch_size": 32},
        "data": {"train": f"{synthetic_dir}/train.jsonl", "eval": f"{synthetic_dir}/eval.jsonl", "max_length": 48},
        "loss": {"beta": 0.1},
        "train": {"num_workers": 1, "micro_batch_size": 8, "learning_rate": 1e-3, "seed": 0, "log_every": 1,
                  **LAYOUTS[layout]["train"]},
        "output": {"dir": str(tmp_path / "run")},
    }
    if driver == "offline":
        raw["train"]["max_steps"] = 4
    else:
        raw["online"] = {"rounds": 1, "prompts_per_round": 24, "steps_per_round": 4, "eval_prompts": 8,
                         "generator": {"samples_per_prompt": 4, "max_new_tokens": 8, "batch_size": 32},
                         "judge": {"reward_fn": "raydpo.fixtures.synthetic:count_on_reward"}}
    return raw


def _run(driver: str, raw: dict) -> tuple[list[dict], float]:
    """Run it; returns (the training step rows, the guard's measured drift at step 0)."""
    from raydpo.config import from_dict

    cfg = from_dict(raw)
    if driver == "offline":
        from raydpo.pipeline import run

        result = run(cfg)
        with open(os.path.join(result.output_dir, "guard.json")) as f:
            guard = json.load(f)
        assert guard["ok"]
        drift = guard["max_token_drift"]
    else:
        from raydpo.online.run import run_online

        result = run_online(cfg)
        drift = result.rounds[0]["guard/max_token_drift"]
    with open(os.path.join(result.output_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    return steps, drift


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("driver", ["offline", "online"])
def test_both_drivers_train_every_layout_and_check_step_zero(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path, driver, layout):
    steps, drift = _run(driver, _raw(driver, layout, tiny_model_dir, synthetic_dir, tmp_path))
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    # Step 1 runs before any update with policy == reference: the sigmoid loss is ln 2 and the
    # guard found the cached log-probs equal to the policy's own.
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4, steps[0]
    assert 0 <= drift <= 1e-4
    assert all(math.isfinite(s["loss"]) and s["tokens_per_s"] > 0 for s in steps)
    # Model FLOPs are counted on CPU too; MFU only where a device's peak is known (not a CPU).
    assert all(s["tflops_per_device"] > 0 and s["tokens_per_s_per_device"] == s["tokens_per_s"] and "mfu" not in s
               for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
