"""raydpo.DPO, the in-process wrapper: real tiny transformers models (and a real peft adapter)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import raydpo
from raydpo.objectives import LOSSES
from raydpo.fixtures.synthetic import make_pairs


@pytest.fixture()
def model(tiny_model_dir):
    from raydpo.models import load_causal_lm

    return load_causal_lm(tiny_model_dir)


def encode(tokenizer, rows, side="right"):
    """Synthetic rows -> chosen [B, Tc] / rejected [B, Tr] padded with pad_id, prompt_lengths [B]."""
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]

    def padded(key):
        seqs = [p + tokenizer(r[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for p, r in zip(prompts, rows)]
        width = max(map(len, seqs))
        pad = lambda s: [tokenizer.pad_token_id] * (width - len(s)) + s if side == "left" else s + [tokenizer.pad_token_id] * (width - len(s))  # noqa: E731
        return torch.tensor([pad(s) for s in seqs])

    return padded("chosen"), padded("rejected"), torch.tensor([len(p) for p in prompts])


def train_steps(dpo, tokenizer, steps=4, lr=1e-2, seed=0):
    opt = torch.optim.AdamW(dpo.parameters(), lr=lr)
    rows = make_pairs(64, seed=seed)
    for i in range(steps):
        c, r, p = encode(tokenizer, rows[i * 8:(i + 1) * 8])
        out = dpo(c, r, prompt_lengths=p)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return out


def test_reference_is_frozen_and_outside_parameters_and_state_dict(model, tokenizer):
    dpo = raydpo.DPO(model, pad_id=tokenizer.pad_token_id)
    ref = dpo.ref_model
    assert ref is not model and not ref.training
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # parameters() / named_parameters() are exactly the policy's; the reference is not among them.
    assert [id(p) for p in dpo.parameters()] == [id(p) for p in model.parameters()]
    assert all(n.startswith("policy.") for n, _ in dpo.named_parameters())
    assert not {id(p) for p in ref.parameters()} & {id(p) for p in dpo.parameters()}
    assert set(dpo.state_dict()) == {f"policy.{k}" for k in model.state_dict()}
    dpo.train()
    train_steps(dpo, tokenizer)
    assert not ref.training, "dpo.train() must not put the reference in training mode"
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items()), "the reference changed"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(start[k], v)]
    assert len(changed) == len(start), "an optimizer over dpo.parameters() must update the whole policy"
    # The policy's state_dict round-trips into a fresh wrapper.
    from raydpo.models import load_causal_lm

    fresh = raydpo.DPO(load_causal_lm(dpo.policy.name_or_path))
    fresh.load_state_dict(dpo.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.policy.parameters(), model.parameters()))
    # .to() / .double() move the hidden reference too.
    dpo.double()
    assert next(ref.parameters()).dtype == torch.float64 == next(model.parameters()).dtype


def test_first_loss_is_ln2_with_zero_rewards(model, tokenizer):
    c, r, p = encode(tokenizer, make_pairs(8, seed=3))
    for loss_type in ("sigmoid", ["sigmoid", "sigmoid"]):
        out = raydpo.DPO(model, pad_id=tokenizer.pad_token_id, loss_type=loss_type)(c, r, prompt_lengths=p)
        want = math.log(2) * (1 if isinstance(loss_type, str) else 2)
        assert abs(out.loss.item() - want) < 1e-6
        assert torch.equal(out.chosen_rewards, torch.zeros(8)) and torch.equal(out.rejected_rewards, torch.zeros(8))
        assert float(out.metrics["rewards/accuracies"]) == 0.0
        assert float(out.metrics["logps/chosen"]) < 0 and float(out.metrics["logps/rejected"]) < 0


@torch.no_grad()
def test_padding_masks_layouts_and_widths_agree(model, tokenizer):
    """Right padding with auto masks, left padding, explicit masks over garbage pad ids and each pair
    alone unpadded all give the same per-pair log-probs; chosen and rejected widths differ."""
    dpo = raydpo.DPO(model, pad_id=tokenizer.pad_token_id)
    rows = make_pairs(6, seed=5)
    c, r, p = encode(tokenizer, rows)
    c = torch.cat([c, torch.full((len(rows), 3), tokenizer.pad_token_id)], 1)  # wider than r, extra padding
    base = dpo(c, r, prompt_lengths=p)
    left = dpo(*encode(tokenizer, rows, side="left")[:2], prompt_lengths=p)
    c_mask, r_mask = c != tokenizer.pad_token_id, r != tokenizer.pad_token_id
    garbage = lambda ids, m: torch.where(m, ids, torch.randint(5, 50, ids.shape))  # noqa: E731
    masked = raydpo.DPO(model)(garbage(c, c_mask), garbage(r, r_mask), prompt_lengths=p,
                               chosen_mask=c_mask, rejected_mask=r_mask)
    for other in (left, masked):
        assert torch.allclose(other.logps.policy_chosen, base.logps.policy_chosen, atol=1e-5)
        assert torch.allclose(other.logps.policy_rejected, base.logps.policy_rejected, atol=1e-5)
        assert torch.equal(other.logps.chosen_tokens, base.logps.chosen_tokens)
    for i in range(len(rows)):
        alone = dpo(c[i:i + 1, :int(c_mask[i].sum())], r[i:i + 1, :int(r_mask[i].sum())], prompt_lengths=p[i:i + 1])
        assert abs(float(alone.logps.policy_chosen[0] - base.logps.policy_chosen[i])) < 1e-5
        assert abs(float(alone.logps.policy_rejected[0] - base.logps.policy_rejected[i])) < 1e-5
    # The pad tokens count nowhere: completion tokens are the completions' lengths (+ EOS).
    lengths = [len(tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]) + 1 for row in rows]
    assert base.logps.chosen_tokens.tolist() == lengths
    # prompt_mask (x-transformers' form) means the same as prompt_lengths.
    prompt_mask = torch.arange(c.shape[1]) < p[:, None]
    assert torch.equal(dpo(c, r, prompt_mask=prompt_mask).logps.policy_chosen, base.logps.policy_chosen)


def test_target_aligned_mask_versus_x_transformers(model, tokenizer):
    """raydpo sums log p(token | prefix) over exactly the completion's tokens, each checked here with
    its own forward pass over its prefix. x-transformers applies the mask to the *inputs*
    (``mask[:, :-1]``): it drops the first completion token and scores the first pad token instead."""
    dpo = raydpo.DPO(model, pad_id=tokenizer.pad_token_id)
    c, r, p = encode(tokenizer, make_pairs(4, seed=7))
    ours = dpo(c, r, prompt_lengths=p).logps.policy_chosen
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        for i in range(c.shape[0]):
            seq = c[i][c[i] != pad].tolist()
            # By hand: one forward per completion token, over its prefix alone.
            def logp(prefix, token):
                return torch.log_softmax(model(torch.tensor([prefix])).logits[0, -1].double(), -1)[token].item()
            by_hand = sum(logp(seq[:t], seq[t]) for t in range(int(p[i]), len(seq)))
            assert abs(float(ours[i]) - by_hand) < 1e-4
            # x-transformers' convention: log-probs of seq[1:] from seq[:-1], mask = (ids != pad) & ~prompt
            # aligned to the inputs, so position t's mask decides whether token t+1 counts.
            ids = c[i:i + 1]
            if ids.shape[1] == len(seq):  # the longest row has no pad: give it one, as in a padded batch
                ids = torch.cat([ids, torch.tensor([[pad]])], 1)
            token = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1).gather(-1, ids[:, 1:, None])[0, :, 0]
            mask = (ids[0] != pad) & (torch.arange(ids.shape[1]) >= p[i])
            x_sum = float((token * mask[:-1]).sum())
            first = logp(seq[:int(p[i])], seq[int(p[i])])
            pad_after = logp(seq, pad)
            assert abs(x_sum - (by_hand - first + pad_after)) < 1e-4
            assert abs(x_sum - by_hand) > 1e-2, "the two conventions should differ visibly"


def test_peft_adapter_disabled_reference_equals_copied_reference(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    copied = copy.deepcopy(peft_model)  # the policy as wrapped (adapters at their zero start)
    dpo = raydpo.DPO(peft_model, pad_id=tokenizer.pad_token_id)
    assert dpo.ref_model is None and dpo.uses_reference  # no second copy
    assert all(n.startswith("policy.") for n, _ in dpo.named_parameters())
    train_steps(dpo, tokenizer, steps=4, lr=1e-2)
    c, r, p = encode(tokenizer, make_pairs(8, seed=9))
    out = dpo(c, r, prompt_lengths=p)
    with_copy = raydpo.DPO(peft_model, pad_id=tokenizer.pad_token_id, ref_model=copied)(c, r, prompt_lengths=p)
    assert torch.allclose(out.logps.ref_chosen, with_copy.logps.ref_chosen, atol=1e-6, rtol=0)
    assert torch.allclose(out.logps.ref_rejected, with_copy.logps.ref_rejected, atol=1e-6, rtol=0)
    assert (out.logps.policy_chosen - out.logps.ref_chosen).abs().max() > 1e-3, "the adapter did not train"
    assert dpo.policy.training, "the reference pass must leave the policy's mode as it was"
    with pytest.warns(UserWarning, match="already trained"):
        raydpo.DPO(peft_model)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_registry_loss_trains_the_policy_only(model, tokenizer, loss_type):
    extra = {"label_smoothing": 0.1} if loss_type == "exo_pair" else {}
    dpo = raydpo.DPO(model, pad_id=tokenizer.pad_token_id, loss_type=loss_type, **extra)
    assert dpo.uses_reference == (loss_type not in ("simpo", "orpo", "sft"))
    c, r, p = encode(tokenizer, make_pairs(4, seed=11))
    out = dpo(c, r, prompt_lengths=p)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(q.grad is not None for q in dpo.parameters())
    if dpo.ref_model is not None:
        assert all(q.grad is None for q in dpo.ref_model.parameters())


def test_precomputed_reference_logps_replace_the_reference_pass(model, tokenizer):
    dpo = raydpo.DPO(model, pad_id=tokenizer.pad_token_id)
    train_steps(dpo, tokenizer, steps=2)
    c, r, p = encode(tokenizer, make_pairs(4, seed=13))
    run = dpo(c, r, prompt_lengths=p)
    given = dpo(c, r, prompt_lengths=p, ref_chosen_logps=run.logps.ref_chosen, ref_rejected_logps=run.logps.ref_rejected)
    assert torch.equal(given.losses, run.losses)


def test_bad_inputs_are_refused_with_their_reason(model, tokenizer):
    dpo = raydpo.DPO(model, pad_id=tokenizer.pad_token_id)
    c, r, p = encode(tokenizer, make_pairs(4, seed=15))
    with pytest.raises(ValueError, match="exactly one of prompt_mask"):
        dpo(c, r)
    other = c.clone()
    other[2, 1] = (other[2, 1] + 1) % 50 + 4
    with pytest.raises(ValueError, match="pair 2 has different prompt tokens"):
        dpo(other, r, prompt_lengths=p)
    with pytest.raises(ValueError, match="pair 0 has no completion token"):
        dpo(c, r, prompt_lengths=torch.full_like(p, 40))
    with pytest.raises(ValueError, match="empty prompt"):
        dpo(c, r, prompt_lengths=torch.zeros_like(p))
    with pytest.raises(ValueError, match="ref_model is the policy itself"):
        raydpo.DPO(model, ref_model=model)
    with pytest.raises(ValueError, match="uses no reference"):
        raydpo.DPO(model, loss_type="simpo", ref_model=copy.deepcopy(model))
    with pytest.raises(raydpo.ConfigError, match="loss.label_smoothing"):
        raydpo.DPO(model, label_smoothing=0.7)
    with pytest.raises(raydpo.ConfigError, match="unknown key"):
        raydpo.DPO(model, bta=0.2)


def test_custom_loop_example_raises_reward_accuracy():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "custom_loop.py")
    spec = importlib.util.spec_from_file_location("custom_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main([])
    accuracies = [h["rewards/accuracies"] for h in history]
    assert accuracies[0] == 0.0 and abs(history[0]["loss"] - math.log(2)) < 1e-6
    assert accuracies[-1] > 0.9 and history[-1]["loss"] < history[0]["loss"] - 0.05


def test_agrees_with_the_ray_pipeline_loss(ray_cluster, tiny_model_dir, tmp_path, tokenizer):
    """The same 8 pairs through the Ray pipeline (tokenize on Ray Data, reference log-probs from the actor
    pool, one DeepSpeed step) and through DPO: equal loss and metrics (float32). The reference is another
    model, so the numbers are not the trivial ln 2."""
    import ray

    from raydpo.pipeline.datasets import score_pairs, tokenize_pairs, train_on_pairs
    from raydpo.models import load_causal_lm
    from raydpo.fixtures.tiny import TinyModelSpec, write_tiny_model

    from conftest import make_config

    ref_dir = write_tiny_model(tmp_path / "ref", TinyModelSpec(seed=1), tokenizer=tokenizer)
    cfg = make_config(tiny_model_dir, [], tmp_path,
                      # share_prompt off: the pool scores the padded batch DPO builds (packing moves sums by ~1e-6)
                      reference={"name_or_path": ref_dir, "guard": False, "share_prompt": False}, loss={"beta": 1.0},
                      train={"num_workers": 1, "zero_stage": 0, "micro_batch_size": 8, "max_steps": 1, "log_every": 1})
    rows = make_pairs(8, seed=17)
    random.Random(0).shuffle(rows)
    pairs = tokenize_pairs(ray.data.from_items(rows), cfg)
    result = train_on_pairs(score_pairs(pairs, cfg), cfg)
    (step1,) = [m for m in result.metrics if m.get("step") == 1 and "loss" in m]

    tok = pairs.take_all()
    seqs = lambda key: [list(t["prompt_ids"]) + list(t[key]) for t in tok]  # noqa: E731
    def padded(s):
        width = max(map(len, s))
        ids = torch.tensor([x + [0] * (width - len(x)) for x in s])
        return ids, torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in s])
    (c, c_mask), (r, r_mask) = padded(seqs("chosen_ids")), padded(seqs("rejected_ids"))
    dpo = raydpo.DPO(load_causal_lm(tiny_model_dir), beta=1.0, ref_model=load_causal_lm(ref_dir))
    out = dpo(c, r, chosen_mask=c_mask, rejected_mask=r_mask, prompt_lengths=[len(t["prompt_ids"]) for t in tok])
    assert out.chosen_rewards.abs().min() > 1e-2  # a real reference gap, not policy == reference
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "rewards/accuracies"):
        assert abs(float(out.metrics[key]) - step1[key]) < 1e-6 * max(1.0, abs(step1[key])), key


@pytest.mark.slow
def test_train_on_pairs_stops_on_log_probs_that_are_not_the_references(ray_cluster, tiny_model_dir, tmp_path):
    """Log-probs computed elsewhere that do not match the reference: ``train_on_pairs`` raises the
    exactness guard's own message (no cache entry to name), before any update."""
    import ray

    from raydpo.pipeline.datasets import score_pairs, tokenize_pairs, train_on_pairs
    from raydpo.train.guard import GuardError

    from conftest import make_config

    cfg = make_config(tiny_model_dir, [], tmp_path, loss={"beta": 0.1},
                      train={"num_workers": 1, "zero_stage": 0, "micro_batch_size": 8, "max_steps": 1, "log_every": 1})
    pairs = tokenize_pairs(ray.data.from_items(make_pairs(8, seed=3)), cfg)
    import pyarrow.compute as pc

    def shift(t):  # log-probs "from elsewhere": 3 nats off per chosen sequence
        return t.set_column(t.schema.get_field_index("ref_chosen_logps"), "ref_chosen_logps", pc.subtract(t["ref_chosen_logps"], 3.0))

    shifted = score_pairs(pairs, cfg).map_batches(shift, batch_format="pyarrow")
    with pytest.raises(GuardError, match="exactness guard: the reference log-probs given with the pairs differ .* score the pairs"):
        train_on_pairs(shifted, cfg)
