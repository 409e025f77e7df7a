"""What a model family's transformers code needs from raydpo, in one place.

Every family in :data:`raydpo.fixtures.families.FAMILIES` is checked end to end by the suite
(``tests/test_families.py``). Three things differ between families and matter to raydpo:

- **Sliding windows** (Mistral, Mixtral, Phi-3 with ``sliding_window`` on every layer; Gemma 2/3 and
  Qwen2 with ``layer_types`` mixing sliding and full layers). The shared-prompt layout
  (:mod:`raydpo.data.shared`, the reference's and the policy's) hands the model its own mask, which
  transformers uses as given on every layer: the window has to be in it. :func:`mask_windows` says
  which, per layer type where the model takes one mask each (``layer_types``).
  Padded batches and padding-free rows leave the mask to transformers, which windows them itself.
- **Positions computed from the attention mask** (OPT, BLOOM, Falcon, MPT, BioGPT, XGLM): their
  decoders build the causal mask without the position ids, so transformers cannot see where packed
  sequences restart; padding-free rows would attend across sequences. :func:`padding_free_issue`
  refuses ``train.padding_free`` for them before any stage. (Their shared-prompt rows are exact:
  raydpo passes both the positions and the mask.)
- **The final transform of the logits** (Gemma 2/3's soft-capping, Cohere's ``logit_scale``, Granite's
  ``logits_scaling``): applied inside the model's ``forward`` after ``lm_head``. The chunked log-probs
  (:mod:`raydpo.logprobs.chunked`) call the head themselves and apply :func:`logit_transform`; the
  model's own last-position logits check it on the first forward of each head.

MoE routers (Mixtral, Qwen2-MoE) route each token on its own without capacity limits, so packing and
padding change nothing; the router's auxiliary loss is not added (TRL adds it only when
``output_router_logits`` is set).
"""

from __future__ import annotations

#: Decoder-only model types whose transformers 5.19 code builds the causal mask without position ids.
MASK_WITHOUT_POSITIONS = frozenset({"opt", "bloom", "falcon", "mpt", "biogpt", "xglm"})
#: Layer types a packed reference mask can be built for.
PACKABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def logit_transform(config):
    """The element-wise function a model applies to ``lm_head``'s output (float32 logits [..., V] ->
    [..., V]), from its config: Gemma 2/3 soft-capping ``tanh(x / c) * c``, Cohere's ``x * logit_scale``,
    Granite's ``x / logits_scaling``; identity otherwise."""
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None) if str(getattr(text, "model_type", "")).startswith("cohere") else None
    divide = getattr(text, "logits_scaling", None)

    def transform(logits):
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def padding_free_issue(model_type: str | None) -> str | None:
    """Why ``train.padding_free`` cannot give the padded numbers for ``model_type``, or None."""
    if model_type in MASK_WITHOUT_POSITIONS:
        return (f"train.padding_free is not exact for model_type {model_type!r}: its transformers decoder builds the "
                "causal mask without the position ids, so sequences packed into one row would attend to each other "
                "(learned positions from the attention mask). Use padded batches (train.padding_free=false), with "
                "train.group_by_length=true to cut most of the padding")
    return None


def packed_mask_issue(config) -> str | None:
    """Why a shared-prompt row (:mod:`raydpo.data.shared`) cannot be masked exactly for this model config, or None."""
    kinds = set(getattr(config, "layer_types", None) or ())
    unknown = kinds - PACKABLE_LAYER_TYPES
    if unknown:
        return f"layer types {sorted(unknown)} have masks raydpo does not build"
    return None


def mask_windows(config):
    """The sliding window a custom mask must carry: ``{layer_type: window or None}`` for models with
    ``config.layer_types`` (Gemma 2/3, Qwen2: only ``sliding_attention`` layers slide), else the one
    window of every layer (Mistral, Mixtral, Phi-3, Starcoder2 slide wherever the config sets one) or
    None. transformers' sliding mask keeps keys with ``q - k < window`` on the position ids."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {kind: (window if kind == "sliding_attention" else None) for kind in set(layer_types)}
    return window
