"""Export the trained policy as a Hugging Face directory, gathering ZeRO-3 shards when needed."""

from __future__ import annotations

import os


def gathered_state_dict(module, is_writer: bool) -> dict:
    """Full tensors of every parameter and persistent buffer, on CPU, on the writer rank only.

    Parameters are gathered one at a time (ZeRO-3), so peak extra memory is one parameter, not
    the model. Every rank must call this (the gathers are collective). Tied parameters share one
    tensor under each of their names.
    """
    import deepspeed
    import torch

    by_id: dict[int, torch.Tensor] = {}
    for _, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_writer:
                by_id[id(param)] = param.data.detach().to("cpu", copy=True)
    if not is_writer:
        return {}
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        state[name] = by_id[id(value)] if isinstance(value, torch.nn.Parameter) else value.detach().cpu()
    return state


def export_model(module, out_dir: str, is_writer: bool) -> None:
    """Save ``module`` (a ``PreTrainedModel``, possibly ZeRO-3 partitioned) to ``out_dir``."""
    state = gathered_state_dict(module, is_writer)
    if is_writer:
        os.makedirs(out_dir, exist_ok=True)
        module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
