"""The quantities every objective is built from: sequence log-probs of a batch and the shared math
on them (log ratios against the reference, per-token means, f-divergence scores, smoothing).

All tensors are ``[B]`` float32 (one value per pair or per unpaired example)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from raydpo.config import LossConfig
from raydpo.logprobs import split_pairs

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(losses, chosen_rewards, rejected_rewards)``, each [B] (torchtune's shape)."""


@dataclass
class PairLogps:
    """Sequence log-probs of B pairs (all tensors ``[B]``, float32)."""

    policy_chosen: torch.Tensor
    """Sum of the policy's log-probs over each chosen completion's tokens."""
    policy_rejected: torch.Tensor
    """The same for the rejected completions."""
    chosen_tokens: torch.Tensor
    """Completion tokens scored in each chosen sequence (for length-normalized losses)."""
    rejected_tokens: torch.Tensor
    """Completion tokens scored in each rejected sequence."""
    ref_chosen: Optional[torch.Tensor] = None
    """The reference's sums for the chosen completions (None for reference-free losses)."""
    ref_rejected: Optional[torch.Tensor] = None
    """The reference's sums for the rejected completions."""
    chosen_plain: Optional[torch.Tensor] = None
    """The chosen completions' unweighted sums where ``policy_chosen`` is LD-DPO-weighted (``loss.ld_alpha``):
    TRL's ``sft`` term reads the plain per-token log-probs. None: ``policy_chosen``."""
    weights: Optional[torch.Tensor] = None
    """WPO's per-pair loss weight (``loss.use_weighting``, :func:`wpo_weights`), without gradient; None: 1."""


def ratios(x: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return x.policy_chosen - x.ref_chosen, x.policy_rejected - x.ref_rejected


def ref_rewards(x: PairLogps, p: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = ratios(x)
    return p.beta * c.detach(), p.beta * r.detach()


def mean_logps(x: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token log-prob of each completion ([B] each)."""
    return x.policy_chosen / x.chosen_tokens.clamp(min=1), x.policy_rejected / x.rejected_tokens.clamp(min=1)


def f_scores(log_ratio: torch.Tensor, p: LossConfig) -> torch.Tensor:
    """f'(policy / reference) of f-DPO (Wang et al. 2023, arXiv:2309.16240), on log ratios [B].

    reverse_kl is plain DPO (the log ratio itself)."""
    if p.f_divergence == "reverse_kl" or (p.f_divergence == "alpha_divergence" and abs(p.f_alpha_divergence_coef - 1) < 1e-6):
        return log_ratio
    if p.f_divergence == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if p.f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    a = p.f_alpha_divergence_coef
    # TRL's clamp keeps exp finite once cast back to the input dtype (float16 overflows past e^11).
    t = torch.clamp((a - 1) * log_ratio.float(), max=11.0 if log_ratio.dtype == torch.float16 else 80.0)
    return (torch.exp(t) - 1).to(log_ratio.dtype) / (a - 1)


def scores(x: PairLogps, p: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = ratios(x)
    return f_scores(c, p), f_scores(r, p)


def smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO's label-smoothed logistic loss on logits z [B]."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def chosen_nll(x: PairLogps) -> torch.Tensor:
    """Mean negative log-likelihood per chosen token over the batch (scalar): TRL's ``sft`` term and
    CPO/ORPO's NLL. A token mean of the micro-batch, as in TRL, not a mean of per-pair means."""
    plain = x.policy_chosen if x.chosen_plain is None else x.chosen_plain
    return -plain.sum() / x.chosen_tokens.sum().clamp(min=1)


def wpo_weights(aligned: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """WPO's pair weights (Zhou et al. 2024, arXiv:2406.11827, eq. 2; TRL's ``use_weighting``).

    aligned: [2B] sums over each sequence's completion tokens of ``log p - log sum_v p_v^2`` (the
    policy's, no gradient), tokens: [2B] scored tokens, chosen then rejected -> [B]: the product of
    the chosen and the rejected sequence's ``exp(aligned / tokens)``."""
    chosen, rejected = split_pairs(torch.exp(aligned.detach() / tokens.clamp(min=1)))
    return chosen * rejected


def free_rewards(x: PairLogps, p: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = mean_logps(x)
    return p.beta * c.detach(), p.beta * r.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
