"""The MoE router (load-balancing) loss counts exactly the padded batch's tokens in every layout
(raydpo.logprobs.router), on tiny random Mixtral and Qwen2-MoE models.

TRL's DPOTrainer computes it on the concatenated [2B, T] batch with its attention mask: the model's
own ``aux_loss``. raydpo's padding-free rows, shared-prompt units (alone or several a row) and
sequence-parallel shards compute other token sets; each must give that loss within 1e-6, and the
whole step (DPO + router loss) the same loss and gradients. The sequence-parallel case trains on two
ranks against one in tests/test_long_context.py::test_sequence_parallel_trains_to_the_same_weights.
"""

from __future__ import annotations

import pytest
import torch

from raydpo.config import LossConfig
from raydpo.data.collate import collate_pairs, collate_rows
from raydpo.logprobs import forward_scores

MOE = ("mixtral", "qwen2_moe")
#: The trainer's layouts besides the padded one: collate_rows arguments and model.logits_chunk_tokens.
LAYOUTS = {"padding-free": ({"padding_free": True}, None), "padding-free full logits": ({"padding_free": True}, 0),
           "shared": ({"share_prompt_width": 4096}, None), "shared full logits": ({"share_prompt_width": 4096}, 0),
           "shared padding-free": ({"padding_free": True, "share_prompt_width": 4096}, None)}
COEF = 0.5


def random_pairs(n: int = 6, seed: int = 3) -> dict:
    """Pairs of mixed prompt and completion lengths over the tiny vocabulary (ids 5-199)."""
    g = torch.Generator().manual_seed(seed)
    cols = [[torch.randint(5, 200, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
            for lo, hi in ((3, 30), (1, 25), (1, 25))]
    return dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), cols))


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory):
    """(family name, its tiny model in train mode: dropout is off in raydpo's models)."""
    from raydpo.fixtures.families import write_family_model
    from raydpo.models import load_causal_lm

    path = write_family_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return request.param, load_causal_lm(path).train()


def own_aux_loss(model, batch: dict, mask: bool = True) -> torch.Tensor:
    """The model's own router loss on a batch (``mask``: given the batch's attention mask)."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")} | ({"attention_mask": batch["attention_mask"]} if mask else {})
    with torch.no_grad():
        return model(**inputs, output_router_logits=True).aux_loss


def step(model, batch: dict, chunk) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(router loss, DPO + COEF * router loss, every gradient) of one trainer step on ``batch``."""
    from raydpo.train.step import step_metrics

    b = len(random_pairs()["prompt_ids"])
    batch = batch | {"ref_chosen_logps": torch.linspace(-60, -40, b), "ref_rejected_logps": torch.linspace(-45, -65, b)}
    model.zero_grad()
    loss, sums, _ = step_metrics(model, batch, LossConfig(beta=0.5, router_aux_loss_coef=COEF), chunk)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums["aux_loss"].detach() / sums["count"], loss.detach(), grads


def test_the_padded_batch_gives_the_models_own_loss(moe):
    """raydpo's sums on the padded batch are transformers' own loss (the one TRL adds); the model's
    own loss on padding-free rows, with no mask, counts the fillers: the gap this closes."""
    from raydpo.logprobs.router import router_loss_issue, standard_router_loss

    name, model = moe
    assert standard_router_loss(type(model)) and router_loss_issue(model.config) is None
    raw = random_pairs()
    padded = collate_pairs(raw["prompt_ids"], raw["chosen_ids"], raw["rejected_ids"], 0)
    own = own_aux_loss(model, padded)
    for chunk in (None, 0):
        with torch.no_grad():
            ours = forward_scores(model, padded, chunk, router_logits=True).aux_loss
        assert abs(ours.item() - own.item()) < 1e-7, (name, chunk, ours.item(), own.item())
    packed = collate_rows(raw, 0, padding_free=True)
    assert abs(own_aux_loss(model, packed, mask=False).item() - own.item()) > 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_padded_loss_and_gradients(moe, layout):
    name, model = moe
    raw = random_pairs()
    kwargs, chunk = LAYOUTS[layout]
    aux_a, loss_a, grads_a = step(model, collate_pairs(raw["prompt_ids"], raw["chosen_ids"], raw["rejected_ids"], 0), None)
    other = collate_rows(raw, 0, **kwargs)
    assert other["input_ids"].numel() < 2 * len(raw["prompt_ids"]) * max(
        len(p) + max(len(c), len(r)) for p, c, r in zip(*raw.values()))
    aux_b, loss_b, grads_b = step(model, other, chunk)
    assert abs(aux_a - aux_b) < 1e-6 and abs(loss_a - loss_b) < 1e-6, (name, layout, aux_a, aux_b, loss_a, loss_b)
    gates = {n for n in grads_a if "gate" in n and "proj" not in n}
    assert gates and all(grads_a[n].abs().sum() > 0 for n in gates)  # the router loss reaches the routers
    assert grads_a.keys() == grads_b.keys()
    bad = {n: float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a
           if not torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4)}
    assert not bad, f"{name} {layout}: gradients differ: {bad}"


def test_a_config_saved_with_router_logits_on_still_shares_the_prompt(moe):
    """``output_router_logits: true`` in a saved config would make the model compute its own loss,
    which reads the shared rows' [R, T, T] mask as [R, T] and fails: raydpo turns it off there."""
    name, model = moe
    raw = random_pairs()
    want, _, _ = step(model, collate_pairs(raw["prompt_ids"], raw["chosen_ids"], raw["rejected_ids"], 0), None)
    model.config.output_router_logits = True
    try:
        got, _, _ = step(model, collate_rows(raw, 0, share_prompt_width=4096), None)
    finally:
        model.config.output_router_logits = False
    assert abs(got - want) < 1e-6, (name, got, want)


def test_a_lora_policy_has_the_standard_loss(moe, tmp_path):
    """A LoRA policy (a PeftModel around the MoE model) is recognised as the model it wraps: the
    padding-free step gives the padded router loss, not the fillers' (nor a failure)."""
    from raydpo.config import LoraConfig, ModelConfig
    from raydpo.logprobs.router import RouterLoss
    from raydpo.train.policy import build_policy

    name, model = moe
    path = str(tmp_path / name)
    model.save_pretrained(path)
    policy = build_policy(ModelConfig(name_or_path=path, lora=LoraConfig(r=4, target_modules=["all-linear"])), path)
    assert type(policy).__module__.startswith("peft") and RouterLoss(policy).standard
    raw = random_pairs()
    aux_a, _, _ = step(policy, collate_pairs(raw["prompt_ids"], raw["chosen_ids"], raw["rejected_ids"], 0), None)
    aux_b, _, _ = step(policy, collate_rows(raw, 0, padding_free=True), None)
    assert abs(aux_a - aux_b) < 1e-6 and abs(aux_a - own_aux_loss(model, collate_rows(raw, 0))) < 1e-6


def test_a_model_with_its_own_loss_keeps_it_on_padded_batches_only(moe, tmp_path):
    """A class whose module does not hold transformers' standard loss (here a subclass defined in
    this test module) is trained with its own ``aux_loss``; the preflight refuses padding-free rows
    and sequence parallelism for it, and the prompt is not shared."""
    from conftest import make_config
    from raydpo.config import Config
    from raydpo.config.rules import share_prompt_issue
    from raydpo.logprobs.router import standard_router_loss
    from raydpo.train.preflight import check_router_aux

    name, model = moe
    own_class = type("OwnLoss", (type(model),), {"__module__": __name__})
    other = own_class(model.config)
    other.load_state_dict(model.state_dict())
    other.train()
    assert not standard_router_loss(own_class)
    padded = collate_rows(random_pairs(), 0)
    with torch.no_grad():
        assert forward_scores(other, padded, None, router_logits=True).aux_loss.item() == own_aux_loss(other, padded).item()

    from transformers import AutoConfig

    doge = tmp_path / "doge"  # transformers' Doge: an MoE config whose model has a loss of its own
    AutoConfig.for_model("doge").save_pretrained(doge)
    for train in ({"padding_free": True}, {"sequence_parallel_size": 2, "num_workers": 2}):
        with pytest.raises(ValueError, match="DogeForCausalLM computes its own router loss"):
            check_router_aux(make_config(str(doge), "pairs.jsonl", tmp_path, train=train), str(doge))
    check_router_aux(make_config(str(doge), "pairs.jsonl", tmp_path), str(doge))
    assert "its own router loss" in share_prompt_issue(Config(), AutoConfig.from_pretrained(doge))
    assert share_prompt_issue(Config(), model.config) is None  # the standard loss: the prompt is shared
