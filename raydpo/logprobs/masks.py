"""The attention mask a model is given for a shared-prompt batch (:mod:`raydpo.data.shared`).

transformers uses a 4D mask or a flex-attention ``BlockMask`` as given, on every layer (its
masking utilities return early on either), so the mask must carry what the model would otherwise add
itself: the sliding window on the layers that slide (:func:`raydpo.families.rules.mask_windows`).

- sdpa and eager: a dense additive ``[R, 1, W, W]`` float mask per batch (eager takes only a float one);
- ``flex_attention``: a ``BlockMask`` built from the same rule (:func:`raydpo.data.shared.allowed`),
  which never materialises ``[W, W]`` and lets the kernel skip the blocks nobody attends (the
  rejected tokens' view of the chosen ones, the padding): what a GPU run uses;
- flash-attention takes no custom mask: the layout is off there (:func:`raydpo.config.rules.share_prompt_issue`).
"""

from __future__ import annotations

from typing import Optional

import torch

from raydpo.data.shared import allowed, dense_mask
from raydpo.families.rules import mask_windows


def block_mask(batch: dict[str, torch.Tensor], window: Optional[int] = None):
    """The rule as flex attention's ``BlockMask`` over [R, W] (heads broadcast), with a sliding
    ``window`` on the position ids where given."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg, unit, pos = batch["segments"], batch["units"], batch["position_ids"]

    def mask_mod(b, h, q, k):
        ok = allowed(seg[b, q], seg[b, k], unit[b, q], unit[b, k], q, k)
        return ok & ((pos[b, q] - pos[b, k]) < window) if window else ok

    rows, width = seg.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=seg.device)


def float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's compute dtype (its first floating parameter's; float32 for anything else)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def shared_attention_mask(model: torch.nn.Module, config, batch: dict[str, torch.Tensor]):
    """What to pass as ``attention_mask`` for a shared batch: one mask, or ``{layer_type: mask}`` for
    models with ``config.layer_types``; a ``BlockMask`` under flex attention, else additive float."""
    flex = getattr(config, "_attn_implementation", None) == "flex_attention"
    dtype = None if flex else float_dtype(model)
    built: dict = {}

    def build(window):
        if window not in built:  # layer types with the same window share one mask
            if flex:
                built[window] = block_mask(batch, window)
            else:
                ok = dense_mask(batch, window)
                built[window] = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, torch.finfo(dtype).min)
        return built[window]

    windows = mask_windows(config)
    return {kind: build(w) for kind, w in windows.items()} if isinstance(windows, dict) else build(windows)
