"""Pairwise preference losses (chosen vs rejected completion of one prompt), with TRL's names and formulas.

Each takes one :class:`~raydpo.objectives.logps.PairLogps` and the ``loss`` section and returns
``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``. The formulas are those of TRL 1.16's
``DPOTrainer._compute_loss`` (reference-based losses and ``sft``) and of ``trl.experimental`` CPO
(``simpo``) and ORPO (``orpo``); tests compare them with TRL's own code. Rewards are TRL's:
``beta * (policy - reference)`` for reference-based losses, ``beta * mean token log-prob`` for the
reference-free ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raydpo.config import LossConfig
from raydpo.objectives.logps import (
    LossOutput, PairLogps, chosen_nll, free_rewards, log1mexp, mean_logps, ratios, ref_rewards, scores, smoothed,
)


def sigmoid(x: PairLogps, p: LossConfig) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): ``-logsigmoid(beta * (sc - sr))`` with s the
    (f-)scores of the log ratios; with ``label_smoothing`` it is cDPO. TRL's ``sigmoid`` applies no
    smoothing (cDPO is ``robust``'s sibling there); raydpo keeps DESIGN.md's cDPO reading, equal to
    TRL's at the default 0."""
    c, r = scores(x, p)
    return (smoothed(p.beta * (c - r), p.label_smoothing), *ref_rewards(x, p))


def hinge(x: PairLogps, p: LossConfig) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): ``relu(1 - beta * (sc - sr))``."""
    c, r = scores(x, p)
    return (torch.relu(1 - p.beta * (c - r)), *ref_rewards(x, p))


def ipo(x: PairLogps, p: LossConfig) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17) on per-token mean scores:
    ``(sc / nc - sr / nr - 1 / (2 beta))**2``."""
    c, r = scores(x, p)
    delta = c / x.chosen_tokens.clamp(min=1) - r / x.rejected_tokens.clamp(min=1)
    return ((delta - 1 / (2 * p.beta)) ** 2, *ref_rewards(x, p))


def exo_pair(x: PairLogps, p: LossConfig) -> LossOutput:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16): KL(softmax(beta * s) || [1-eps, eps])
    over the pair; needs ``label_smoothing`` > 0."""
    c, r = scores(x, p)
    z, eps = p.beta * (c - r), p.label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    return (losses, *ref_rewards(x, p))


def nca_pair(x: PairLogps, p: LossConfig) -> LossOutput:
    """NCA (Chen et al. 2024, arXiv:2402.05369): ``-logsig(wc) - logsig(-wc)/2 - logsig(-wr)/2``,
    w = beta * log ratio."""
    c, r = ratios(x)
    wc, wr = p.beta * c, p.beta * r
    return (-F.logsigmoid(wc) - 0.5 * F.logsigmoid(-wc) - 0.5 * F.logsigmoid(-wr), *ref_rewards(x, p))


def robust(x: PairLogps, p: LossConfig) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label flips with rate eps:
    ``(-(1-eps) logsig(z) + eps logsig(-z)) / (1 - 2 eps)``, z = beta * (sc - sr)."""
    c, r = scores(x, p)
    z, eps = p.beta * (c - r), p.label_smoothing
    return ((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), *ref_rewards(x, p))


def bco_pair(x: PairLogps, p: LossConfig) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656): ``-logsig(wc) - logsig(-wr)``."""
    c, r = ratios(x)
    return (-F.logsigmoid(p.beta * c) - F.logsigmoid(-p.beta * r), *ref_rewards(x, p))


def sppo_hard(x: PairLogps, p: LossConfig) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675):
    ``(lc - 1/(2 beta))**2 + (lr + 1/(2 beta))**2`` on the log ratios."""
    c, r = ratios(x)
    return ((c - 0.5 / p.beta) ** 2 + (r + 0.5 / p.beta) ** 2, *ref_rewards(x, p))


def aot(x: PairLogps, p: LossConfig) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): the batch's sorted policy margins against
    the sorted reference margins, through the smoothed logistic loss. Couples the pairs of a batch."""
    policy = torch.sort(x.policy_chosen - x.policy_rejected, dim=0).values
    ref = torch.sort(x.ref_chosen - x.ref_rejected, dim=0).values
    return (smoothed(p.beta * (policy - ref), p.label_smoothing), *ref_rewards(x, p))


def aot_unpaired(x: PairLogps, p: LossConfig) -> LossOutput:
    """AOT, unpaired: sorted chosen log ratios against sorted rejected log ratios."""
    c, r = ratios(x)
    delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
    return (smoothed(p.beta * delta, p.label_smoothing), *ref_rewards(x, p))


def apo_zero(x: PairLogps, p: LossConfig) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): raise chosen, lower rejected:
    ``1 - sig(wc) + sig(wr)``."""
    c, r = ratios(x)
    return (1 - torch.sigmoid(p.beta * c) + torch.sigmoid(p.beta * r), *ref_rewards(x, p))


def apo_down(x: PairLogps, p: LossConfig) -> LossOutput:
    """APO-down (eq. 8): lower both, rejected more: ``sig(wc) + 1 - sig(beta * (lc - lr))``."""
    c, r = ratios(x)
    return (torch.sigmoid(p.beta * c) + 1 - torch.sigmoid(p.beta * (c - r)), *ref_rewards(x, p))


def discopop(x: PairLogps, p: LossConfig) -> LossOutput:
    """DiscoPOP (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5): logistic and exponential losses
    blended by ``sigmoid(z / tau)``, z = beta * (sc - sr)."""
    c, r = scores(x, p)
    z = p.beta * (c - r)
    mix = torch.sigmoid(z / p.discopop_tau)
    return (-F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix, *ref_rewards(x, p))


def sigmoid_norm(x: PairLogps, p: LossConfig) -> LossOutput:
    """DPO on per-token mean scores: ``-logsig(beta * (sc / nc - sr / nr))``."""
    c, r = scores(x, p)
    delta = c / x.chosen_tokens.clamp(min=1) - r / x.rejected_tokens.clamp(min=1)
    return (-F.logsigmoid(p.beta * delta), *ref_rewards(x, p))


def sft(x: PairLogps, p: LossConfig) -> LossOutput:
    """NLL of the chosen completions (``sigmoid`` + ``sft`` is RPO, Pang et al. 2024, arXiv:2404.19733),
    the batch's token mean repeated per pair so that the mean over pairs is that mean."""
    loss = chosen_nll(x).expand(x.policy_chosen.shape[0])
    rewards = ref_rewards(x, p) if x.ref_chosen is not None else free_rewards(x, p)
    return (loss, *rewards)


def simpo(x: PairLogps, p: LossConfig) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free: the smoothed logistic loss of
    ``beta * (mean_c - mean_r) - gamma`` on per-token mean log-probs (TRL's CPO ``simpo``, cpo_alpha 0)."""
    c, r = mean_logps(x)
    z = p.beta * ((c - r) - p.simpo_gamma / p.beta)
    return (smoothed(z, p.label_smoothing), *free_rewards(x, p))


def orpo(x: PairLogps, p: LossConfig) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), reference-free: chosen NLL minus
    ``beta * logsigmoid(log odds(chosen) - log odds(rejected))`` on per-token mean log-probs
    (TRL's ``policy_nll_loss - beta * ratio``, beta being the paper's lambda)."""
    c, r = mean_logps(x)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return (chosen_nll(x) - p.beta * F.logsigmoid(log_odds), *free_rewards(x, p))


PAIRWISE = (sigmoid, robust, hinge, ipo, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired,
            apo_zero, apo_down, discopop, sigmoid_norm, sft, simpo, orpo)
