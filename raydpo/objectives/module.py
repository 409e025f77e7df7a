"""``raydpo.DPO``: preference optimization as a ``torch.nn.Module`` for your own training loop.

    dpo = raydpo.DPO(model, beta=0.1, pad_id=tokenizer.pad_token_id)
    opt = torch.optim.AdamW(dpo.parameters(), lr=1e-5)      # the policy's parameters only
    out = dpo(chosen_ids, rejected_ids, prompt_lengths=prompt_lengths)
    out.loss.backward(); opt.step(); opt.zero_grad()

The pattern of x-transformers' ``DPO`` wrapper, with raydpo's numerics: the batch is built as the
Ray trainer builds it (:mod:`raydpo.objectives.inputs`), scored by the same
:func:`raydpo.logprobs.forward_logps` and :func:`raydpo.objectives.preference_loss`, so any loss of the
registry works and the two paths agree on the same pairs. Unlike x-transformers, log-probs are summed
over the completion's **target** tokens (the first completion token is scored, no pad token is), and
the frozen reference stays out of ``parameters()`` and ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from raydpo.config import LossConfig
from raydpo.config.rules import REFERENCE_FREE, loss_names, router_aux_coef, unpaired, validate_loss
from raydpo.objectives.inputs import Lengths, pair_batch, prompt_lengths_of, token_mask
from raydpo.logprobs import forward_logps, forward_scores, split_pairs
from raydpo.objectives import PairLogps, mean_metrics, preference_loss, with_aux_loss
from raydpo.models import zero_dropout
from raydpo.config.schema import build


@dataclass
class DPOOutput:
    """What :meth:`DPO.forward` returns for B pairs."""

    loss: torch.Tensor
    """Mean loss over the pairs, plus the MoE router loss where it is on (a scalar with a graph to the
    policy): call ``.backward()`` on it."""
    metrics: dict[str, torch.Tensor]
    """TRL's metrics as 0-d detached tensors (``float()`` them to log): ``loss``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``
    (and ``aux_loss`` with the MoE router loss)."""
    losses: torch.Tensor
    """Per-pair losses [B]."""
    chosen_rewards: torch.Tensor
    """Implicit rewards of the chosen completions [B] (``beta * (policy - reference)``, detached)."""
    rejected_rewards: torch.Tensor
    """Implicit rewards of the rejected completions [B]."""
    logps: PairLogps
    """Sequence log-probs of policy and reference and completion token counts, each [B]."""


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Every submodule in eval mode inside the block, each restored to its own mode after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def is_peft_model(model: torch.nn.Module) -> bool:
    """A peft ``PeftModel`` (it can run its base with the adapters switched off)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapter_trained(model: torch.nn.Module) -> bool:
    """Whether a LoRA adapter has left its initialization (peft starts every ``lora_B`` at zero)."""
    return any("lora_B" in name and bool(p.detach().ne(0).any()) for name, p in model.named_parameters())


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and ``requires_grad=False`` everywhere: gradients can never reach ``model``."""
    model.eval()
    model.requires_grad_(False)
    return model


class DPO(torch.nn.Module):
    """A policy and its frozen reference, with any loss of :mod:`raydpo.objectives`.

    Args:
        model: the policy, a causal LM taking ``input_ids``, ``attention_mask`` and ``position_ids``
            and returning ``.logits`` (any transformers model; a peft model for LoRA).
        beta: the loss's beta (``loss.beta`` of the pipeline's config).
        pad_id: the padding token; when given and a mask is not, masks are ``ids != pad_id``.
        loss_type: a loss name of the registry, or a list of them summed with ``loss_weights``
            (``["sigmoid", "sft"]`` is RPO).
        ref_model: the reference. Default: a frozen deep copy of ``model`` taken now, or, for a peft
            model, ``model`` itself with its adapters disabled (no second copy in memory). A given
            ``ref_model`` is frozen in place. Reference-free losses (simpo, orpo, sft) keep none.
        disable_dropout: set the policy's dropout probabilities to 0 (TRL's default; dropout in the
            policy's pass but not the reference's would bias the log-ratios).
        logits_chunk_tokens: positions per output-head chunk of the log-probs
            (:mod:`raydpo.logprobs.chunked`, the pipeline's ``model.logits_chunk_tokens``): None sizes
            chunks automatically, 0 scores from the model's full ``[B, T, V]`` logits.
        **loss_options: the other keys of the pipeline's ``loss`` section (``label_smoothing``,
            ``loss_weights`` as ``weights``, ``simpo_gamma``, ``discopop_tau``, ``f_divergence``,
            ``f_alpha_divergence_coef``, ``ld_alpha`` (the reference's sums weighted alike; precomputed
            ``ref_*_logps`` must be too), ``use_weighting``, ``router_aux_loss_coef``: unset, an MoE
            policy's own config value, as TRL).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        beta: float = 0.1,
        pad_id: Optional[int] = None,
        loss_type: Union[str, Sequence[str]] = "sigmoid",
        ref_model: Optional[torch.nn.Module] = None,
        disable_dropout: bool = True,
        logits_chunk_tokens: Optional[int] = None,
        **loss_options: Any,
    ):
        super().__init__()
        loss_type = loss_type if isinstance(loss_type, str) else list(loss_type)
        self.loss_config: LossConfig = build("", LossConfig, {"type": loss_type, "beta": beta, **loss_options})
        validate_loss(self.loss_config)
        if unpaired(self.loss_config):
            raise ValueError(f"raydpo.DPO trains on pairs; loss {loss_type!r} is unpaired (KTO): run it with raydpo train, "
                             "whose data stage builds the KL sequences it needs")
        self.aux_coef = router_aux_coef(self.loss_config, getattr(model, "config", None))
        self.pad_id = pad_id
        self.logits_chunk_tokens = logits_chunk_tokens
        self.policy = model
        if disable_dropout:
            zero_dropout(model)
        self.adapter_reference = False
        reference = None
        if all(n in REFERENCE_FREE for n in loss_names(self.loss_config)):
            if ref_model is not None:
                raise ValueError(f"loss {loss_type!r} uses no reference model; leave out ref_model")
        elif ref_model is not None:
            if ref_model is model:
                raise ValueError("ref_model is the policy itself; pass a copy (or nothing, for a frozen deep copy)")
            reference = freeze(ref_model)
        elif is_peft_model(model):
            self.adapter_reference = True
            if adapter_trained(model):
                warnings.warn("the peft adapter is already trained, so the reference (the model with its adapters "
                              "disabled) is the base model, not the policy as wrapped; pass "
                              "ref_model=copy.deepcopy(model) to start from the policy", stacklevel=2)
        else:
            reference = freeze(copy.deepcopy(model))
        # Kept out of nn.Module's registry on purpose: parameters(), named_parameters(), state_dict(),
        # train() and optimizers/DDP built from them see the policy alone. _apply below still moves it.
        self.__dict__["_reference"] = reference

    @property
    def ref_model(self) -> Optional[torch.nn.Module]:
        """The separate frozen reference (None when it is the adapter-disabled policy or unused)."""
        return self._reference

    @property
    def uses_reference(self) -> bool:
        return self._reference is not None or self.adapter_reference

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .double(), ... move and cast the hidden reference with the policy.
        super()._apply(fn, recurse)
        if self._reference is not None:
            self._reference._apply(fn, recurse)
        return self

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's sequence log-probs of a ``pair_batch``: [2B], chosen then rejected."""
        ld_alpha = self.loss_config.ld_alpha
        if self._reference is not None:
            return forward_logps(self._reference, batch, self.logits_chunk_tokens, ld_alpha=ld_alpha)
        with self.policy.disable_adapter(), eval_mode(self.policy):
            return forward_logps(self.policy, batch, self.logits_chunk_tokens, ld_alpha=ld_alpha)

    def forward(
        self,
        chosen_ids: torch.Tensor,
        rejected_ids: torch.Tensor,
        *,
        prompt_mask: Optional[torch.Tensor] = None,
        prompt_lengths: Optional[Lengths] = None,
        chosen_mask: Optional[torch.Tensor] = None,
        rejected_mask: Optional[torch.Tensor] = None,
        ref_chosen_logps: Optional[torch.Tensor] = None,
        ref_rejected_logps: Optional[torch.Tensor] = None,
    ) -> DPOOutput:
        """Loss and metrics of B pairs.

        chosen_ids: [B, Tc] prompt + chosen completion; rejected_ids: [B, Tr] prompt + rejected
        completion (Tc and Tr may differ; left, right or no padding). The prompt: ``prompt_lengths``
        [B] (its real tokens at the start of both sequences) or ``prompt_mask`` [B, Tc] (True on the
        prompt tokens of ``chosen_ids``). chosen_mask / rejected_mask: [B, Tc] / [B, Tr], True on
        real tokens (default: ``ids != pad_id``, or all tokens without ``pad_id``).
        ref_chosen_logps / ref_rejected_logps: [B] precomputed reference sums (e.g. from raydpo's
        cache); then the reference is not run.
        """
        c_mask = token_mask(chosen_ids, chosen_mask, self.pad_id)
        r_mask = token_mask(rejected_ids, rejected_mask, self.pad_id)
        batch = pair_batch(chosen_ids, rejected_ids, c_mask, r_mask,
                           prompt_lengths_of(prompt_mask, prompt_lengths, c_mask), self.pad_id)
        p = self.loss_config
        scores = forward_scores(self.policy, batch, self.logits_chunk_tokens, None, p.ld_alpha, p.use_weighting,
                                self.aux_coef != 0)
        ref = None
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
            ref = (ref_chosen_logps.float(), ref_rejected_logps.float())
        elif self.uses_reference:
            ref = split_pairs(self.reference_logps(batch))
        pair, (losses, chosen_r, rejected_r), sums = preference_loss(scores.logps, batch["completion_tokens"], ref, p,
                                                                     plain_logps=scores.plain, aligned=scores.aligned)
        loss, sums = with_aux_loss(losses.mean(), sums, scores.aux_loss, self.aux_coef)
        return DPOOutput(loss=loss, metrics=mean_metrics(sums), losses=losses,
                         chosen_rewards=chosen_r, rejected_rewards=rejected_r, logps=pair)
