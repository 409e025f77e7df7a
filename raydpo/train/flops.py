"""Model FLOPs of a training step and the device's peak, for model FLOPs utilization (MFU).

Model FLOPs are the work the model's maths needs, whatever the implementation recomputes (PaLM's
definition, arXiv:2204.02311 appendix B): a forward and a backward are 6 FLOPs per parameter per
token, and attention adds 12 x layers x attention width per attended (query, key) pair. Counted on
what the step actually computes, from the collated batch:

- tokens are the rows' real tokens, so a shared prompt (:mod:`raydpo.data.shared`) counts once: the
  saving shows as fewer FLOPs per pair and a shorter step, never as inflated utilization;
- attended pairs are counted exactly from the layout (causal: n(n+1)/2 per sequence; a shared unit's
  completions attend the prompt and their own earlier tokens only), not as full T x T;
- the output head counts only the positions that go through it (the scored ones with chunked
  logits, every token with full logits); input embeddings are a lookup, no FLOPs;
- KTO's KL sequences, scored without gradient, count a forward only (2 FLOPs per parameter per token).

Peak FLOP/s per device come from :data:`PEAK_TFLOPS` (dense bf16/fp16 tensor-core figures of the
vendors' data sheets) by the CUDA device name, or ``train.peak_tflops_per_device``; on a CPU without
that setting MFU is omitted, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: Dense (no sparsity) bf16 tensor-core peak TFLOP/s by a substring of ``torch.cuda.get_device_name``,
#: most specific first.
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("B200", 2250.0), ("GH200", 989.0), ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("V100", 125.0),
    ("T4", 65.0), ("MI300X", 1307.0), ("MI250X", 383.0),
)


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device: the override, else the table's entry for this GPU; None for a CPU
    or an unknown GPU (MFU is then omitted)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs of a forward depend on, read from the policy once."""

    body_params: int
    """Parameters outside the input embeddings and the output head (LoRA adapters included)."""
    head_params: int
    """The output head's weight elements (hidden x vocab), tied or not."""
    layers: int
    """Decoder layers."""
    attention_width: int
    """Query heads x head dimension: the width of QK^T and of the attention-weighted values."""


def numel(p: torch.nn.Parameter) -> int:
    """Elements of a parameter, its full size under ZeRO-3 partitioning (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The policy's :class:`ModelShape` (a transformers model, peft-wrapped or not)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    edge = {id(p) for m in (embed, head) if m is not None for p in m.parameters()}
    body = sum(numel(p) for p in model.parameters() if id(p) not in edge)
    heads = getattr(text, "num_attention_heads", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0)
    return ModelShape(body, numel(head.weight) if head is not None else 0, getattr(text, "num_hidden_layers", 0) or 0,
                      heads * head_dim)


def attended_pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(query, key) pairs attention computes in this collated batch (0-d float64), by its layout."""
    tri = lambda n: n * (n + 1) / 2  # noqa: E731
    if "segments" in batch:
        from raydpo.data.shared import CHOSEN, PROMPT, REJECTED

        seg, units, b = batch["segments"], batch["units"], batch["completion_tokens"].shape[0] // 2
        count = lambda kind: torch.zeros(b + 1, dtype=torch.float64, device=seg.device).index_add_(  # noqa: E731
            0, units.flatten(), (seg == kind).flatten().double())[:b]
        p, c, r = count(PROMPT), count(CHOSEN), count(REJECTED)
        return (tri(p) + c * p + tri(c) + r * p + tri(r)).sum()
    if "sequence_ids" in batch:
        n = batch["completion_tokens"].shape[0]
        lengths = torch.bincount(batch["sequence_ids"].flatten(), minlength=n + 1)[:n].double()
        return tri(lengths).sum()
    return tri(batch["attention_mask"].sum(1).double()).sum()


def pass_flops(shape: ModelShape, batch: dict[str, torch.Tensor], chunked: bool, backward: bool) -> torch.Tensor:
    """Model FLOPs of one forward (and, with ``backward``, its backward: 3x) of a collated batch
    without nested batches (0-d float64). ``chunked``: only the scored positions go through the head."""
    from raydpo.data.collate import computed_tokens

    tokens = computed_tokens(batch).double()
    head = batch["completion_tokens"].sum().double() if chunked else tokens
    forward = 2.0 * shape.body_params * tokens + 2.0 * shape.head_params * head \
        + 4.0 * shape.layers * shape.attention_width * attended_pairs(batch)
    return forward * (3.0 if backward else 1.0)


def step_flops(shape: ModelShape, batch: dict[str, torch.Tensor], chunked: bool) -> torch.Tensor:
    """Model FLOPs of one training micro-batch (0-d float64): a forward and backward of the batch, and
    a forward alone of an unpaired batch's KL sequences scored apart without gradient."""
    main = pass_flops(shape, {k: v for k, v in batch.items() if k != "kl"}, chunked, backward=True)
    return main + (pass_flops(shape, batch["kl"], chunked, backward=False) if "kl" in batch else 0.0)
