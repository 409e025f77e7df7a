"""The trainable policy: weights as configured, gradient checkpointing, LoRA / QLoRA adapters (peft)."""

from __future__ import annotations

from raydpo.config import LoraConfig, ModelConfig


def lora_config(lora: LoraConfig):
    """peft's LoraConfig for ``model.lora`` (a causal LM task, no bias training)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = lora.target_modules
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # peft takes the string "all-linear" (every linear layer but the output head) or a list of names.
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def activations(m: ModelConfig, device):
    """The context the policy's forward runs in: with ``model.activation_offloading`` on a GPU,
    torch's ``save_on_cpu`` (tensors saved for backward go to pinned CPU memory and come back when
    backward needs them); otherwise nothing."""
    import contextlib

    import torch

    if m.activation_offloading and torch.device(device).type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def build_policy(m: ModelConfig, model_path: str, device: str | None = None, sequence_parallel: bool = False,
                 ds_config: dict | None = None):
    """Load the policy for training.

    Full fine-tuning: every weight trainable. ``lora.r`` > 0: the base frozen (bitsandbytes-quantized
    with ``quantization``: QLoRA) and only the adapters trainable; the adapters start at zero, so the
    policy equals the base, which is still the reference, at step 0.

    ``ds_config``: the DeepSpeed config the engine is built with next; under ZeRO-3 (unquantized)
    the model is built partitioned (:mod:`raydpo.train.zero3`; every rank must call this together),
    else each rank loads it whole onto ``device``.
    """
    from raydpo.models import load_causal_lm, torch_dtype, zero_dropout
    from raydpo.train.zero3 import load_partitioned, zero3_enabled

    # Ulysses patches the attention implementation the model names: sdpa unless another is chosen.
    attn = m.attn_implementation or ("sdpa" if sequence_parallel else None)
    if zero3_enabled(ds_config) and m.quantization is None:
        from raydpo.models import resolve_local

        model = load_partitioned(resolve_local(model_path), ds_config, torch_dtype(m.dtype), m.trust_remote_code, attn)
        if m.disable_dropout:
            zero_dropout(model)
    else:
        model = load_causal_lm(model_path, m.dtype, m.trust_remote_code, quantization=m.quantization, device=device,
                               attn_implementation=attn, disable_dropout=m.disable_dropout)
    if m.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if m.lora.r == 0:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if m.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=m.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(m.lora))


def trainable_summary(model) -> dict[str, int]:
    """Parameter counts: trainable and total (for the run log)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}
