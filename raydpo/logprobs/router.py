"""The MoE load-balancing (router) loss over exactly the tokens the padded two-row batch computes.

transformers' Mixture-of-Experts causal LMs (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, Granite-MoE
and two dozen more, all with the same ``load_balancing_loss_func``) add Switch Transformer's loss:
over every MoE layer's router logits ``[tokens, E]``, with the attention mask as a weight,

    loss = E * sum_e (top-k assignments to e / tokens) * (routing probability of e summed / tokens)

TRL's DPOTrainer passes the concatenated [2B, T] batch and its attention mask, so the prompt counts
twice (once per row) and padding never. raydpo's other layouts compute other token sets: padding-free
rows have filler tokens and no mask (the model's own loss counts the fillers), shared-prompt rows hold
each prompt once, and a sequence-parallel rank sees only its columns. Here the same three sums are
taken with a per-token weight (:func:`raydpo.data.collate.token_weights`: how many times the padded
batch computes each token, 0 on fillers, 2 on a shared prompt, whose router logits are those of both
of its rows), summed over the sequence-parallel group where there is one, then divided: the padded
batch's loss in every layout, and the model's own loss on the padded batch (tests/test_router.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from typing import Callable, Optional

import torch

#: The transformers module whose ``load_balancing_loss_func`` the families share (bytecode compared).
STANDARD = "transformers.models.mixtral.modeling_mixtral"


@functools.lru_cache(maxsize=None)
def standard_router_loss(model_class: type) -> bool:
    """Whether ``model_class`` (a transformers causal LM) adds the standard Switch loss computed
    here: its module's ``load_balancing_loss_func`` is Mixtral's, instruction for instruction (the
    families copy it; one that changes it, or a remote-code class, is not assumed to match)."""
    own = getattr(sys.modules.get(model_class.__module__), "load_balancing_loss_func", None)
    try:
        ref = importlib.import_module(STANDARD).load_balancing_loss_func
    except (ImportError, AttributeError):  # a transformers without it: nothing to match
        return False
    return own is not None and all(getattr(own.__code__, a) == getattr(ref.__code__, a)
                                   for a in ("co_code", "co_consts", "co_names", "co_varnames"))


def router_loss_issue(model_config) -> Optional[str]:
    """Why this model's router loss cannot be computed on other layouts than padded two-row batches
    (its own loss differs from the standard one, or its class is not transformers'), or None."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(model_config)]
    except KeyError:
        return f"model_type {getattr(model_config, 'model_type', '?')!r} is not a transformers causal LM class"
    if not standard_router_loss(model_class):
        return f"{model_class.__name__} computes its own router loss, not transformers' standard one"
    return None


def router_sums(router_logits: tuple[torch.Tensor, ...], weights: torch.Tensor, num_experts: int,
                top_k: int) -> torch.Tensor:
    """The loss's three sums over every layer ([2E + 1] float32): top-k assignments per expert,
    routing probabilities per expert, and tokens, each token counted ``weights`` times.

    router_logits: one [R * W, E] tensor per MoE layer (the forward's rows [R, W] flattened, row-major);
    weights: [R, W] (or [R * W]). The steps are transformers' own, dtype for dtype (softmax and top-k
    in the logits' dtype), so the padded batch gives its loss bit for bit."""
    w = weights.reshape(-1).float()
    counts = torch.zeros(num_experts, dtype=torch.float32, device=w.device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=w.device)
    for layer in router_logits:
        routing = torch.nn.functional.softmax(layer.to(w.device), dim=-1)
        _, chosen = torch.topk(routing, top_k, dim=-1)
        counts = counts + torch.zeros_like(counts).scatter_add_(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (routing.float() * w.unsqueeze(-1)).sum(dim=0)
    tokens = w.sum() * len(router_logits)
    return torch.cat([counts, probs, tokens.reshape(1)])


def switch_loss(sums: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[2E + 1] sums (:func:`router_sums`) -> the load-balancing loss (0-d)."""
    counts, probs, tokens = sums[:num_experts], sums[num_experts:-1], sums[-1]
    return torch.sum((counts / tokens) * (probs / tokens)) * num_experts


def router_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """(module, output index) of every router of ``model``, where transformers itself records
    ``router_logits`` from: each submodel's ``_can_record_outputs["router_logits"]`` (an
    ``OutputRecorder``: a class, the index of the logits in its output, an optional layer name)."""
    found: dict[int, tuple[torch.nn.Module, int]] = {}
    for base in model.modules():
        specs = (getattr(type(base), "_can_record_outputs", None) or {}).get("router_logits")
        for spec in specs if isinstance(specs, list) else [specs] if specs is not None else []:
            target = getattr(spec, "target_class", spec)  # a bare class records output 1, as transformers reads it
            index, layer = getattr(spec, "index", 1), getattr(spec, "layer_name", None)
            for name, module in base.named_modules():
                if isinstance(target, type) and isinstance(module, target) and (
                        layer is None or f".{layer.strip('.')}." in f".{name}."):
                    found.setdefault(id(module), (module, index))
    return list(found.values())


class RouterLoss:
    """The router loss of one forward of ``model`` (a DeepSpeed engine or the model).

    A model with the standard loss runs without ``output_router_logits`` (its own loss would read a
    shared-prompt batch's [R, T, T] mask as [R, T], and count padding-free fillers): forward hooks on
    its routers (:func:`router_modules`) collect the logits, and :meth:`loss` weighs them. Another
    model runs with ``output_router_logits`` and its own ``aux_loss`` is taken as is (the preflight
    allows it on padded batches only: :func:`router_loss_issue`)."""

    def __init__(self, model):
        from raydpo.logprobs.chunked import unwrap

        inner = unwrap(model)
        # A LoRA policy's PeftModel: its class is peft's, its routers and loss the base model's.
        self.inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        self.standard = standard_router_loss(type(self.inner)) and hasattr(self.inner, "num_experts_per_tok")
        self.logits: list[torch.Tensor] = []

    def forward_kwargs(self) -> dict:
        """What the forward is called with besides the batch: the model's own loss off where the hooks
        serve (a config saved with ``output_router_logits: true`` would compute it anyway), on where not."""
        return {"output_router_logits": not self.standard}

    @contextlib.contextmanager
    def recording(self):
        """Collect the routers' logits during the forward inside (hooks gone after: a gradient
        checkpoint's recomputation in backward adds none)."""
        def hook(index):
            return lambda module, args, out: self.logits.append(out[index] if isinstance(out, tuple) else out)

        handles = [m.register_forward_hook(hook(i)) for m, i in router_modules(self.inner)] if self.standard else []
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def loss(self, out, weights: torch.Tensor, reduce: Optional[Callable] = None) -> torch.Tensor:
        """The padded batch's router loss (0-d) from the forward's output ``out``. ``weights``: [R, W]
        per-token counts of the forward's rows (:func:`raydpo.data.collate.token_weights`, cut like
        the rows on a sequence-parallel rank); ``reduce``: sums the [2E + 1] sums over the
        sequence-parallel group."""
        if not self.standard:
            return out.aux_loss
        if not self.logits:
            raise RuntimeError(f"{type(self.inner).__name__}: no router logits were recorded in the forward")
        sums = router_sums(tuple(self.logits), weights, self.inner.num_experts, self.inner.num_experts_per_tok)
        return switch_loss(reduce(sums) if reduce is not None else sums, self.inner.num_experts)
