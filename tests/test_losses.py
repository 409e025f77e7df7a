"""The sigmoid DPO loss against values worked out by hand."""

import math

import torch

from raydpo.losses import compute_loss, mean_metrics, pair_metrics, sigmoid_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


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
    losses, _, _ = compute_loss("sigmoid", t(-10), t(-14), t(-11), t(-12), beta=0.5, label_smoothing=0.25)
    assert abs(losses.item() - 0.5764132779827524) < 1e-12


def test_gradient_flows_only_through_policy():
    pc, pr = t(-10.0).requires_grad_(), t(-14.0).requires_grad_()
    losses, chosen_r, _ = sigmoid_loss(pc, pr, t(-11), t(-12), beta=0.5)
    losses.sum().backward()
    # d loss / d pc = -beta * sigmoid(-beta * logits) = -0.5 * sigmoid(-1.5)
    assert abs(pc.grad.item() - (-0.5 / (1 + math.exp(1.5)))) < 1e-12
    assert abs(pr.grad.item() - (0.5 / (1 + math.exp(1.5)))) < 1e-12
    assert not chosen_r.requires_grad


def test_metric_sums_and_means():
    losses, c, r = sigmoid_loss(t(-10, -5), t(-14, -5), t(-11, -4), t(-12, -6), beta=0.5)
    sums = {k: v.item() for k, v in pair_metrics(losses, c, r, t(-10, -5), t(-14, -5)).items()}
    means = mean_metrics(sums)
    assert sums["count"] == 2
    assert means["rewards/accuracies"] == 0.5  # pair 1: 0.5 > -1.0 yes; pair 2: -0.5 > 0.5 no
    assert abs(means["rewards/margins"] - ((0.5 + 1.0) + (-0.5 - 0.5)) / 2) < 1e-12
    assert means["logps/chosen"] == -7.5
