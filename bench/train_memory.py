"""Model-state memory per trainer process: what each setup keeps resident for the whole run.

Counted from the parameter count (read from ``config.json`` on the meta device, nothing loaded) and
the dtypes each setup trains in; activations come on top and depend on batch and length.
"""

from __future__ import annotations


def parameter_count(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def model_state_bytes(n: int, bf16: bool, reference: bool) -> dict[str, int]:
    """Bytes per component for ``n`` parameters trained with AdamW.

    float32: weights, gradients and two AdamW moments at 4 bytes each. bf16 (mixed precision as
    DeepSpeed runs it): 2-byte weights and gradients, a 4-byte master copy and two 4-byte moments.
    ``reference``: a frozen copy of the weights kept beside the policy (TRL's in-loop reference).
    """
    w = 2 if bf16 else 4
    out = {"policy weights": w * n, "gradients": w * n, "optimizer": (12 if bf16 else 8) * n,
           "reference weights": w * n if reference else 0}
    out["total"] = sum(out.values())
    return out


def memory_table(model_dir: str, device: str) -> str:
    n = parameter_count(model_dir)
    bf16 = device == "cuda"
    rows = {"TRL, reference in loop": True, "TRL, precompute_ref_log_probs": False, "raydpo (reference in its pool)": False}
    mib = lambda b: f"{b / 2**20:>10.1f}"  # noqa: E731
    lines = [f"\nmodel-state memory per trainer ({n / 1e6:.2f}M parameters, {'bf16 mixed' if bf16 else 'float32'}, AdamW), MiB",
             f"{'':<32}{'weights':>10}{'grads':>10}{'optim':>10}{'ref':>10}{'total':>10}"]
    for name, ref in rows.items():
        b = model_state_bytes(n, bf16, ref)
        lines.append(f"{name:<32}{mib(b['policy weights'])}{mib(b['gradients'])}{mib(b['optimizer'])}"
                     f"{mib(b['reference weights'])}{mib(b['total'])}")
    return "\n".join(lines)
