"""One place that maps ``loss.type`` names to objectives and computes a batch's loss and metrics,
for the Ray trainer and :class:`raydpo.DPO` alike."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from raydpo.config import LossConfig
from raydpo.config.rules import loss_names, loss_weights
from raydpo.logprobs import split_pairs
from raydpo.objectives.logps import LossOutput, PairLogps, wpo_weights
from raydpo.objectives.pairwise import PAIRWISE
from raydpo.objectives.unpaired import NEEDS_KL, UNPAIRED, UnpairedLogps, batch_kl

LOSSES: dict[str, Callable[[PairLogps, LossConfig], LossOutput]] = {f.__name__: f for f in PAIRWISE}
"""Pairwise losses by name."""
UNPAIRED_LOSSES = {f.__name__: f for f in UNPAIRED}
"""Unpaired (KTO-style) losses by name."""


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
    if x.weights is not None:  # WPO: TRL weights every loss of the list by the same pair weights
        total = total * x.weights
    return (total, *rewards)


def is_unpaired(p: LossConfig) -> bool:
    """Whether ``loss.type`` is an unpaired loss (the config check refuses mixing the two kinds)."""
    return any(n in UNPAIRED_LOSSES for n in loss_names(p))


def preference_loss(
    policy_logps: torch.Tensor,
    completion_tokens: torch.Tensor,
    ref_logps: Optional[tuple[torch.Tensor, torch.Tensor]],
    p: LossConfig,
    desirable: Optional[torch.Tensor] = None,
    kl_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    plain_logps: Optional[torch.Tensor] = None,
    aligned: Optional[torch.Tensor] = None,
):
    """The loss section ``p`` over one batch, as the Ray trainer and :class:`raydpo.DPO` both compute it.

    policy_logps, completion_tokens: [2B], the first sequence of each pair or example then the second
    (as :func:`raydpo.logprobs.forward_logps` returns them): chosen then rejected, or for unpaired
    losses each example's completion then its KL sequence; ref_logps: the reference's ([B], [B]) or
    None for reference-free losses. Unpaired losses also take ``desirable`` (bool [B]) and
    ``kl_reduce`` (averages the KL estimate over data-parallel ranks). With ``loss.ld_alpha``,
    ``plain_logps`` [2B] are the unweighted sums (for ``sft``); with ``loss.use_weighting``,
    ``aligned`` [2B] are the WPO sums (:class:`raydpo.logprobs.SequenceScores` holds both).

    Returns the batch's log-probs (:class:`PairLogps` or :class:`UnpairedLogps`), the loss output
    (pairwise: per-pair losses, chosen and rejected rewards, each [B]; unpaired: per-example losses
    and rewards [B] and the KL estimate) and the metric sums of :func:`pair_metrics` /
    :func:`unpaired_metrics`.
    """
    first, second = split_pairs(policy_logps)
    ref_first, ref_second = ref_logps if ref_logps is not None else (None, None)
    if is_unpaired(p):
        if desirable is None:
            raise ValueError(f"loss {p.type!r} is unpaired: pass each example's label (desirable, bool [B])")
        x = UnpairedLogps(first, second, split_pairs(completion_tokens)[0], desirable.bool(), ref_first, ref_second)
        (name,) = loss_names(p)
        out = UNPAIRED_LOSSES[name](x, p, batch_kl(x, kl_reduce) if name in NEEDS_KL else None)
        return x, out, unpaired_metrics(x, *out)
    if p.use_weighting and aligned is None:
        raise ValueError("loss.use_weighting needs the WPO sums (aligned, from forward_scores(..., sum_sq=True))")
    x = PairLogps(first, second, *split_pairs(completion_tokens), ref_first, ref_second,
                  split_pairs(plain_logps)[0] if plain_logps is not None else None,
                  wpo_weights(aligned, completion_tokens) if p.use_weighting else None)
    out = compute_loss(loss_names(p), loss_weights(p), x, p)
    return x, out, pair_metrics(*out, first, second)


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().sum()


def pair_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-batch **sums** of TRL's metrics (sums, so shards and micro-batches add up exactly).

    Divide by the pair count (``metrics["count"]``) for the means that TRL logs (:func:`mean_metrics`).
    """
    return {
        "count": torch.tensor(float(losses.shape[0]), device=losses.device),
        "loss": _sum(losses),
        "rewards/chosen": _sum(chosen_rewards),
        "rewards/rejected": _sum(rejected_rewards),
        "rewards/accuracies": _sum(chosen_rewards > rejected_rewards),
        "rewards/margins": _sum(chosen_rewards - rejected_rewards),
        "logps/chosen": _sum(policy_chosen),
        "logps/rejected": _sum(policy_rejected),
    }


def unpaired_metrics(x: UnpairedLogps, losses: torch.Tensor, rewards: torch.Tensor, kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch sums of KTOTrainer's metrics: ``rewards/chosen`` and ``logps/chosen`` over the desirable
    examples (``count/desirable`` of them), ``/rejected`` over the undesirable ones, ``kl`` weighted by
    the batch size; :func:`mean_metrics` divides each by its own count."""
    d = x.desirable
    n = torch.tensor(float(losses.shape[0]), device=losses.device)
    return {
        "count": n,
        "loss": _sum(losses),
        "kl": kl.detach().float() * n,
        "count/desirable": _sum(d),
        "count/undesirable": _sum(~d),
        "rewards/chosen": _sum(rewards[d]),
        "rewards/rejected": _sum(rewards[~d]),
        "logps/chosen": _sum(x.policy[d]),
        "logps/rejected": _sum(x.policy[~d]),
    }


def with_aux_loss(loss: torch.Tensor, sums: dict, aux_loss: Optional[torch.Tensor], coef: float):
    """The batch loss (0-d) plus the MoE router loss ``coef * aux_loss`` (TRL's ``router_aux_loss_coef``)
    and the metric sums with it, as TRL logs them: ``loss`` includes it, ``aux_loss`` is the batch's
    (times its count, so :func:`mean_metrics` averages it). ``coef`` 0: both unchanged."""
    if not coef:
        return loss, sums
    aux = aux_loss.detach().float() * sums["count"]
    return loss + coef * aux_loss, sums | {"loss": sums["loss"] + coef * aux, "aux_loss": aux}


def metric_keys(p: LossConfig, aux: bool = False) -> list[str]:
    """The metric sums' keys for this loss section (the same on every rank, for the collectives);
    ``aux``: with the router loss's (:func:`with_aux_loss`)."""
    if aux:
        return metric_keys(p) + ["aux_loss"]
    if is_unpaired(p):
        return ["count", "loss", "tokens", "kl", "count/desirable", "count/undesirable", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected"]
    return ["count", "loss", "tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"]


#: Unpaired metrics averaged over their own examples rather than the whole batch.
_OWN_COUNT = {"rewards/chosen": "count/desirable", "logps/chosen": "count/desirable",
              "rewards/rejected": "count/undesirable", "logps/rejected": "count/undesirable"}


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Turn summed metrics (with ``count``) into means; unpaired sums (with ``count/desirable``) are
    averaged over their own examples and get ``rewards/margins`` (chosen minus rejected mean) as TRL's."""
    n = max(sums.get("count", 0.0), 1.0)
    unpaired = "count/desirable" in sums
    out = {}
    for k, v in sums.items():
        if k == "count" or k.startswith("count/"):
            continue
        out[k] = v / max(sums[_OWN_COUNT[k]], 1.0) if unpaired and k in _OWN_COUNT else v / n
    if unpaired:
        out["desirable"], out["undesirable"] = sums["count/desirable"], sums["count/undesirable"]
        if sums["count/desirable"] and sums["count/undesirable"]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
