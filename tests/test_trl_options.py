"""LD-DPO (``loss.ld_alpha``), WPO (``loss.use_weighting``), the MoE router loss
(``loss.router_aux_loss_coef``) and ``train.pad_to_multiple_of`` against TRL 1.16's own code.

- losses: ``DPOTrainer._compute_loss`` called unbound on test_losses_trl.py's stand-in trainer, on
  given per-token log-probs (the reference's scored by TRL itself) and ``log_sum_sq_probs``;
- log-probs: TRL's fused LM head (``add_fused_lm_head``) and ``compute_ref_log_probs`` on a real tiny
  model against raydpo's forward on each of its paths (chunked with several chunks and under
  checkpoint, full logits, padding-free, left padding, a sequence-parallel shard);
- the whole step: TRL's ``_compute_loss`` on a tiny random Qwen2-MoE with all three loss options,
  policy and reference models, against ``raydpo.DPO`` and the trainer's ``step_metrics``: loss,
  logged metrics and every gradient.
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from raydpo.config import LossConfig
from raydpo.data.collate import collate_packed, collate_pairs
from raydpo.logprobs import forward_logps, forward_scores, split_pairs
from raydpo.logprobs.forward import SequenceShard, length_weights
from raydpo.objectives import mean_metrics, preference_loss
from test_losses_trl import random_batch, stand_in_trainer, trl_dpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

#: (prompt, chosen, rejected) token ids: chosen longer, rejected longer, equal, a one-token completion.
PAIRS = [([3, 4, 5], [6, 7, 8, 9, 10, 2], [11, 12, 2]),
         ([3, 13], [14, 2], [15, 16, 17, 18, 19, 20, 21, 2]),
         ([3, 22, 23, 24, 25], [26, 27, 2], [28, 29, 2]),
         ([3, 30, 31], [2], [32, 33, 34, 2])]
COLS = tuple([list(p[i]) for p in PAIRS] for i in range(3))
#: raydpo's paths: (label, collate, chunk_tokens); chunks of 3 positions: several head calls per batch.
PATHS = [("padded auto chunk", lambda: collate_pairs(*COLS, 0), None), ("padded chunks of 3", lambda: collate_pairs(*COLS, 0), 3),
         ("padded full logits", lambda: collate_pairs(*COLS, 0), 0),
         ("left padded", lambda: collate_pairs(*COLS, 0, padding_side="left"), 3),
         ("padding-free chunks", lambda: collate_packed(*COLS, 0), 3), ("padding-free full", lambda: collate_packed(*COLS, 0), 0)]


def sums(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha=None) -> tuple[torch.Tensor, torch.Tensor]:
    """raydpo's (weighted, plain) sequence sums [2B] of per-token values [2B, T-1] on a completion mask
    [2B, T], with raydpo's LD-DPO weights (in the tensors' dtype, float64 here)."""
    rows, cols = mask[:, 1:].bool().nonzero(as_tuple=True)
    token, n = per_token[rows, cols], mask.shape[0]
    w = 1.0 if ld_alpha is None else length_weights(mask[:, 1:].sum(1), rows, n, ld_alpha).to(token.dtype)
    total = lambda v: torch.zeros(n, dtype=v.dtype).index_add(0, rows, v)  # noqa: E731
    return total(token * w), total(token)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("names, weights", [(["sigmoid"], [1.0]), (["ipo"], [1.0]), (["sigmoid", "sft"], [1.0, 0.4]),
                                            (["apo_zero", "bco_pair"], [1.0, 0.5])])
def test_ld_alpha_loss_equals_trl(names, weights, ld_alpha):
    per_token, mask, _, _ = random_batch(5)
    ref_per_token = per_token + 0.3 * torch.randn(per_token.shape, generator=torch.Generator().manual_seed(1),
                                                  dtype=per_token.dtype) * mask[:, 1:]
    p = LossConfig(type=names, weights=weights, beta=0.2, ld_alpha=ld_alpha)
    expected, exp_c, exp_r = trl_dpo_loss(names, weights, per_token, mask, None, None, p, ref_per_token=ref_per_token)
    logps, plain = sums(per_token, mask, ld_alpha)
    ref = split_pairs(sums(ref_per_token, mask, ld_alpha)[0])
    _, (losses, chosen_r, rejected_r), _ = preference_loss(logps, mask[:, 1:].sum(1).double(), ref, p, plain_logps=plain)
    assert torch.allclose(losses.mean(), expected, atol=1e-12, rtol=1e-12)
    assert abs(chosen_r.mean().item() - exp_c) < 1e-12 and abs(rejected_r.mean().item() - exp_r) < 1e-12


# Not sft: TRL 1.16 multiplies its expanded batch loss in place and fails ("more than one element of
# the written-to tensor refers to a single memory location"); raydpo weights it as every other loss.
@pytest.mark.parametrize("names, weights, ld_alpha", [(["sigmoid"], [1.0], None), (["ipo"], [1.0], None),
                                                      (["sigmoid", "bco_pair"], [1.0, 0.5], None), (["hinge"], [1.0], 0.5)])
def test_wpo_loss_equals_trl(names, weights, ld_alpha):
    per_token, mask, ref_c, ref_r = random_batch(8)
    sum_sq = -2 * torch.rand(per_token.shape, generator=torch.Generator().manual_seed(2), dtype=per_token.dtype)
    p = LossConfig(type=names, weights=weights, beta=0.3, use_weighting=True, ld_alpha=ld_alpha)
    # With ld_alpha, TRL's reference sums are its own (precompute off); WPO's weights never use ld_alpha.
    ref_per_token = None if ld_alpha is None else per_token * 0.9
    expected, _, _ = trl_dpo_loss(names, weights, per_token, mask, ref_c, ref_r, p, sum_sq=sum_sq, ref_per_token=ref_per_token)
    logps, plain = sums(per_token, mask, ld_alpha)
    ref = (ref_c, ref_r) if ld_alpha is None else split_pairs(sums(ref_per_token, mask, ld_alpha)[0])
    aligned = sums(per_token - sum_sq, mask)[1]
    x, (losses, _, _), _ = preference_loss(logps, mask[:, 1:].sum(1).double(), ref, p, plain_logps=plain, aligned=aligned)
    assert x.weights is not None and not torch.allclose(x.weights, torch.ones_like(x.weights))
    assert torch.allclose(losses.mean(), expected, atol=1e-12, rtol=1e-12)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama (float32, trainable) and a copy with TRL's fused head (log-probs and WPO's term)."""
    from raydpo.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    fused = copy.deepcopy(model)
    add_fused_lm_head(fused, outputs=("log_probs", "log_sum_sq_probs"))
    return model, fused


def trl_inputs(pad_to_multiple_of=None) -> dict:
    collator = trl_dpo.DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=pad_to_multiple_of)
    return collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])


def trl_ref_logps(fused, inputs, ld_alpha) -> torch.Tensor:
    """TRL's ``compute_ref_log_probs`` (the LD-DPO-weighted reference sums it precomputes) -> [2B]."""
    trainer = stand_in_trainer(["sigmoid"], [1.0], LossConfig(ld_alpha=ld_alpha), ref_model=None)
    trainer.accelerator.autocast = contextlib.nullcontext
    return torch.cat(trl_dpo.DPOTrainer.compute_ref_log_probs(trainer, fused, inputs))


#: TRL's fused head (its own float32 log-softmax in vocabulary tiles) against raydpo's: float32 sums
#: of up to 8 tokens (totals down to -53); the largest difference measured is 1.9e-6.
ATOL = 1e-5


@pytest.mark.parametrize("label, collate, chunk", PATHS, ids=[p[0] for p in PATHS])
def test_forward_equals_trls_fused_head(tiny, label, collate, chunk):
    model, fused = tiny
    inputs = trl_inputs()
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = fused(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels, fused_lm_head=True)
    shift = inputs["completion_mask"][:, 1:]
    want_aligned = ((out.log_probs - out.log_sum_sq_probs) * shift).sum(1)
    batch = collate()
    for ld_alpha in (None, 0.0, 0.3):
        want = out.log_probs.sum(1) if ld_alpha is None else trl_ref_logps(fused, inputs, ld_alpha)
        with torch.enable_grad():  # the chunked head under torch's checkpoint, as in training
            scores = forward_scores(model, batch, chunk, ld_alpha=ld_alpha, sum_sq=True)
            scores.logps.sum().backward()
        assert scores.aligned is not None and not scores.aligned.requires_grad
        assert torch.allclose(scores.logps.detach(), want, atol=ATOL), (label, ld_alpha, scores.logps - want)
        assert torch.allclose(scores.plain.detach(), out.log_probs.sum(1), atol=ATOL), label
        assert torch.allclose(scores.aligned, want_aligned, atol=ATOL), (label, scores.aligned - want_aligned)
    model.zero_grad()
    # ld_alpha 0 keeps the shared part only; 1 is no weighting at all.
    with torch.no_grad():
        assert torch.equal(forward_logps(model, batch, chunk, ld_alpha=1.0), forward_logps(model, batch, chunk))


class Bigram(torch.nn.Module):
    """Logits from the current token alone, so a sequence-parallel shard's columns score exactly
    without the Ulysses attention: the shard path's bookkeeping is all that is tested."""

    def __init__(self, vocab: int = 40, hidden: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(model_type="bigram")
        self.embed, self.lm_head = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("chunk", [2, 0], ids=["chunks", "full"])
def test_sequence_parallel_shards_add_up(packed, chunk):
    model = Bigram()
    batch = (collate_packed if packed else collate_pairs)(*COLS, 0)
    with torch.no_grad():
        whole = forward_scores(model, batch, chunk, ld_alpha=0.3, sum_sq=True)
        parts = [forward_scores(model, batch, chunk, SequenceShard(3, r, lambda s: s), ld_alpha=0.3, sum_sq=True)
                 for r in range(3)]
    for field in ("logps", "plain", "aligned"):
        total = sum(getattr(s, field) for s in parts)
        assert torch.allclose(total, getattr(whole, field), atol=1e-5), field


def test_pad_to_multiple_of_as_trl(tiny):
    model, _ = tiny
    for multiple in (8, 5):
        ours, theirs = collate_pairs(*COLS, 0, pad_to_multiple_of=multiple), trl_inputs(multiple)
        assert ours["input_ids"].shape[1] % multiple == 0
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(ours[key], theirs[key]), (multiple, key)
        with torch.no_grad():
            for chunk in (None, 0):
                assert torch.allclose(forward_logps(model, ours, chunk), forward_logps(model, collate_pairs(*COLS, 0), chunk),
                                      atol=1e-5)


def test_reference_scores_ld_alpha_and_padding(tiny_model_dir, tiny, tmp_path):
    from conftest import make_config
    from raydpo.data.shared import collate_shared
    from raydpo.reference.scorer import HfBackend
    from raydpo.reference.stage import cache_inputs, scorer_kwargs

    model, _ = tiny
    with torch.no_grad():
        want = split_pairs(forward_logps(model, collate_pairs(*COLS, 0), ld_alpha=0.5))
    backend = HfBackend(tiny_model_dir, "float32", 0, ld_alpha=0.5, pad_to_multiple_of=16)
    assert not backend.packed  # packed rows' sums are unweighted: two rows per pair instead
    for got, expect in zip(backend.score(*COLS), want):
        assert torch.allclose(torch.from_numpy(got), expect, atol=1e-5)
    assert collate_shared(*COLS, 0, pad_to_multiple_of=16)["input_ids"].shape[1] % 16 == 0
    plain = HfBackend(tiny_model_dir, "float32", 0, pad_to_multiple_of=16)
    assert plain.packed and not torch.allclose(torch.from_numpy(plain.score(*COLS)[0]), want[0], atol=1e-3)

    cfg = make_config(tiny_model_dir, "pairs.jsonl", tmp_path, loss={"ld_alpha": 0.5}, train={"pad_to_multiple_of": 16})
    kwargs = scorer_kwargs(cfg, 0)
    assert kwargs["ld_alpha"] == 0.5 and kwargs["pad_to_multiple_of"] == 16 and kwargs["share_prompt"] is False
    keyed = lambda c: cache_inputs(c, [b"x" * 16], {})["logps"]  # noqa: E731
    assert keyed(cfg) != keyed(make_config(tiny_model_dir, "pairs.jsonl", tmp_path)) == "sum_completion_float32"


def tiny_moe(vocab: int = 64):
    """A random tiny Qwen2-MoE (raydpo.fixtures.families's qwen2_moe sizes: 4 experts, top 2, a shared expert)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raydpo.fixtures.families import FAMILIES

    config = AutoConfig.for_model("qwen2_moe", vocab_size=vocab, pad_token_id=0, **FAMILIES["qwen2_moe"].config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def test_moe_step_equals_trl_compute_loss():
    """ld_alpha, use_weighting and the router loss at once: raydpo.DPO's loss, metrics and gradients
    are TRL's ``_compute_loss`` on the same tiny Qwen2-MoE, policy and reference."""
    import raydpo

    policy = tiny_moe()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference away from the policy: non-zero log ratios
        for w in reference.parameters():
            w.add_(0.02 * torch.randn_like(w))
    trl_policy, trl_ref = copy.deepcopy(policy), copy.deepcopy(reference)
    add_fused_lm_head(trl_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    add_fused_lm_head(trl_ref)
    p = LossConfig(beta=0.5, ld_alpha=0.6, use_weighting=True, router_aux_loss_coef=0.5)
    trainer = stand_in_trainer(["sigmoid", "bco_pair"], [1.0, 0.2], p, model=trl_policy, ref_model=trl_ref,
                               precompute_ref_logps=False, aux_loss_enabled=True, router_aux_loss_coef=0.5)
    expected = trl_dpo.DPOTrainer._compute_loss(trainer, trl_policy, trl_inputs(), False)
    expected.backward()

    dpo = raydpo.DPO(policy, beta=0.5, pad_id=0, loss_type=["sigmoid", "bco_pair"], weights=[1.0, 0.2], ref_model=reference,
                     ld_alpha=0.6, use_weighting=True, router_aux_loss_coef=0.5)
    batch, n = trl_inputs(), len(PAIRS)
    ids, masks = batch["input_ids"], batch["attention_mask"].bool()
    out = dpo(ids[:n], ids[n:], prompt_lengths=[len(p) for p, _, _ in PAIRS], chosen_mask=masks[:n], rejected_mask=masks[n:])
    out.loss.backward()
    logged = trainer._metrics["train"]
    # Measured: loss 4.8e-7 apart, gradients 1.8e-7 (6e-7 of the largest entry); float32 throughout.
    assert torch.allclose(out.loss, expected, atol=5e-6), (out.loss, expected)
    assert abs(out.metrics["aux_loss"].item() - logged["aux_loss"][0]) < 1e-6
    assert abs(out.metrics["logps/chosen"].item() - logged["logps/chosen"][0]) < 1e-4
    theirs = dict(trl_policy.named_parameters())
    for name, w in policy.named_parameters():
        assert torch.allclose(w.grad, theirs[name].grad, atol=2e-6, rtol=1e-4), name
    gate = next(w for n, w in policy.named_parameters() if n.endswith("mlp.gate.weight"))
    assert gate.grad.abs().sum() > 0


def test_moe_router_loss_in_the_trainer_step():
    """The Ray trainer's step_metrics (here on the plain model: no DeepSpeed) adds coef * the model's
    own aux_loss, logs it, and TRL's None reads the model config's coefficient."""
    from raydpo.config.rules import router_aux_coef
    from raydpo.train.step import step_metrics

    model = tiny_moe()
    batch = collate_pairs(*COLS, 0)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = torch.full((len(PAIRS),), -20.0), torch.full((len(PAIRS),), -21.0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        aux = model(**inputs, output_router_logits=True).aux_loss
    assert router_aux_coef(LossConfig(), model.config) == model.config.router_aux_loss_coef == 0.001
    assert router_aux_coef(LossConfig(router_aux_loss_coef=0.0), model.config) == 0.0
    runs = {}
    for coef in (0.0, 3.0):
        model.zero_grad()
        loss, s, _ = step_metrics(model, batch, LossConfig(router_aux_loss_coef=coef))
        loss.backward()
        runs[coef] = loss.detach(), s, next(w for n, w in model.named_parameters() if n.endswith("mlp.gate.weight")).grad.clone()
    (plain, plain_sums, plain_grad), (loss, s, grad) = runs[0.0], runs[3.0]
    assert "aux_loss" not in plain_sums and torch.allclose(loss - plain, 3.0 * aux, atol=1e-6)
    means = mean_metrics({k: float(v) for k, v in s.items()})
    assert abs(means["aux_loss"] - aux.item()) < 1e-6 and abs(means["loss"] - loss.item()) < 1e-5
    assert not torch.allclose(plain_grad, grad)  # the router loss reaches the gates


def test_config_rules_and_preflight(tiny_model_dir, tmp_path):
    import raydpo
    from conftest import make_config
    from raydpo.config import ConfigError
    from raydpo.models import load_causal_lm
    from raydpo.train.preflight import check_router_aux

    refused = [({"loss": {"ld_alpha": 1.5}}, "ld_alpha must be in"), ({"loss": {"type": "simpo", "ld_alpha": 0.5}}, "DPOTrainer"),
               ({"loss": {"type": "aot", "use_weighting": True}}, "aot"), ({"train": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
               ({"loss": {"ld_alpha": 0.5}, "reference": {"backend": "vllm"}}, "vllm")]
    for sections, match in refused:
        with pytest.raises(ConfigError, match=match):
            make_config(tiny_model_dir, "pairs.jsonl", tmp_path, **sections)
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts"):
        check_router_aux(make_config(tiny_model_dir, "pairs.jsonl", tmp_path, loss={"router_aux_loss_coef": 0.1}), tiny_model_dir)
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts"):
        raydpo.DPO(load_causal_lm(tiny_model_dir), router_aux_loss_coef=0.1)
    check_router_aux(make_config(tiny_model_dir, "pairs.jsonl", tmp_path), tiny_model_dir)  # unset on a dense model: off
    moe_dir = tmp_path / "moe"
    tiny_moe().config.save_pretrained(moe_dir)
    # Qwen2-MoE's loss is transformers' standard one, which raydpo counts exactly on every layout
    # (tests/test_router.py): sequence parallelism and padding-free rows are allowed with it.
    check_router_aux(make_config(str(moe_dir), "pairs.jsonl", tmp_path, train={"sequence_parallel_size": 2, "num_workers": 2,
                                                                            "padding_free": True}), str(moe_dir))


@pytest.mark.slow
def test_options_through_a_real_pipeline_run(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """LD-DPO, WPO and pad_to_multiple_of through the Ray pipeline: the reference pool's weighted sums
    (cached under their own key) equal the trainer's at step 0 (the exactness guard), and it trains."""
    import json

    from conftest import make_config
    from raydpo.pipeline import run

    loss = {"type": "sigmoid", "beta": 0.1, "ld_alpha": 0.5, "use_weighting": True}
    cfg = make_config(tiny_model_dir, f"{synthetic_dir}/train.jsonl", tmp_path, loss=loss,
                      train={"num_workers": 1, "micro_batch_size": 8, "learning_rate": 1e-3, "max_steps": 6, "pad_to_multiple_of": 16,
                             "seed": 0})
    result = run(cfg)
    guard = json.load(open(tmp_path / "run" / "guard.json"))
    assert guard["ok"] and guard["max_token_drift"] < 1e-4, guard
    assert "ld_alpha=0.5" in json.load(open(result.summary["reference"]["train"]["entry"] + "/manifest.json"))["inputs"]["logps"]
    train = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    # WPO's weights are below 1, so the first loss is below ln 2 (the loss itself may then rise as the
    # weights grow with the policy's confidence); the implicit reward margin, 0 at step 1, grows.
    assert 0 < train[0]["loss"] < 0.6932 and abs(train[0]["rewards/margins"]) < 1e-6
    assert train[-1]["rewards/margins"] > 0.01, train[-1]
