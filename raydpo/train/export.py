"""Export the trained policy as a Hugging Face directory, gathering ZeRO-3 shards when needed."""

from __future__ import annotations


def gathered_state_dict(module, is_writer: bool, trainable_only: bool = False) -> dict:
    """Full tensors of every parameter and persistent buffer (``trainable_only``: of the parameters
    that require grad, e.g. LoRA adapters), on CPU, on the writer rank only.

    Parameters are gathered one at a time (ZeRO-3), so peak extra memory is one parameter, not
    the model. Every rank must call this (the gathers are collective). Tied parameters share one
    tensor under each of their names.
    """
    import deepspeed
    import torch

    by_id: dict[int, torch.Tensor] = {}
    for _, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_writer:
                by_id[id(param)] = param.data.detach().to("cpu", copy=True)
    if not is_writer:
        return {}
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if trainable_only and id(value) not in by_id:
            continue
        state[name] = by_id[id(value)] if isinstance(value, torch.nn.Parameter) else value.detach().cpu()
    return state


def export_model(module, out_dir: str, is_writer: bool, model_cfg=None, model_path: str | None = None,
                 adapter_only: bool = False) -> None:
    """Save ``module`` (a ``PreTrainedModel`` or peft model, possibly ZeRO-3 partitioned) to ``out_dir``
    (a local directory or URI).

    A LoRA policy is saved as its adapter (peft format) with ``adapter_only``, else merged into a
    fresh full-precision copy of the base (``model_path`` in ``model_cfg.dtype``; also for QLoRA, whose
    4-bit base would lose the update if merged in place): a plain Hugging Face model.
    """
    from raydpo import storage

    lora = model_cfg is not None and model_cfg.lora.r > 0
    state = gathered_state_dict(module, is_writer, trainable_only=lora)
    if not is_writer:
        return
    # ``out_dir`` may be a URI: written to a local directory, then uploaded file by file.
    with storage.local_dir_for_writing(out_dir) as local:
        if not lora:
            module.save_pretrained(local, state_dict=state, safe_serialization=True)
        elif adapter_only:
            module.save_pretrained(local, state_dict=state)
        else:
            merged_lora(state, model_cfg, model_path).save_pretrained(local, safe_serialization=True)


def merged_lora(adapter_state: dict, model_cfg, model_path: str):
    """The base from ``model_path`` (unquantized, ``model_cfg.dtype``) with the adapters merged in."""
    from peft import get_peft_model, set_peft_model_state_dict

    from raydpo.models import load_causal_lm
    from raydpo.train.policy import lora_config

    base = load_causal_lm(model_path, model_cfg.dtype, model_cfg.trust_remote_code)
    peft_model = get_peft_model(base, lora_config(model_cfg.lora))
    # Keys as the trained peft model named them; set_peft_model_state_dict adds the adapter name.
    from peft import get_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, get_peft_model_state_dict(peft_model, state_dict=adapter_state))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"adapter weights do not match the base model: {result.unexpected_keys[:3]}")
    return peft_model.merge_and_unload()
