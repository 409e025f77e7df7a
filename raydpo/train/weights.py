"""The policy's weights as the generators load them: a plain Hugging Face state dict.

Gathered from the DeepSpeed engine one parameter at a time (ZeRO-3 partitions included, through
:func:`raydpo.train.export.gathered_state_dict`), LoRA adapters merged into their base weights, then
put into Ray's object store by rank 0: every generator actor reads the same object, no file is
written and nothing is re-loaded from disk.
"""

from __future__ import annotations

from raydpo.train.export import PEFT_PREFIX, lora_merged


def merge_lora_state(state: dict, scaling: float, fan_in_fan_out: set[str] = frozenset()) -> dict:
    """A peft model's full state dict (``...base_layer.weight``, ``...lora_A.default.weight``,
    ``...lora_B.default.weight``) -> the base model's state dict with ``W + scaling * B @ A`` per
    adapted layer (transposed for ``fan_in_fan_out`` layers such as GPT-2's Conv1D), as peft's
    ``merge_and_unload`` computes it. ``fan_in_fan_out``: module names (without the prefix)."""
    out = {}
    for name, value in state.items():
        if ".lora_A." in name or ".lora_B." in name or ".lora_dropout" in name:
            continue
        plain = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        if ".base_layer." in plain:
            module, _, leaf = plain.partition(".base_layer.")
            plain = f"{module}.{leaf}"
            if leaf == "weight":
                stem = name.replace(".base_layer.weight", "")
                a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
                value = lora_merged(value, a, b, scaling, module in fan_in_fan_out)
        out[plain] = value
    return out


def lora_layout(module) -> tuple[float, set[str]]:
    """(scaling, fan_in_fan_out module names) of a peft model with the ``default`` adapter."""
    scalings, fifo = set(), set()
    for name, sub in module.named_modules():
        if hasattr(sub, "scaling") and isinstance(sub.scaling, dict) and "default" in sub.scaling:
            scalings.add(float(sub.scaling["default"]))
            if getattr(sub, "fan_in_fan_out", False):
                fifo.add(name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name)
    if len(scalings) != 1:
        raise RuntimeError(f"expected one LoRA scaling for all adapted layers, found {sorted(scalings)}")
    return scalings.pop(), fifo


def policy_state(module, is_writer: bool, lora: bool) -> dict:
    """Full weights of the trained policy (a collective: every rank calls it); {} off the writer."""
    from raydpo.train.export import gathered_state_dict

    state = gathered_state_dict(module, is_writer)
    if not is_writer or not lora:
        return state
    scaling, fifo = lora_layout(module)
    return merge_lora_state(state, scaling, fifo)


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute element difference between two state dicts with the same keys."""
    if set(a) != set(b):
        raise ValueError(f"different keys: {sorted(set(a) ^ set(b))[:5]}")
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())

