"""Preference losses as pure functions, with TRL's names and formulas.

Every loss takes one :class:`PairLogps` (per-pair sequence log-probs of the policy, and of the
reference where the loss uses one, plus completion token counts) and the :class:`LossConfig`, and
returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]`` (torchtune's shape), so the
training loop, the in-process wrapper and the tests share one implementation.

The formulas are those of TRL 1.16's ``DPOTrainer._compute_loss`` (reference-based losses and
``sft``) and of ``trl.experimental`` CPO (``simpo``) and ORPO (``orpo``); tests compare them with
TRL's own code. Rewards are TRL's: ``beta * (policy - reference)`` for reference-based losses,
``beta * mean token log-prob`` for the reference-free ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from raydpo.config import LossConfig
from raydpo.logprobs import split_pairs

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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


def _ratios(x: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return x.policy_chosen - x.ref_chosen, x.policy_rejected - x.ref_rejected


def _ref_rewards(x: PairLogps, p: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = _ratios(x)
    return p.beta * c.detach(), p.beta * r.detach()


def _avg(x: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
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


def _scores(x: PairLogps, p: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = _ratios(x)
    return f_scores(c, p), f_scores(r, p)


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO's label-smoothed logistic loss on logits z [B]."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def sigmoid(x: PairLogps, p: LossConfig) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): ``-logsigmoid(beta * (sc - sr))`` with s the
    (f-)scores of the log ratios; with ``label_smoothing`` it is cDPO. TRL's ``sigmoid`` applies no
    smoothing (cDPO is ``robust``'s sibling there); raydpo keeps DESIGN.md's cDPO reading, equal to
    TRL's at the default 0."""
    c, r = _scores(x, p)
    return (_smoothed(p.beta * (c - r), p.label_smoothing), *_ref_rewards(x, p))


def hinge(x: PairLogps, p: LossConfig) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): ``relu(1 - beta * (sc - sr))``."""
    c, r = _scores(x, p)
    return (torch.relu(1 - p.beta * (c - r)), *_ref_rewards(x, p))


def ipo(x: PairLogps, p: LossConfig) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) on per-token mean scores:
    ``(sc / nc - sr / nr - 1 / (2 beta))**2``."""
    c, r = _scores(x, p)
    delta = c / x.chosen_tokens.clamp(min=1) - r / x.rejected_tokens.clamp(min=1)
    return ((delta - 1 / (2 * p.beta)) ** 2, *_ref_rewards(x, p))


def exo_pair(x: PairLogps, p: LossConfig) -> LossOutput:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16): KL(softmax(beta * s) || [1-eps, eps])
    over the pair; needs ``label_smoothing`` > 0."""
    c, r = _scores(x, p)
    z, eps = p.beta * (c - r), p.label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return (losses, *_ref_rewards(x, p))


def nca_pair(x: PairLogps, p: LossConfig) -> LossOutput:
    """NCA (Chen et al. 2024, arXiv:2402.05369): ``-logsig(wc) - logsig(-wc)/2 - logsig(-wr)/2``,
    w = beta * log ratio."""
    c, r = _ratios(x)
    wc, wr = p.beta * c, p.beta * r
    return (-F.logsigmoid(wc) - 0.5 * F.logsigmoid(-wc) - 0.5 * F.logsigmoid(-wr), *_ref_rewards(x, p))


def robust(x: PairLogps, p: LossConfig) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label flips with rate eps:
    ``(-(1-eps) logsig(z) + eps logsig(-z)) / (1 - 2 eps)``, z = beta * (sc - sr)."""
    c, r = _scores(x, p)
    z, eps = p.beta * (c - r), p.label_smoothing
    return ((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), *_ref_rewards(x, p))


def bco_pair(x: PairLogps, p: LossConfig) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656): ``-logsig(wc) - logsig(-wr)``."""
    c, r = _ratios(x)
    return (-F.logsigmoid(p.beta * c) - F.logsigmoid(-p.beta * r), *_ref_rewards(x, p))


def sppo_hard(x: PairLogps, p: LossConfig) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675):
    ``(lc - 1/(2 beta))**2 + (lr + 1/(2 beta))**2`` on the log ratios."""
    c, r = _ratios(x)
    return ((c - 0.5 / p.beta) ** 2 + (r + 0.5 / p.beta) ** 2, *_ref_rewards(x, p))


def aot(x: PairLogps, p: LossConfig) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): the batch's sorted policy margins against
    the sorted reference margins, through the smoothed logistic loss. Couples the pairs of a batch."""
    policy = torch.sort(x.policy_chosen - x.policy_rejected, dim=0).values
    ref = torch.sort(x.ref_chosen - x.ref_rejected, dim=0).values
    return (_smoothed(p.beta * (policy - ref), p.label_smoothing), *_ref_rewards(x, p))


def aot_unpaired(x: PairLogps, p: LossConfig) -> LossOutput:
    """AOT, unpaired: sorted chosen log ratios against sorted rejected log ratios."""
    c, r = _ratios(x)
    delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
    return (_smoothed(p.beta * delta, p.label_smoothing), *_ref_rewards(x, p))


def apo_zero(x: PairLogps, p: LossConfig) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): raise chosen, lower rejected:
    ``1 - sig(wc) + sig(wr)``."""
    c, r = _ratios(x)
    return (1 - torch.sigmoid(p.beta * c) + torch.sigmoid(p.beta * r), *_ref_rewards(x, p))


def apo_down(x: PairLogps, p: LossConfig) -> LossOutput:
    """APO-down (eq. 8): lower both, rejected more: ``sig(wc) + 1 - sig(beta * (lc - lr))``."""
    c, r = _ratios(x)
    return (torch.sigmoid(p.beta * c) + 1 - torch.sigmoid(p.beta * (c - r)), *_ref_rewards(x, p))


def discopop(x: PairLogps, p: LossConfig) -> LossOutput:
    """DiscoPOP (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5): logistic and exponential losses
    blended by ``sigmoid(z / tau)``, z = beta * (sc - sr)."""
    c, r = _scores(x, p)
    z = p.beta * (c - r)
    mix = torch.sigmoid(z / p.discopop_tau)
    return (-F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix, *_ref_rewards(x, p))


def sigmoid_norm(x: PairLogps, p: LossConfig) -> LossOutput:
    """DPO on per-token mean scores: ``-logsig(beta * (sc / nc - sr / nr))``."""
    c, r = _scores(x, p)
    delta = c / x.chosen_tokens.clamp(min=1) - r / x.rejected_tokens.clamp(min=1)
    return (-F.logsigmoid(p.beta * delta), *_ref_rewards(x, p))


def chosen_nll(x: PairLogps) -> torch.Tensor:
    """Mean negative log-likelihood per chosen token over the batch (scalar): TRL's ``sft`` term and
    CPO/ORPO's NLL. A token mean of the micro-batch, as in TRL, not a mean of per-pair means."""
    return -x.policy_chosen.sum() / x.chosen_tokens.sum().clamp(min=1)


def _free_rewards(x: PairLogps, p: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = _avg(x)
    return p.beta * c.detach(), p.beta * r.detach()


def sft(x: PairLogps, p: LossConfig) -> LossOutput:
    """NLL of the chosen completions (``sigmoid`` + ``sft`` is RPO, Pang et al. 2024, arXiv:2404.19733),
    the batch's token mean repeated per pair so that the mean over pairs is that mean."""
    loss = chosen_nll(x).expand(x.policy_chosen.shape[0])
    rewards = _ref_rewards(x, p) if x.ref_chosen is not None else _free_rewards(x, p)
    return (loss, *rewards)


def simpo(x: PairLogps, p: LossConfig) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free: the smoothed logistic loss of
    ``beta * (mean_c - mean_r) - gamma`` on per-token mean log-probs (TRL's CPO ``simpo``, cpo_alpha 0)."""
    c, r = _avg(x)
    z = p.beta * ((c - r) - p.simpo_gamma / p.beta)
    return (_smoothed(z, p.label_smoothing), *_free_rewards(x, p))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(x: PairLogps, p: LossConfig) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), reference-free: chosen NLL minus
    ``beta * logsigmoid(log odds(chosen) - log odds(rejected))`` on per-token mean log-probs
    (TRL's ``policy_nll_loss - beta * ratio``, beta being the paper's lambda)."""
    c, r = _avg(x)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return (chosen_nll(x) - p.beta * F.logsigmoid(log_odds), *_free_rewards(x, p))


LOSSES: dict[str, Callable[[PairLogps, LossConfig], LossOutput]] = {
    f.__name__: f
    for f in (sigmoid, robust, hinge, ipo, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired,
              apo_zero, apo_down, discopop, sigmoid_norm, sft, simpo, orpo)
}

def compute_loss(names: Sequence[str], weights: Sequence[float], x: PairLogps, p: LossConfig) -> LossOutput:
    """Weighted sum of the named losses (TRL's ``loss_type`` list with ``loss_weights``); rewards are
    those of the first loss. Returns per-pair losses [B] and rewards [B], [B]."""
    for n in names:
        if n not in LOSSES:
            raise ValueError(f"unknown loss {n!r}; available: {', '.join(LOSSES)}")
    total, rewards = None, None
    for name, w in zip(names, weights, strict=True):
        losses, c, r = LOSSES[name](x, p)
        total = w * losses if total is None else total + w * losses
        rewards = rewards or (c, r)
    return (total, *rewards)


def preference_loss(
    policy_logps: torch.Tensor,
    completion_tokens: torch.Tensor,
    ref_logps: Optional[tuple[torch.Tensor, torch.Tensor]],
    p: LossConfig,
) -> tuple[PairLogps, LossOutput, dict[str, torch.Tensor]]:
    """The loss section ``p`` over one batch, as the Ray trainer and :class:`raydpo.DPO` both compute it.

    policy_logps, completion_tokens: [2B], chosen sequences then rejected ones (as
    :func:`raydpo.logprobs.forward_logps` returns them); ref_logps: ([B] chosen, [B] rejected) or
    None for reference-free losses. Returns the pairs' log-probs, ``(losses, chosen_rewards,
    rejected_rewards)`` (each [B]) and the metric sums of :func:`pair_metrics`.
    """
    from raydpo.config_rules import loss_names, loss_weights

    chosen, rejected = split_pairs(policy_logps)
    ref_chosen, ref_rejected = ref_logps if ref_logps is not None else (None, None)
    x = PairLogps(chosen, rejected, *split_pairs(completion_tokens), ref_chosen, ref_rejected)
    out = compute_loss(loss_names(p), loss_weights(p), x, p)
    return x, out, pair_metrics(*out, chosen, rejected)


def pair_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-batch **sums** of TRL's metrics (sums, so shards and micro-batches add up exactly).

    Divide by the pair count (``metrics["count"]``) for the means that TRL logs.
    """
    s = lambda t: t.detach().float().sum()  # noqa: E731
    return {
        "count": torch.tensor(float(losses.shape[0]), device=losses.device),
        "loss": s(losses),
        "rewards/chosen": s(chosen_rewards),
        "rewards/rejected": s(rejected_rewards),
        "rewards/accuracies": s(chosen_rewards > rejected_rewards),
        "rewards/margins": s(chosen_rewards - rejected_rewards),
        "logps/chosen": s(policy_chosen),
        "logps/rejected": s(policy_rejected),
    }


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Turn summed metrics (with ``count``) into means."""
    n = max(sums.get("count", 0.0), 1.0)
    return {k: v / n for k, v in sums.items() if k != "count"}
