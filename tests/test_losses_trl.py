"""raydpo's losses against TRL's own code (the installed ``trl``), on random log-probs.

TRL computes its DPO losses inside ``DPOTrainer._compute_loss``; it is called here unbound, on a
stand-in trainer holding only the attributes that method reads and a stand-in model that returns
given per-token log-probs (TRL's fused LM head output). The CPO (SimPO) and ORPO losses are
methods on log-probs and are called directly.
"""

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raydpo.config import LossConfig
from raydpo.objectives import LOSSES, PairLogps, compute_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 6, 9
TRL_DPO_LOSSES = sorted(set(LOSSES) - {"simpo", "orpo"})


def random_batch(seed: int):
    """Per-token policy log-probs [2B, T-1] on a completion mask [2B, T] (prompt 2-3 tokens, varied
    completion lengths), and reference sums [B] each."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = 2 + i % 2
        mask[i, start : start + 2 + (i * 5) % (T - start - 1)] = 1
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * B, generator=g, dtype=torch.float64)
    return per_token, mask, ref[:B], ref[B:]


def stand_in_trainer(names, weights, p: LossConfig, **extra):
    """An object with the attributes ``DPOTrainer._compute_loss`` reads, for one process on CPU."""
    gather = lambda x: x  # noqa: E731  (one process)
    model = torch.nn.Module()  # in train mode; a module, as accelerate's is_peft_model looks inside it
    model.is_gradient_checkpointing = False
    return SimpleNamespace(**{
        "model": model,
        "accelerator": SimpleNamespace(device="cpu", gather_for_metrics=gather, gather=gather),
        "aux_loss_enabled": False, "ld_alpha": p.ld_alpha, "precompute_ref_logps": True, "f_divergence_type": p.f_divergence,
        "f_alpha_divergence_coef": p.f_alpha_divergence_coef, "loss_types": names, "loss_weights": weights, "beta": p.beta,
        "label_smoothing": p.label_smoothing, "use_weighting": p.use_weighting,
        "args": SimpleNamespace(discopop_tau=p.discopop_tau, gradient_checkpointing_kwargs=None),
        "_metrics": {"train": defaultdict(list)}, "_total_train_tokens": 0, "_tp_size": 1, **extra})


def trl_dpo_loss(names, weights, per_token, mask, ref_c, ref_r, p: LossConfig, sum_sq=None, ref_per_token=None):
    """TRL's scalar loss and logged rewards for this batch. ``sum_sq``: the per-token ``log_sum_sq_probs``
    (WPO); ``ref_per_token``: the reference's per-token log-probs, scored by TRL itself (then
    ``precompute_ref_logps`` is off and ``ref_c``, ``ref_r`` are unused)."""
    zeros = torch.zeros_like(per_token)

    def stand_in(values):
        return lambda **kwargs: SimpleNamespace(log_probs=values, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                                                log_sum_sq_probs=sum_sq)

    model = stand_in(per_token)
    trainer = stand_in_trainer(names, weights, p, precompute_ref_logps=ref_per_token is None,
                               ref_model=None if ref_per_token is None else stand_in(ref_per_token))

    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False)
    m = trainer._metrics["train"]
    return loss, m["rewards/chosen"][0], m["rewards/rejected"][0]


def ours(names, weights, per_token, mask, ref_c, ref_r, p: LossConfig):
    sums, counts = per_token.sum(1), mask[:, 1:].sum(1).to(per_token.dtype)
    x = PairLogps(sums[:B], sums[B:], counts[:B], counts[B:], ref_c, ref_r)
    return compute_loss(names, weights, x, p)


@pytest.mark.parametrize("name", TRL_DPO_LOSSES)
def test_each_dpo_loss_equals_trl(name):
    for seed, beta, eps in itertools.product(range(3), (0.1, 0.5), (0.0, 0.2)):
        if name == "exo_pair" and eps == 0:
            continue  # TRL refuses exo_pair without label smoothing, as raydpo's config does
        if name == "sigmoid" and eps > 0:
            continue  # TRL's sigmoid ignores label_smoothing; raydpo's applies cDPO (hand-checked elsewhere)
        batch = random_batch(seed)
        p = LossConfig(beta=beta, label_smoothing=eps)
        expected, exp_c, exp_r = trl_dpo_loss([name], [1.0], *batch, p)
        losses, chosen_r, rejected_r = ours([name], [1.0], *batch, p)
        # 1e-7: TRL takes exo_pair's log(1 - eps) in float32 (a float32 tensor of label_smoothing).
        assert torch.allclose(losses.mean(), expected, atol=1e-7, rtol=1e-7), (name, seed, beta, eps)
        assert abs(chosen_r.mean().item() - exp_c) < 1e-9 and abs(rejected_r.mean().item() - exp_r) < 1e-9


@pytest.mark.parametrize("divergence, coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm"])
def test_f_divergences_equal_trl(name, divergence, coef):
    # float32: TRL's alpha-divergence clamp knows the float dtypes of training, not float64.
    batch = [b.float() if b.is_floating_point() else b for b in random_batch(7)]
    p = LossConfig(beta=0.3, f_divergence=divergence, f_alpha_divergence_coef=coef)
    expected, _, _ = trl_dpo_loss([name], [1.0], *batch, p)
    assert torch.allclose(ours([name], [1.0], *batch, p)[0].mean(), expected, atol=1e-6)


def test_weighted_list_equals_trl():
    batch = random_batch(11)
    names, weights = ["sigmoid", "sft", "bco_pair"], [1.0, 0.3, 0.5]
    p = LossConfig(beta=0.2)
    expected, _, _ = trl_dpo_loss(names, weights, *batch, p)
    assert torch.allclose(ours(names, weights, *batch, p)[0].mean(), expected, atol=1e-10)


def test_simpo_equals_trl_cpo():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    per_token, mask, _, _ = random_batch(3)
    counts = mask[:, 1:].sum(1).to(per_token.dtype)
    avg = per_token.sum(1) / counts
    for beta, gamma, eps in [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)]:
        trainer = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device="cpu"), loss_type="simpo",
                                  simpo_gamma=gamma, beta=beta, label_smoothing=eps)
        expected, exp_c, exp_r = cpo.CPOTrainer.cpo_loss(trainer, avg[:B], avg[B:])
        losses, chosen_r, rejected_r = ours(["simpo"], [1.0], per_token, mask, None, None,
                                            LossConfig(beta=beta, simpo_gamma=gamma, label_smoothing=eps))
        assert torch.allclose(losses, expected, atol=1e-12)
        assert torch.allclose(chosen_r, exp_c) and torch.allclose(rejected_r, exp_r)


def test_orpo_equals_trl():
    orpo_mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    per_token, mask, _, _ = random_batch(5)
    counts = mask[:, 1:].sum(1).to(per_token.dtype)
    avg = per_token.sum(1) / counts
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses, exp_c, exp_r, _, _ = orpo_mod.ORPOTrainer.odds_ratio_loss(trainer, avg[:B], avg[B:])
    # TRL's loss: the chosen tokens' mean NLL (CrossEntropyLoss over the chosen rows) - mean(beta * ratio).
    nll = -per_token[:B][mask[:B, 1:].bool()].mean()
    losses, chosen_r, rejected_r = ours(["orpo"], [1.0], per_token, mask, None, None, LossConfig(beta=0.1))
    assert torch.allclose(losses.mean(), nll - ratio_losses.mean(), atol=1e-12)
    # TRL computes ORPO's rewards in float32.
    assert torch.allclose(chosen_r.float(), exp_c) and torch.allclose(rejected_r.float(), exp_r)
