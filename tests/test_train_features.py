"""Training features end to end (Ray Train + real DeepSpeed on gloo + the tiny model):
gradient accumulation, padding-free batches and CPU-Adam offload equal the plain large batch;
LoRA and QLoRA train and export; reference-free losses run with no reference stage."""

import json
import os

import pytest
import torch

from conftest import shared_cache


def _config(tiny_model_dir, train_file, tmp_path, name, cache=None, **train):
    from raydpo.config import from_dict

    raw = {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": cache or shared_cache(), "batch_size": 32},
        "data": {"train": train_file, "max_length": 64},
        "loss": {"beta": 0.1},
        "train": {"num_workers": 1, "zero_stage": 2, "micro_batch_size": 8, "learning_rate": 1e-3, "max_steps": 1,
                  "seed": 0} | train,
        "output": {"dir": str(tmp_path / name)},
    }
    return raw, from_dict


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]


@pytest.fixture(scope="module")
def eight_pairs(synthetic_dir, tmp_path_factory) -> str:
    """One optimizer step's worth of pairs, so every variant below takes exactly the same step."""
    path = tmp_path_factory.mktemp("eight") / "train.jsonl"
    path.write_text("".join(open(f"{synthetic_dir}/train.jsonl").readlines()[:8]))
    return str(path)


@pytest.mark.slow
def test_accumulation_padding_free_and_offload_equal_the_large_batch(ray_cluster, tiny_model_dir, eight_pairs, tmp_path):
    """One step over the same 8 pairs: 1 x 8 pairs (torch Adam, ZeRO-2) against 8 micro-batches of 1
    accumulated, with ZeRO-2's optimizer offloaded to DeepSpeed's CPU Adam; and padding-free under
    ZeRO-3 with parameters offloaded too. Loss, gradient norm and the updated weights agree. (Two
    features per run: each run is a Ray Train start, and any one feature that changed the numbers
    would show, the two changes being of unrelated kinds.)"""
    from raydpo.pipeline import run

    offload = {"optimizer": "cpu_adam", "offload_optimizer": True}
    variants = {
        "large": {},
        "accumulated_cpu_adam_offload": {"micro_batch_size": 1, "gradient_accumulation_steps": 8} | offload,
        "padding_free_zero3_param_offload": {"padding_free": True, "zero_stage": 3, "offload_params": True} | offload,
    }
    results = {}
    for name, train in variants.items():
        raw, from_dict = _config(tiny_model_dir, eight_pairs, tmp_path, name, **train)
        run(from_dict(raw))
        (step,) = _metrics(tmp_path / name)
        results[name] = (step, _weights(tmp_path / name / "model"))
    base_step, base_w = results["large"]
    initial = _weights(tiny_model_dir)
    assert any(not torch.equal(initial[k], base_w[k]) for k in base_w)
    assert base_step["grad_norm"] > 0
    for name, (step, w) in results.items():
        assert abs(step["loss"] - base_step["loss"]) < 1e-6, name
        assert abs(step["grad_norm"] - base_step["grad_norm"]) < 1e-5 * base_step["grad_norm"], name
        # Adam's first step is about lr * sign(g): where |g| is near Adam's eps (1e-8), float rounding
        # of a differently summed gradient moves that element by a part of lr (1e-3); everywhere
        # else the weights agree to float precision.
        diffs = torch.cat([(w[k] - base_w[k]).abs().flatten() for k in base_w])
        assert diffs.max() < 1e-4 and diffs.mean() < 1e-7 and (diffs > 1e-6).float().mean() < 1e-3, (name, diffs.max(), diffs.mean())


@pytest.mark.slow
def test_lora_trains_and_exports_merged(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """LoRA on all linear layers, two ZeRO-2 workers: the adapters start at zero (the exactness guard
    sees policy == reference), only adapters train, and model/ is the merged full model."""
    from raydpo.pipeline import run

    raw, from_dict = _config(tiny_model_dir, f"{synthetic_dir}/train.jsonl", tmp_path, "lora",
                             num_workers=2, max_steps=6, learning_rate=1e-2, lr_scheduler="cosine", warmup_steps=2)
    raw["model"]["lora"] = {"r": 8, "alpha": 16, "target_modules": ["all-linear"]}
    result = run(from_dict(raw))
    params = result.summary["policy_params"]
    assert 0 < params["trainable_params"] < 0.5 * params["total_params"]
    guard = json.load(open(tmp_path / "lora" / "guard.json"))
    assert guard["ok"] and guard["max_token_drift"] < 1e-4
    steps = _metrics(tmp_path / "lora")
    lrs = [s["learning_rate"] for s in steps]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(5e-3) and lrs[2] == pytest.approx(1e-2) and lrs[-1] < lrs[2]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert not os.path.exists(tmp_path / "lora" / "model" / "adapter_config.json")
    before, after = _weights(tiny_model_dir), _weights(tmp_path / "lora" / "model")
    assert before.keys() == after.keys()  # merged: plain Llama weights, no lora_ tensors
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert not any("norm" in k or "embed" in k for k in changed)


@pytest.mark.slow
def test_qlora_with_orpo_exports_the_adapter_without_a_reference(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """QLoRA (bitsandbytes 4-bit base on CPU) with gradient checkpointing and the reference-free ORPO
    loss: no reference model, no cache; model/ holds the adapter, which loads onto the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raydpo.pipeline import run

    raw, from_dict = _config(tiny_model_dir, f"{synthetic_dir}/train.jsonl", tmp_path, "qlora", cache=str(tmp_path / "cache"),
                             max_steps=3, learning_rate=1e-2)
    raw["model"] |= {"quantization": "4bit", "gradient_checkpointing": True, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}
    raw["loss"] = {"type": "orpo", "beta": 0.1}
    raw["output"]["save_adapter_only"] = True
    result = run(from_dict(raw))
    assert result.summary["reference"] == "skipped: the loss needs no reference"
    assert not os.path.exists(tmp_path / "cache")
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in _metrics(tmp_path / "qlora"))
    model_dir = tmp_path / "qlora" / "model"
    assert os.path.exists(model_dir / "adapter_config.json") and os.path.exists(model_dir / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), model_dir)
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained away from the zero init


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["simpo", "sft"])
def test_reference_free_losses_run_without_a_reference_stage(ray_cluster, tiny_model_dir, eight_pairs, tmp_path, loss):
    from raydpo.pipeline import run

    raw, from_dict = _config(tiny_model_dir, eight_pairs, tmp_path, loss, cache=str(tmp_path / "cache"), max_steps=1)
    raw["loss"] = {"type": loss, "beta": 2.0}
    result = run(from_dict(raw))
    assert result.summary["reference"] == "skipped: the loss needs no reference"
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / loss / "guard.json")
    (step,) = _metrics(tmp_path / loss)
    assert step["grad_norm"] > 0 and "rewards/margins" in step
    if loss == "sft":  # the mean NLL per chosen token of the untrained model: about ln(vocab)
        assert 4 < step["loss"] < 9


@pytest.mark.slow
def test_bfloat16_policy_trains_on_cpu(ray_cluster, tiny_model_dir, eight_pairs, tmp_path):
    """DeepSpeed's bf16 mode on CPU: the reference (bf16 too) passes the guard at bf16 tolerance and
    the exported model keeps its dtype."""
    from transformers import AutoConfig

    from raydpo.pipeline import run

    raw, from_dict = _config(tiny_model_dir, eight_pairs, tmp_path, "bf16", max_steps=2, micro_batch_size=4)
    raw["model"]["dtype"] = "bfloat16"
    run(from_dict(raw))
    guard = json.load(open(tmp_path / "bf16" / "guard.json"))
    assert guard["ok"] and guard["tolerance"] == 5e-2
    steps = _metrics(tmp_path / "bf16")
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert str(AutoConfig.from_pretrained(tmp_path / "bf16" / "model").dtype).endswith("bfloat16")
