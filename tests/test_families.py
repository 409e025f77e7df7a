"""The model-family matrix: every family of ``raydpo.fixtures.families.FAMILIES`` on real hh-rlhf pairs.

Each family's tiny random model is written once (a module-scoped fixture) and checked against plain
transformers on the same hh-rlhf rows (implicit prompts, sequences up to ``MAX_LENGTH`` tokens: past
the 24-token sliding windows of mistral, mixtral and gemma, with long prompts filtered and long
completions cut):

1. tokens: the data stage (Ray Data) gives what ``AutoTokenizer`` gives for prompt + completion +
   EOS, split TRL's way (the completion is what follows the common prefix), cut to ``max_length``;
2. reference log-probs from the Ray Data actor pool, packed (``reference.share_prompt``) and
   concatenated, equal a plain float32 forward of each sequence alone (1e-4 per completion token);
3. every trainer layout gives the padded batch's log-probs, DPO loss and every gradient: padding-free
   rows (where ``padding_free_issue`` names a reason (opt) they differ, and the run refuses them,
   6.), and shared-prompt units (``train.share_prompt``), padded or several a row, chunked or full logits;
4. LoRA on all linear layers: only adapters train, DPO steps move them, the adapter-disabled model
   stays the base; and the policy's dropout is off in train mode (``model.disable_dropout``);
5. (slow) a real 2-step run on Ray Train + DeepSpeed, for one family of each trait that matters to
   the trainer (:data:`E2E_RUNS`): the exactness guard passes and the exported model loads as the
   family's own class;
6. ``train.padding_free=true`` on a refused family fails before any stage, naming both.
"""

import gzip
import json
import math
import os
import re
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import SHARED_DATA, make_config
from raydpo.families.rules import padding_free_issue
from raydpo.fixtures.families import FAMILIES, write_family_model

HH = os.path.join(SHARED_DATA, "harmless-base-test.jsonl.gz")
#: Rows of harmless-base-test: 0's prompt alone is longer than MAX_LENGTH (filtered, prompt_too_long);
#: 4, 13, 26, 65, 89 and 110 run past it (cut); 10, 51, 80 and 148 have digits (Qwen2 splits them).
ROWS = (0, 4, 9, 10, 13, 26, 33, 39, 51, 65, 80, 89, 110, 148)
#: Two more short rows: the eval split of the end-to-end runs of EVAL_RUNS.
EVAL_ROWS = (64, 75)
MAX_LENGTH = 112
MARKER = "\n\nAssistant:"
TOL = 1e-4  # per completion token
#: Families whose end-to-end run uses 2 workers, ZeRO-2 sharding the experts' gradients (the others: 1
#: worker; a run costs ~35 s on 2 cores with 1 worker, ~60 s with 2).
TWO_WORKERS = ("mixtral",)
#: End-to-end runs with an eval split (the engine trains in train mode after evaluating at step 0): the
#: two-worker runs, which split it, and opt, the one family whose config has a dropout (0.1).
EVAL_RUNS = TWO_WORKERS + ("opt",)
#: Families with an end-to-end run (~40 s each): a plain decoder, layer types, sliding windows,
#: soft-capping, tied and learned positions, a padding-free refusal, MoE. The other five share those
#: code paths; their tokens, reference, padding-free and LoRA numbers are checked above.
E2E_RUNS = ("llama", "qwen2", "mistral", "gemma2", "gpt2", "opt", "mixtral")

pytestmark = pytest.mark.skipif(not os.path.exists(HH), reason="../shared/data (hh-rlhf) is not present in this checkout")


def split_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf's implicit prompt: up to the last assistant marker inside the common prefix."""
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(MARKER, 0, common) + len(MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def trl_tokens(tok, row: dict):
    """(prompt, chosen, rejected) ids as TRL makes them, or None when the prompt alone fills MAX_LENGTH:
    prompt + completion + EOS tokenized whole, the prompt the common prefix of both with the prompt's
    own tokenization, each sequence keeping its first MAX_LENGTH tokens."""
    p, c, r = split_prompt(row["chosen"], row["rejected"])
    full_c, full_r = (tok(p + x + tok.eos_token)["input_ids"] for x in (c, r))
    prompt = tok(p)["input_ids"]
    k = min(common_prefix(prompt, full_c), common_prefix(prompt, full_r))
    return None if k >= MAX_LENGTH else (full_c[:k], full_c[k:MAX_LENGTH], full_r[k:MAX_LENGTH])


@torch.no_grad()
def plain_logps(model, prompt, completion) -> float:
    """Sum of log p(completion token | prefix) from one unpadded forward of the sequence alone."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[max(len(prompt) - 1, 0):].sum())


def columns(triples) -> tuple[list, list, list]:
    return tuple([list(t[i]) for t in triples] for i in range(3))


def dpo_loss(model, batch, ref, chunk=None):
    """(logps [2B], mean sigmoid DPO loss) of a collated batch against reference sums ``ref``."""
    from raydpo.config import LossConfig
    from raydpo.logprobs import forward_logps
    from raydpo.objectives import preference_loss

    logps = forward_logps(model, batch, chunk)
    _, (losses, _, _), _ = preference_loss(logps, batch["completion_tokens"], ref, LossConfig(beta=0.1))
    return logps, losses.mean()


def family_config(fam, tag: str, **sections):
    """conftest's config for this family's model and rows, writing under ``<family dir>/<tag>``."""
    base = {"data": {"max_length": MAX_LENGTH}, "reference": {"batch_size": 8}, "logging": {"console": "quiet"}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return make_config(fam.path, fam.data, fam.root / tag, **base)


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    with gzip.open(HH, "rt") as f:
        lines = f.read().splitlines()
    out = tmp_path_factory.mktemp("hh")
    for name, picked in (("pairs", ROWS), ("eval", EVAL_ROWS)):
        (out / f"{name}.jsonl").write_text("".join(lines[i] + "\n" for i in picked))
    return [json.loads(lines[i]) for i in ROWS], str(out / "pairs.jsonl"), str(out / "eval.jsonl")


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory, hh):
    """One family: its tiny model on disk, AutoTokenizer, the float32 base in eval mode, TRL's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = request.param
    root = tmp_path_factory.mktemp(name)
    path = write_family_model(root / "model", name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [trl_tokens(tok, row) for row in hh[0]]
    return types.SimpleNamespace(name=name, path=path, root=root, tok=tok, model=model, rows=hh[0], data=hh[1],
                                 eval_data=hh[2], expected=expected, kept=[e for e in expected if e is not None])


@pytest.fixture(scope="module")
def pairs(fam, ray_cluster):
    """The family's rows through raydpo's data stage (Ray Data tokenizer actors): kept pairs."""
    import ray.data

    import raydpo

    return raydpo.tokenize_pairs(ray.data.from_items(fam.rows), family_config(fam, "data"))


def test_data_stage_tokens_are_autotokenizers(fam, pairs):
    got = pairs.take_all()
    kept = [i for i, e in enumerate(fam.expected) if e is not None]
    assert [int(r["index"]) for r in got] == kept
    for row, i in zip(got, kept):
        p, c, r = fam.expected[i]
        assert list(row["prompt_ids"]) + list(row["chosen_ids"]) == p + c, (fam.name, ROWS[i])
        assert list(row["prompt_ids"]) + list(row["rejected_ids"]) == p + r, (fam.name, ROWS[i])
        assert list(row["prompt_ids"]) == p, (fam.name, ROWS[i])
    # The rows do what they are picked for with this tokenizer: one filtered, some cut, all past the windows.
    assert 0 < len(kept) < len(fam.expected)
    assert sum(len(p) + len(c) == MAX_LENGTH for p, c, _ in fam.kept) >= 3
    assert min(len(p) + len(c) for p, c, _ in fam.kept) > 24


@pytest.fixture(scope="module")
def scored(fam, pairs):
    """{share_prompt: scored rows} from raydpo.score_pairs, both variants at once (two Ray Data
    executions: the actors' start-up, mostly torch and transformers imports, overlaps)."""
    import raydpo

    def score(share_prompt: bool):
        # Its own cache dir: the key does not include share_prompt, so a shared one would hit the other variant.
        cache = fam.root / f"cache-{share_prompt}"
        cfg = family_config(fam, f"ref-{share_prompt}", reference={"cache_dir": str(cache), "share_prompt": share_prompt})
        rows = raydpo.score_pairs(pairs, cfg).take_all()
        return rows, len([e for e in cache.iterdir() if e.is_dir()])

    with ThreadPoolExecutor(2) as pool:
        return dict(zip((True, False), pool.map(score, (True, False))))


@pytest.mark.parametrize("share_prompt", [True, False], ids=["packed", "concatenated"])
def test_reference_logps_equal_plain_forward(fam, scored, share_prompt):
    from raydpo.reference.scorer import HfBackend

    scored, entries = scored[share_prompt]
    assert entries == 1  # scored into a fresh cache dir, not read from another variant's entry
    # The actors' start-up probe decides the path: packed rows must be taken where asked for.
    assert HfBackend(fam.path, "float32", fam.tok.pad_token_id, share_prompt=share_prompt).packed is share_prompt
    assert len(scored) == len(fam.kept)
    worst = 0.0
    for row in scored:
        for side in ("chosen", "rejected"):
            want = plain_logps(fam.model, row["prompt_ids"], row[f"{side}_ids"])
            worst = max(worst, abs(float(row[f"ref_{side}_logps"]) - want) / len(row[f"{side}_ids"]))
    assert worst <= TOL, f"{fam.name}: reference drifts {worst:.3g} per token from a plain forward"


def test_dropout_is_off_in_train_mode(fam):
    """model.disable_dropout (the default): two train-mode forwards of the policy are the eval forward."""
    from raydpo.models import load_causal_lm

    model = load_causal_lm(fam.path).train()
    ids = torch.tensor([fam.kept[0][0] + fam.kept[0][1]])
    with torch.no_grad():
        a, b, want = model(input_ids=ids).logits, model(input_ids=ids).logits, fam.model(input_ids=ids).logits
    assert torch.equal(a, b) and torch.allclose(a, want, atol=1e-5), f"{fam.name}: dropout is still on in train mode"


def layout_grads(model, batch, ref, chunk):
    """(logps [2B], DPO loss, every parameter's gradient) of one forward and backward of ``batch``."""
    model.zero_grad()
    logps, loss = dpo_loss(model, batch, ref, chunk)
    loss.backward()
    return logps.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


#: Each layout the trainer can give a micro-batch, against the padded batch: (padding_free, share_prompt, chunk).
LAYOUTS = {"padding-free": (True, False, None), "shared": (False, True, None), "shared-full-logits": (False, True, 0),
           "shared-padding-free": (True, True, None)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_equal_padded(fam, layout):
    """Log-probs, DPO loss and every gradient of each trainer layout equal the padded batch's (1e-5):
    padding-free rows, and one shared-prompt unit per pair (train.share_prompt), alone or several a
    row, with chunked or full logits."""
    from raydpo.config import Config
    from raydpo.config.rules import share_prompt_issue
    from raydpo.data.collate import collate_pairs, collate_rows
    from raydpo.logprobs import forward_logps, split_pairs
    from raydpo.models import load_causal_lm

    padding_free, share, chunk = LAYOUTS[layout]
    issue = padding_free_issue(fam.model.config.model_type) if padding_free else None
    # Every family of the matrix shares the prompt (MoE ones with their router loss too: it weighs a
    # shared prompt twice, as the padded batch computes it, tests/test_router.py).
    assert share_prompt_issue(Config(), fam.model.config) is None
    # Train mode, as the trainer runs it (dropout is off: test_dropout_is_off_in_train_mode); eval mode
    # where padding-free is refused, so the difference shown is the packing's alone.
    model = load_causal_lm(fam.path).train(not issue)
    cols, pad = columns(fam.kept), fam.tok.pad_token_id
    raw = dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), cols))
    padded = collate_pairs(*cols, pad)
    other = collate_rows(raw, pad, padding_free=padding_free, share_prompt_width=4096 if share else 0)
    assert ("segments" in other) is share and other["input_ids"].numel() < padded["input_ids"].numel()
    assert torch.equal(padded["completion_tokens"], other["completion_tokens"])
    with torch.no_grad():  # a reference away from the policy, so every pair's loss has its own slope
        ref = split_pairs(forward_logps(fam.model, padded) + torch.linspace(-2, 2, padded["input_ids"].shape[0]))
    lp_a, loss_a, grads_a = layout_grads(model, padded, ref, None)
    lp_b, loss_b, grads_b = layout_grads(model, other, ref, chunk)
    if issue and not share:
        # Why it is refused: this family's decoder lets packed sequences attend to each other.
        assert (lp_a - lp_b).abs().max() > 1e-2, f"{fam.name}: padding-free now matches padded; revisit padding_free_issue"
        return
    assert torch.allclose(lp_a, lp_b, atol=1e-5, rtol=1e-6), (lp_a - lp_b).abs().max()  # sums of ~100 tokens
    assert torch.allclose(loss_a, loss_b, atol=1e-5), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    bad = {n: float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a
           if not torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4)}
    assert not bad, f"{fam.name}: gradients differ: {bad}"


def test_lora_all_linear_trains_adapters_only(fam):
    from transformers.pytorch_utils import Conv1D

    from raydpo.config import LoraConfig, ModelConfig
    from raydpo.data.collate import collate_pairs
    from raydpo.logprobs import forward_logps, split_pairs
    from raydpo.train.policy import build_policy

    lora = LoraConfig(r=4, alpha=8.0, target_modules=["all-linear"])
    policy = build_policy(ModelConfig(name_or_path=fam.path, lora=lora), fam.path)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)[:5]
    head = fam.model.get_output_embeddings()
    linear = {n for n, m in fam.model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
    adapted = {re.sub(r"^base_model\.model\.", "", n.split(".lora_A.")[0]) for n in trainable if ".lora_A." in n}
    # Every linear layer but the head (peft also adapts MoE routers and fused expert weights where it can).
    assert linear <= adapted and not any(n == "lm_head" or "embed" in n for n in adapted), sorted(linear - adapted)[:5]

    batch = collate_pairs(*columns(fam.kept[:4]), fam.tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        base = fam.model(**inputs).logits
        ref = split_pairs(forward_logps(fam.model, batch))
        policy.eval()
        assert torch.allclose(policy(**inputs).logits, base, atol=1e-5)  # adapters start at zero
        with policy.disable_adapter():
            assert torch.allclose(policy(**inputs).logits, base, atol=1e-5)
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        _, loss = dpo_loss(policy, batch, ref)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(2)) < 1e-5  # step 0: policy == reference
    assert losses[-1] < losses[0] - 1e-3, losses
    policy.eval()
    with torch.no_grad():
        assert not torch.allclose(policy(**inputs).logits, base, atol=1e-4)
        with policy.disable_adapter():
            assert torch.allclose(policy(**inputs).logits, base, atol=1e-5)  # the base itself never moved


@pytest.mark.slow
def test_end_to_end_run(fam, ray_cluster):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import raydpo

    if fam.name not in E2E_RUNS:
        pytest.skip(f"{fam.name} shares the trainer's code paths with the families of E2E_RUNS")
    workers, n_eval = 2 if fam.name in TWO_WORKERS else 1, len(EVAL_ROWS) if fam.name in EVAL_RUNS else 0
    padding_free = padding_free_issue(fam.model.config.model_type) is None
    # The packed reference's cache dir: the train split is a hit after test_reference_logps_equal_plain_forward.
    cfg = family_config(fam, "run", reference={"cache_dir": str(fam.root / "cache-True")},
                        data={"eval": [fam.eval_data] if n_eval else []},
                        train={"num_workers": workers, "zero_stage": 2, "micro_batch_size": 2, "max_steps": 2,
                               "learning_rate": 1e-3, "seed": 0, "padding_free": padding_free})
    result = raydpo.run(cfg)
    assert result.summary["steps"] == 2 and result.summary["eval_pairs_evaluated"] == n_eval
    assert result.summary["rows_used"] == len(fam.kept) + n_eval
    with open(os.path.join(result.output_dir, "guard.json")) as f:
        guard = json.load(f)
    assert guard["ok"] and guard["max_token_drift"] <= TOL, guard
    model = AutoModelForCausalLM.from_pretrained(result.model_path, dtype=torch.float32).eval()
    assert type(model) is type(fam.model)
    ids = torch.tensor([fam.kept[0][0] + fam.kept[0][1]])
    with torch.no_grad():
        logits, before = model(input_ids=ids).logits, fam.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, before, atol=1e-5)  # it trained
    exported = AutoTokenizer.from_pretrained(result.model_path)
    text = fam.rows[1]["chosen"]
    assert type(exported) is type(fam.tok) and exported(text)["input_ids"] == fam.tok(text)["input_ids"]


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if padding_free_issue(f.model_type)])
def test_padding_free_refused_before_any_stage(name, hh, ray_cluster, tmp_path):
    import raydpo

    fam = types.SimpleNamespace(path=write_family_model(tmp_path / "model", name), data=hh[1], root=tmp_path)
    with pytest.raises(ValueError, match="padding_free") as err:
        raydpo.run(family_config(fam, "out", train={"padding_free": True, "num_workers": 1, "max_steps": 2}))
    assert re.search(rf"\b{name}\b", str(err.value)), str(err.value)
    run = tmp_path / "out" / "run"
    assert not any((run / f).exists() for f in ("quarantine.jsonl", "metrics.jsonl", "summary.json", "model"))
    assert not (tmp_path / "out" / "cache").exists() or not any((tmp_path / "out" / "cache").iterdir())
