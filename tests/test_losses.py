"""Preference losses against values worked out by hand, and against TRL's own code."""

import math

import pytest
import torch

from raydpo.config import LossConfig
from raydpo.objectives import LOSSES, PairLogps, compute_loss, log1mexp, mean_metrics, pair_metrics


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def pairs(pc, pr, rc=None, rr=None, nc=None, nr=None) -> PairLogps:
    n = len(pc)
    return PairLogps(t(*pc), t(*pr), t(*(nc or [1] * n)), t(*(nr or [1] * n)),
                     None if rc is None else t(*rc), None if rr is None else t(*rr))


def sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.0):
    x = PairLogps(pc, pr, torch.ones_like(pc), torch.ones_like(pr), rc, rr)
    return compute_loss(["sigmoid"], [1.0], x, LossConfig(beta=beta, label_smoothing=label_smoothing))


def logsig(z: float) -> float:
    return -math.log1p(math.exp(-z))


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_policy_equals_reference_gives_ln2():
    logps = t(-12.5, -3.0, -40.0)
    losses, chosen_r, rejected_r = sigmoid_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-12)
    assert torch.equal(chosen_r, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rejected_r, torch.zeros(3, dtype=torch.float64))


def test_hand_worked_values():
    """Pair 1: pc=-10, pr=-14, rc=-11, rr=-12, beta=0.5.

    chosen reward   = 0.5 * (-10 - -11) =  0.5
    rejected reward = 0.5 * (-14 - -12) = -1.0
    logits = (-10 + 11) - (-14 + 12) = 1 + 2 = 3;  beta * logits = 1.5
    loss = -log(sigmoid(1.5)) = log(1 + e^-1.5) = 0.2014132779827524

    Pair 2: pc=-5, pr=-5, rc=-4, rr=-6 -> logits = -1 - 1 = -2; beta * logits = -1.0
    loss = log(1 + e^1) = 1.3132616875182228
    """
    losses, chosen_r, rejected_r = sigmoid_loss(t(-10, -5), t(-14, -5), t(-11, -4), t(-12, -6), beta=0.5)
    assert torch.allclose(losses, t(0.2014132779827524, 1.3132616875182228), atol=1e-12)
    assert torch.allclose(chosen_r, t(0.5, -0.5))
    assert torch.allclose(rejected_r, t(-1.0, 0.5))


def test_label_smoothing_hand_value():
    """cDPO with eps = 0.25 and beta * logits = 1.5:
    loss = 0.75 * log(1 + e^-1.5) + 0.25 * log(1 + e^1.5)
         = 0.75 * 0.2014132779827524 + 0.25 * 1.7014132779827524 = 0.5764132779827524
    """
    losses, _, _ = sigmoid_loss(t(-10), t(-14), t(-11), t(-12), beta=0.5, label_smoothing=0.25)
    assert abs(losses.item() - 0.5764132779827524) < 1e-12


def test_gradient_flows_only_through_policy():
    pc, pr = t(-10.0).requires_grad_(), t(-14.0).requires_grad_()
    losses, chosen_r, _ = sigmoid_loss(pc, pr, t(-11), t(-12), beta=0.5)
    losses.sum().backward()
    # d loss / d pc = -beta * sigmoid(-beta * logits) = -0.5 * sigmoid(-1.5)
    assert abs(pc.grad.item() - (-0.5 / (1 + math.exp(1.5)))) < 1e-12
    assert abs(pr.grad.item() - (0.5 / (1 + math.exp(1.5)))) < 1e-12
    assert not chosen_r.requires_grad


# One pair worked through every loss: pc=-10, pr=-14, rc=-11, rr=-12, beta=0.5, 4 chosen and 5
# rejected completion tokens, eps=0.1. Log ratios: chosen lc=+1, rejected lr=-2; margin 3, z=1.5.
# Per-token means: chosen -2.5, rejected -2.8; log-ratio means 1/4 and -2/5 (difference 0.65).
HAND = {
    "sigmoid": -(0.9 * logsig(1.5) + 0.1 * logsig(-1.5)),  # cDPO with eps=0.1
    "hinge": 0.0,  # relu(1 - 1.5)
    "ipo": (0.65 - 1 / (2 * 0.5)) ** 2,  # 0.1225
    "exo_pair": sig(1.5) * (logsig(1.5) - math.log(0.9)) + sig(-1.5) * (logsig(-1.5) - math.log(0.1)),
    "nca_pair": -logsig(0.5) - 0.5 * logsig(-0.5) - 0.5 * logsig(1.0),
    "robust": (-0.9 * logsig(1.5) + 0.1 * logsig(-1.5)) / 0.8,
    "bco_pair": -logsig(0.5) - logsig(1.0),
    "sppo_hard": (1 - 1) ** 2 + (-2 + 1) ** 2,  # 0.5/beta = 1 -> 1.0
    "apo_zero": 1 - sig(0.5) + sig(-1.0),
    "apo_down": sig(0.5) + 1 - sig(1.5),
    "discopop": -logsig(1.5) * (1 - sig(1.5 / 0.05)) + math.exp(-1.5) * sig(1.5 / 0.05),
    "sigmoid_norm": -logsig(0.5 * 0.65),
    "aot": -(0.9 * logsig(1.5) + 0.1 * logsig(-1.5)),  # one pair: sorting changes nothing
    "aot_unpaired": -(0.9 * logsig(1.5) + 0.1 * logsig(-1.5)),
    "sft": 10 / 4,  # -(-10) / 4 tokens
    # SimPO, gamma 0.5: z = beta * (-2.5 + 2.8) - gamma = 0.15 - 0.5 = -0.35, smoothed with eps=0.1
    "simpo": -(0.9 * logsig(-0.35) + 0.1 * logsig(0.35)),
    # ORPO: NLL 2.5 - beta * logsig(log odds), log odds = (-2.5 + 2.8) - (log(1-e^-2.5) - log(1-e^-2.8))
    "orpo": 2.5 - 0.5 * logsig(0.3 - (math.log(1 - math.exp(-2.5)) - math.log(1 - math.exp(-2.8)))),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_against_its_hand_value(name):
    assert set(HAND) == set(LOSSES)
    x = pairs([-10], [-14], [-11], [-12], nc=[4], nr=[5])
    p = LossConfig(type=name, beta=0.5, label_smoothing=0.1, simpo_gamma=0.5)
    losses, chosen_r, rejected_r = compute_loss([name], [1.0], x, p)
    assert abs(losses.item() - HAND[name]) < 1e-12, (losses.item(), HAND[name])
    if name in ("simpo", "orpo"):  # reference-free rewards: beta * mean token log-prob
        assert torch.allclose(chosen_r, t(0.5 * -2.5)) and torch.allclose(rejected_r, t(0.5 * -2.8))
    else:
        assert torch.allclose(chosen_r, t(0.5)) and torch.allclose(rejected_r, t(-1.0))


@pytest.mark.parametrize("name", ["simpo", "orpo", "sft"])
def test_reference_free_losses_need_no_reference(name):
    x = pairs([-10, -3], [-14, -9], nc=[4, 2], nr=[5, 3])
    losses, _, _ = compute_loss([name], [1.0], x, LossConfig(beta=0.5))
    assert torch.isfinite(losses).all() and losses.shape == (2,)


def test_aot_couples_the_batch_through_sorting():
    """AOT sorts policy margins and reference margins separately: policy margins [4, 0]
    sort to [0, 4], reference margins [1, 3] to [1, 3]; deltas [-1, 1] -> losses at z = -0.5, 0.5."""
    x = pairs([-10, -5], [-14, -5], [-11, -4], [-12, -7])
    losses, _, _ = compute_loss(["aot"], [1.0], x, LossConfig(beta=0.5))
    assert torch.allclose(losses, t(-logsig(-0.5), -logsig(0.5)), atol=1e-12)


def test_weighted_combination_is_rpo():
    x = pairs([-10], [-14], [-11], [-12], nc=[4], nr=[5])
    losses, _, _ = compute_loss(["sigmoid", "sft"], [1.0, 0.2], x, LossConfig(beta=0.5))
    assert abs(losses.item() - (-logsig(1.5) + 0.2 * 2.5)) < 1e-12


def test_log1mexp_is_stable_at_both_ends():
    x = t(-1e-10, -0.5, -50.0)
    assert torch.allclose(log1mexp(x), t(math.log(1e-10), math.log(1 - math.exp(-0.5)), -math.exp(-50.0)), rtol=1e-6)


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        compute_loss(["dpo"], [1.0], pairs([-1], [-2], [-1], [-2]), LossConfig())


def test_metric_sums_and_means():
    losses, c, r = sigmoid_loss(t(-10, -5), t(-14, -5), t(-11, -4), t(-12, -6), beta=0.5)
    sums = {k: v.item() for k, v in pair_metrics(losses, c, r, t(-10, -5), t(-14, -5)).items()}
    means = mean_metrics(sums)
    assert sums["count"] == 2
    assert means["rewards/accuracies"] == 0.5  # pair 1: 0.5 > -1.0 yes; pair 2: -0.5 > 0.5 no
    assert abs(means["rewards/margins"] - ((0.5 + 1.0) + (-0.5 - 0.5)) / 2) < 1e-12
    assert means["logps/chosen"] == -7.5
