"""Export the trained policy as a Hugging Face directory, streaming ZeRO-3 shards into safetensors files.

The writer rank never holds the model: parameters are gathered one module at a time (a LoRA layer
with its adapters, merged), copied to host memory and appended to the current safetensors shard,
which is written once it reaches :data:`SHARD_BYTES`. Peak extra memory on the writer is one shard
plus one module, on the other ranks one module. Checkpoints whose names transformers converts on
load and save (fused MoE experts, renamed keys) and QLoRA's 4-bit bases go through
``save_pretrained`` of a gathered state dict instead.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

#: Bytes per safetensors shard of an exported model: the writer's host memory beyond its ZeRO-3
#: partition. transformers' ``save_pretrained`` defaults to 50 GB shards, held whole.
SHARD_BYTES = 1 << 30
#: What peft puts before the base model's own parameter names.
PEFT_PREFIX = "base_model.model."


def settled(engine):
    """The engine's module with no ZeRO-3 parameter left in flight: prefetching during the last
    forward may have started gathers that nothing waited for, and a gather of an in-flight
    parameter fails ("Cannot partition a param in flight"). Call on every rank before gathering."""
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        engine.empty_partition_cache()  # waits for the in-flight gathers and releases every parameter
    return engine.module


def gathered_state_dict(module, is_writer: bool, trainable_only: bool = False) -> dict:
    """Full tensors of every parameter and persistent buffer (``trainable_only``: of the parameters
    that require grad, e.g. LoRA adapters), on CPU, on the writer rank only.

    Parameters are gathered one at a time (ZeRO-3), so peak extra memory is one parameter plus what
    is returned. Every rank must call this (the gathers are collective). Tied parameters share one
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


def lora_merged(weight, a, b, scaling: float, transpose: bool):
    """``W + scaling * B @ A`` (transposed for ``fan_in_fan_out`` layers such as GPT-2's Conv1D), as
    peft's ``merge_and_unload`` computes it, in float32, returned in ``weight``'s dtype.

    weight: [out, in] ([in, out] when ``transpose``); a: [r, in]; b: [out, r]."""
    delta = (b.float() @ a.float()) * scaling
    return (weight.float() + (delta.T if transpose else delta)).to(weight.dtype)


def _plain(name: str) -> str:
    """A peft parameter name as the merged model names it (no ``base_model.model.``, no ``.base_layer``)."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


def _lora_parts(sub) -> tuple | None:
    """(base layer, A, B, scaling, fan_in_fan_out) of a peft LoRA layer with the ``default`` adapter, else None."""
    a, b = getattr(sub, "lora_A", None), getattr(sub, "lora_B", None)
    if a is None or b is None or "default" not in a or not hasattr(sub, "base_layer"):
        return None
    return sub.base_layer, a["default"].weight, b["default"].weight, float(sub.scaling["default"]), bool(getattr(sub, "fan_in_fan_out", False))


def module_tensors(module, is_writer: bool) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    """(name, full CPU tensor) of every parameter and persistent buffer of ``module`` (a transformers
    model or a peft LoRA model, possibly ZeRO-3 partitioned), as the plain Hugging Face model names
    them: LoRA adapters merged into their base weights, tied parameters once (under their first
    name, as ``save_pretrained`` keeps them).

    A collective: every rank iterates it to the end, gathering one module's parameters at a time;
    only the writer gets tensors (the others' iteration yields nothing)."""
    import deepspeed

    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        lora = _lora_parts(sub)
        if lora is not None:
            base, a, b, scaling, transpose = lora
            params = [p for p in (*base.parameters(recurse=False), a, b) if id(p) not in seen]
            seen.update(id(p) for p in params)
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if is_writer:
                    for n, p in base.named_parameters(recurse=False):
                        value = lora_merged(p.data, a.data, b.data, scaling, transpose) if n == "weight" else p.data
                        yield _plain(f"{prefix}.{n}"), value.detach().to("cpu", copy=True)
            continue
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
                if is_writer:
                    for n, p in own:
                        yield _plain(f"{prefix}.{n}" if prefix else n), p.data.detach().to("cpu", copy=True)
        if is_writer:
            for n, buf in sub.named_buffers(recurse=False):
                if buf is not None and n not in sub._non_persistent_buffers_set:
                    yield _plain(f"{prefix}.{n}" if prefix else n), buf.detach().to("cpu", copy=True)


class ShardWriter:
    """safetensors shards of at most ``max_bytes`` (a tensor larger than that gets its own) in
    ``directory``, named as ``save_pretrained`` names them, with ``model.safetensors.index.json``
    when there is more than one."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory, self.max_bytes = directory, max_bytes or SHARD_BYTES
        self.current: dict = {}
        self.size = self.total = 0
        self.files: list[list[str]] = []

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.current, os.path.join(self.directory, f"shard-{len(self.files)}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.size = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards ``model-0000k-of-0000n.safetensors`` (one:
        ``model.safetensors``) and the index; the file names written."""
        if self.current or not self.files:
            self._flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(os.path.join(self.directory, f"shard-{i}.tmp"), os.path.join(self.directory, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: name for name, keys in zip(names, self.files) for k in keys}}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names


def streamable(module, model_cfg) -> bool:
    """Whether :func:`module_tensors` gives this model's checkpoint: no 4-bit / 8-bit base (QLoRA
    merges into a fresh full-precision copy), no names transformers converts on save."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    quantized = model_cfg is not None and model_cfg.quantization is not None
    # LoRA on embeddings and DoRA keep other tensors than A and B: peft merges those.
    other_adapters = any("lora_embedding" in n or "lora_magnitude" in n for n, _ in module.named_parameters())
    return not quantized and not other_adapters and not get_model_conversion_mapping(base, add_legacy=False)


def export_model(module, out_dir: str, is_writer: bool, model_cfg=None, model_path: str | None = None,
                 adapter_only: bool = False) -> None:
    """Save ``module`` (a ``PreTrainedModel`` or peft model, possibly ZeRO-3 partitioned) to ``out_dir``
    (a local directory or URI). Every rank calls it (the gathers are collective).

    A LoRA policy is saved as its adapter (peft format) with ``adapter_only``, else merged: a plain
    Hugging Face model (QLoRA: merged into a fresh full-precision copy of the base, ``model_path`` in
    ``model_cfg.dtype``, whose 4-bit base would lose the update if merged in place).
    """
    from raydpo import storage
    from raydpo.train.devices import release_host_memory

    release_host_memory()  # the last steps' freed buffers: the shards come on top of what stays
    lora = model_cfg is not None and model_cfg.lora.r > 0
    stream = not (lora and adapter_only) and streamable(module, model_cfg)
    state = None if stream else gathered_state_dict(module, is_writer, trainable_only=lora)
    # ``out_dir`` may be a URI: written to a local directory, then uploaded file by file.
    with storage.local_dir_for_writing(out_dir) if is_writer else contextlib.nullcontext() as local:
        if stream:
            writer = ShardWriter(local) if is_writer else None
            for name, tensor in module_tensors(module, is_writer):
                writer.add(name, tensor)
            if is_writer:
                writer.close()
                _save_configs(module.get_base_model() if hasattr(module, "get_base_model") else module, local)
        elif not is_writer:
            return
        elif not lora:
            module.save_pretrained(local, state_dict=state, safe_serialization=True)
        elif adapter_only:
            module.save_pretrained(local, state_dict=state)
        else:
            merged_lora(state, model_cfg, model_path).save_pretrained(local, safe_serialization=True)


def _save_configs(model, directory: str) -> None:
    """config.json and generation_config.json (where the model generates) of a model saved tensor by tensor."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)


def merged_lora(adapter_state: dict, model_cfg, model_path: str):
    """The base from ``model_path`` (unquantized, ``model_cfg.dtype``) with the adapters merged in."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from raydpo.models import load_causal_lm
    from raydpo.train.policy import lora_config

    base = load_causal_lm(model_path, model_cfg.dtype, model_cfg.trust_remote_code)
    peft_model = get_peft_model(base, lora_config(model_cfg.lora))
    # Keys as the trained peft model named them; set_peft_model_state_dict adds the adapter name.
    result = set_peft_model_state_dict(peft_model, get_peft_model_state_dict(peft_model, state_dict=adapter_state))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"adapter weights do not match the base model: {result.unexpected_keys[:3]}")
    return peft_model.merge_and_unload()
