"""Preference losses as pure functions.

Every loss takes the per-pair sequence log-probs of the policy and the reference and returns
``(losses, chosen_rewards, rejected_rewards)``, each ``[B]`` (torchtune's shape), so the training
loop, the in-process wrapper and the tests share one implementation. Rewards are the implicit
DPO rewards ``beta * (policy - reference)``, detached.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rewards(pc, pr, rc, rr, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), with cDPO label smoothing.

    logits = (pc - rc) - (pr - rr)  (all [B])
    loss   = -(1 - eps) * logsigmoid(beta * logits) - eps * logsigmoid(-beta * logits)
    With policy == reference, logits = 0 and the loss is ln 2.
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return (losses, *_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


LOSSES: dict[str, Callable[..., LossOutput]] = {"sigmoid": sigmoid_loss}


def compute_loss(name: str, pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Dispatch to the registered loss ``name``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(LOSSES)}")
    return LOSSES[name](pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)


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
