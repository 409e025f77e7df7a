"""Unpaired objectives (one completion per example, labelled desirable or not): TRL's KTOTrainer losses.

A batch holds B examples, each scored twice: its own ``prompt + completion`` and a **mismatched**
``prompt + completion of another example`` (TRL's KL sequence; :mod:`raydpo.data.unpaired` builds the
pairing). The KL term of KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7) is the batch mean of
the mismatched log ratios, averaged over the data-parallel ranks, clamped at 0 and detached, exactly
as ``KTOTrainer._compute_loss`` computes it. Each function returns ``(losses, rewards, kl)``:
per-example losses [B] (already multiplied by ``desirable_weight`` / ``undesirable_weight``), rewards
``beta * (policy - reference)`` [B] and the KL estimate (a 0-d tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from raydpo.config import LossConfig

UnpairedOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class UnpairedLogps:
    """Sequence log-probs of B unpaired examples (tensors ``[B]``, float32)."""

    policy: torch.Tensor
    """Sum of the policy's log-probs over each example's completion tokens."""
    policy_kl: torch.Tensor
    """The same over the mismatched completion (the KL sequence) of each example's prompt."""
    tokens: torch.Tensor
    """Completion tokens scored per example."""
    desirable: torch.Tensor
    """bool [B]: the example's label (True: desirable)."""
    ref: Optional[torch.Tensor] = None
    """The reference's sums over the completions."""
    ref_kl: Optional[torch.Tensor] = None
    """The reference's sums over the KL sequences."""


def batch_kl(x: UnpairedLogps, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """KTO's KL estimate: ``mean(policy_kl - ref_kl)`` over the batch, averaged over ranks by
    ``reduce`` (TRL's ``gather_for_metrics(kl).mean()``), clamped at 0, detached -> 0-d tensor."""
    kl = (x.policy_kl - x.ref_kl).mean().detach()
    if reduce is not None:
        kl = reduce(kl)
    return kl.clamp(min=0)


def _weighted(x: UnpairedLogps, p: LossConfig, desirable_loss: torch.Tensor, undesirable_loss: torch.Tensor) -> torch.Tensor:
    return torch.where(x.desirable, p.desirable_weight * desirable_loss, p.undesirable_weight * undesirable_loss)


def kto(x: UnpairedLogps, p: LossConfig, kl: torch.Tensor) -> UnpairedOutput:
    """KTO: desirable ``1 - sigmoid(beta * (r - KL))``, undesirable ``1 - sigmoid(beta * (KL - r))``,
    r the example's log ratio."""
    r = x.policy - x.ref
    losses = _weighted(x, p, 1 - torch.sigmoid(p.beta * (r - kl)), 1 - torch.sigmoid(p.beta * (kl - r)))
    return losses, p.beta * r.detach(), kl


def apo_zero_unpaired(x: UnpairedLogps, p: LossConfig, kl: torch.Tensor) -> UnpairedOutput:
    """APO-zero, unpaired (D'Oosterlinck et al. 2024, arXiv:2408.06266): desirable
    ``1 - sigmoid(beta * r)``, undesirable ``sigmoid(beta * r)``; no KL term (TRL computes none)."""
    r = x.policy - x.ref
    losses = _weighted(x, p, 1 - torch.sigmoid(p.beta * r), torch.sigmoid(p.beta * r))
    return losses, p.beta * r.detach(), torch.zeros((), device=r.device)


UNPAIRED = (kto, apo_zero_unpaired)
#: Unpaired losses whose KL term needs the mismatched sequences scored (TRL's ``calculate_KL``).
NEEDS_KL = frozenset({"kto"})
