"""KTO against TRL's own code: the loss (``KTOTrainer._compute_loss``), the data (``_prepare_dataset``:
unpairing, tokens, KL pairing), bad input, and a real Ray pipeline run that learns the synthetic task."""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raydpo.config import LossConfig
from raydpo.data.unpaired import group_bounds, kl_completions, parse_examples
from raydpo.objectives import mean_metrics, preference_loss

from test_losses_trl import B, T, random_batch  # noqa: E402

kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")



def random_examples(seed: int):
    """test_losses_trl's random batch read as B completions and their B KL sequences: per-token policy
    log-probs [2B, T-1], masks [2B, T], reference sums [2B]; plus labels [B] (both kinds present)."""
    per_token, mask, ref_first, ref_second = random_batch(seed)
    labels = torch.tensor([bool((i * 7 + seed) % 3) for i in range(B)])
    return per_token, mask, torch.cat([ref_first, ref_second]), labels


def trl_kto(per_token, mask, ref, labels, p: LossConfig, other_rank_kl=None, loss_type="kto"):
    """TRL's KTO loss and metrics for this batch; ``other_rank_kl``: a second process's KL estimate,
    which TRL's ``gather_for_metrics`` stacks with this one's."""
    def gather(x):
        x = torch.as_tensor(x)
        if other_rank_kl is not None and x.dim() == 0 and x.dtype.is_floating_point and gather.kl_pending:
            gather.kl_pending = False  # the first float gathered is the KL estimate
            return torch.stack([x, torch.as_tensor(other_rank_kl, dtype=x.dtype)])
        return x
    gather.kl_pending = True
    zeros = torch.zeros(B, T - 1, dtype=per_token.dtype)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather_for_metrics=gather),
        aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=loss_type == "kto", loss_type=loss_type, beta=p.beta,
        desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: per_token[B:].sum(-1),
    )

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token[:B], entropy=zeros, mean_logits=zeros)

    inputs = {"input_ids": torch.ones(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
              "completion_mask": mask[:B], "label": labels, "ref_logps": ref[:B], "ref_KL_logps": ref[B:]}
    loss = kto_trainer.KTOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def ours(per_token, mask, ref, labels, p: LossConfig, kl_reduce=None):
    logps, counts = per_token.sum(1), mask[:, 1:].sum(1).to(per_token.dtype)
    x, (losses, _, _), sums = preference_loss(logps, counts, (ref[:B], ref[B:]), p, labels, kl_reduce)
    return losses.mean(), mean_metrics({k: float(v) for k, v in sums.items()})


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7)])
def test_unpaired_losses_and_metrics_equal_trl(loss_type, seed, beta, wd, wu):
    p = LossConfig(type=loss_type, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    batch = random_examples(seed)
    expected, trl_metrics = trl_kto(*batch, p, loss_type=loss_type)
    loss, metrics = ours(*batch, p)
    assert torch.allclose(loss, expected, atol=1e-12, rtol=1e-12)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        # Metric sums are float32 (they are all-reduced as one float32 tensor); the loss is exact.
        assert abs(metrics[key] - trl_metrics[key]) < 1e-6 * max(1.0, abs(trl_metrics[key])), key


def test_kto_kl_is_averaged_over_ranks_as_trl_gathers_it():
    p = LossConfig(type="kto", beta=0.3)
    batch = random_examples(5)
    other = 7.5  # another rank's (large) KL estimate moves this rank's loss
    expected, trl_metrics = trl_kto(*batch, p, other_rank_kl=other)
    loss, metrics = ours(*batch, p, kl_reduce=lambda kl: (kl + other) / 2)
    assert torch.allclose(loss, expected, atol=1e-12)
    assert abs(metrics["kl"] - trl_metrics["kl"]) < 1e-6 * trl_metrics["kl"]
    alone, _ = ours(*batch, p)
    assert abs(alone.item() - loss.item()) > 1e-4


def test_kl_rotation_is_trls_and_the_last_example_is_never_its_own_partner():
    completions = [[i] for i in range(11)]
    # TRL: examples["KL_completion_ids"] = [c[-1]] + c[:-1] per map batch of per_device_train_batch_size.
    trl = []
    for a in range(0, 11, 4):
        group = completions[a:a + 4]
        trl += group[-1:] + group[:-1]
    assert kl_completions(completions, group_bounds(11, 4)) == trl
    # A trailing group of one joins the one before it instead of pairing an example with itself.
    assert group_bounds(9, 4) == [(0, 4), (4, 9)]
    assert all(kl != c for kl, c in zip(kl_completions(completions[:9], group_bounds(9, 4)), completions[:9]))


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "p", "completion": " c"}, "missing_field: label"),
    ({"prompt": "p", "completion": " c", "label": "yes"}, "invalid_label"),
    ({"prompt": "p", "completion": " c", "label": 2}, "invalid_label"),
    ({"prompt": "p", "completion": "  ", "label": True}, "empty_completion: completion"),
    ({"prompt": "p", "completion": 3, "label": True}, "wrong_type: completion is int"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}], "label": True},
     "bad_message: completion must start with an assistant message"),
])
def test_bad_unpaired_rows_get_their_reason(row, reason):
    ((pair, why, _, _),) = parse_examples(json.dumps(row).encode(), None, "auto", "\n\nAssistant:", True)
    assert pair is None and why.startswith(reason), why


def test_pairs_split_in_two_or_refused_when_splitting_is_off():
    raw = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}).encode()
    halves = parse_examples(raw, None, "auto", "\n\nAssistant:", True)
    assert [(h[0].chosen, h[2], h[3]) for h in halves] == [(" a", 0, True), (" b", 1, False)]
    ((pair, why, _, _),) = parse_examples(raw, None, "auto", "\n\nAssistant:", False)
    assert pair is None and why.startswith("paired_row") and "data.unpair_pairs" in why
    chat = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}], "label": False}
    ((pair, why, part, desirable),) = parse_examples(json.dumps(chat).encode(), None, "auto", "\n\nAssistant:", True)
    assert why is None and pair.kind == "chat" and part == -1 and desirable is False


def test_config_refuses_mixed_losses_and_single_example_batches():
    from raydpo.config import ConfigError, from_dict

    base = {"model": {"name_or_path": "m"}, "data": {"train": ["x.jsonl"]}}
    with pytest.raises(ConfigError, match="mixes an unpaired loss"):
        from_dict(base | {"loss": {"type": ["kto", "sft"]}})
    with pytest.raises(ConfigError, match="micro_batch_size must be > 1"):
        from_dict(base | {"loss": {"type": "kto"}, "train": {"micro_batch_size": 1}})
    with pytest.raises(ConfigError, match="desirable_weight"):
        from_dict(base | {"loss": {"type": "kto", "undesirable_weight": 0}})
    # TR-DPO is refused with the reason and what to do instead.
    with pytest.raises(ConfigError, match="sync_ref_model.*reference.name_or_path"):
        from_dict(base | {"loss": {"sync_ref_model": True}})


def test_in_process_wrapper_refuses_unpaired_losses(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    import raydpo

    with pytest.raises(ValueError, match="unpaired"):
        raydpo.DPO(AutoModelForCausalLM.from_pretrained(tiny_model_dir), loss_type="kto")


def _kto_config(tiny_model_dir, train, tmp_path, **train_section):
    from conftest import make_config

    cfg = make_config(tiny_model_dir, train, tmp_path, loss={"type": "kto", "beta": 0.1},
                      train={"micro_batch_size": 4, **train_section})
    return cfg


def _sequences(rows):
    """(prompt + completion, prompt + KL completion) of each example."""
    return sorted((tuple(p) + tuple(c), tuple(p) + tuple(kl)) for p, c, kl in rows)


def _chat_examples(n: int) -> list[dict]:
    """Conversational unpaired rows (a system turn on some), labels mixed."""
    from raydpo.fixtures.synthetic import make_pairs

    out = []
    for i, p in enumerate(make_pairs(n, seed=4)):
        prompt = ([{"role": "system", "content": "Count."}] if i % 3 == 0 else []) + [{"role": "user", "content": p["prompt"]}]
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": p["chosen" if i % 2 else "rejected"]}],
                    "label": bool(i % 2)})
    return out


@pytest.mark.parametrize("kind", ["standard pairs", "conversational examples"])
def test_tokens_and_kl_pairing_equal_trls_prepare_dataset(ray_cluster, tiny_model_dir, tokenizer, tmp_path, kind):
    """TRL's own unpairing, tokenization and KL rotation (per_device_train_batch_size = raydpo's
    micro-batch) on the same rows give raydpo's examples, each with the same KL sequence."""
    import datasets
    from trl import KTOConfig

    from raydpo.pipeline import prepare_data
    from raydpo.fixtures.synthetic import make_pairs, write_jsonl

    rows = make_pairs(30, seed=3) if kind == "standard pairs" else _chat_examples(26)
    path = write_jsonl(rows, tmp_path / "rows.jsonl")
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_length=64, report_to=[], use_cpu=True, bf16=False)
    stand_in = SimpleNamespace(calculate_KL=True, _tokenizer=tokenizer, desirable_weight=1.0, undesirable_weight=1.0)
    trl = kto_trainer.KTOTrainer._prepare_dataset(stand_in, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    expected = _sequences(zip(trl["prompt_ids"], trl["completion_ids"], trl["KL_completion_ids"]))

    data = prepare_data(_kto_config(tiny_model_dir, str(path), tmp_path))
    got = [r for b in data.train.iter_batches(batch_format="pyarrow") for r in b.to_pylist()]
    assert _sequences((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in got) == expected
    assert sorted(r["label"] for r in got) == sorted(int(x) for x in trl["label"])
    if kind != "standard pairs":
        return
    # Splitting switched off: every pair is quarantined, and the error names the switch.
    with pytest.raises(ValueError, match="data.unpair_pairs is false"):
        cfg = _kto_config(tiny_model_dir, str(path), tmp_path / "c")
        cfg.data.unpair_pairs = False
        prepare_data(cfg)
    # The pairing is part of the token digest, hence of the reference cache key: another group size,
    # other KL sequences, other digests.
    other = prepare_data(_kto_config(tiny_model_dir, str(path), tmp_path / "b", micro_batch_size=6))
    digests = lambda d: {r["digest"] for b in d.train.iter_batches(batch_format="pyarrow") for r in b.to_pylist()}  # noqa: E731
    assert digests(data) != digests(other)


@pytest.fixture(scope="module")
def kto_run(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path_factory):
    """One KTO run on the synthetic task: its pairs split in two, plus unpaired and bad rows."""
    from raydpo.config import from_dict
    from raydpo.pipeline import run
    from raydpo.fixtures.synthetic import make_pairs, write_jsonl

    tmp = tmp_path_factory.mktemp("kto")
    extra = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in make_pairs(6, seed=9)]
    extra += [{"prompt": "Count on from apple:", "completion": " tiger", "label": "maybe"},
              {"prompt": "Count on from apple:", "completion": " ", "label": False}]
    unpaired = write_jsonl(extra, tmp / "unpaired.jsonl")
    cfg = from_dict({
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": str(tmp / "cache"), "batch_size": 32},
        "data": {"train": [f"{synthetic_dir}/train.jsonl", unpaired], "eval": f"{synthetic_dir}/eval.jsonl",
                 "max_length": 64, "num_workers": 1},
        "loss": {"type": "kto", "beta": 0.1},
        "train": {"num_workers": 2, "micro_batch_size": 8, "learning_rate": 1e-3, "max_steps": 12, "eval_every": 6, "seed": 0},
        "output": {"dir": str(tmp / "run")},
    })
    run(cfg)
    out = tmp / "run"
    return {"metrics": [json.loads(line) for line in open(out / "metrics.jsonl")],
            "summary": json.load(open(out / "summary.json")),
            "quarantine": [json.loads(line) for line in open(out / "quarantine.jsonl")]}


@pytest.mark.slow
def test_kto_pipeline_learns_the_synthetic_task(kto_run):
    rows = kto_run["metrics"]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    # Before any update policy == reference: every log ratio and the KL estimate are 0, the loss 1/2.
    assert abs(train[0]["loss"] - 0.5) < 1e-5 and abs(train[0]["kl"]) < 1e-5
    assert abs(evals[0]["eval/loss"] - 0.5) < 1e-5
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1e-3
    # Desirable completions gain reward over undesirable ones on held-out pairs (split in two).
    assert evals[-1]["eval/rewards/margins"] > 0.1
    assert train[-1]["loss"] < train[0]["loss"]
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "desirable", "undesirable"):
        assert key in train[-1], key


@pytest.mark.slow
def test_kto_counts_add_up_and_bad_rows_are_quarantined(kto_run):
    s = kto_run["summary"]
    # 256 + 64 pairs split in two, 6 unpaired rows kept, 2 bad rows quarantined.
    assert s["rows_read"] == 256 + 64 + 8 and s["pairs_split"] == 320
    assert s["examples"] == s["rows_read"] + s["pairs_split"] == s["rows_used"] + s["rows_quarantined"] + s["rows_filtered"]
    assert s["desirable_by_split"] == {"train": 256 + 6, "eval": 64}
    assert s["undesirable_by_split"] == {"train": 256, "eval": 64}
    assert s["counts_add_up"]
    assert set(s["token_lengths"]) == {"prompt", "completion", "kl_completion"}
    assert sorted(q["reason"].split(":")[0] for q in kto_run["quarantine"]) == ["empty_completion", "invalid_label"]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_kl_sequences_scored_without_gradient_change_nothing_but_the_cost(tiny_model_dir, padding_free):
    """The trainer scores KTO's KL sequences in a second forward under no_grad (``kl_apart``, as TRL's
    KTOTrainer): the loss, every metric and every gradient equal one joint forward's, and the
    autograd graph holds the completions only."""
    import numpy as np

    from raydpo.data.collate import collate_rows
    from raydpo.models import load_causal_lm
    from raydpo.train.step import step_metrics

    rng = np.random.default_rng(0)
    ids = lambda n, lo, hi: np.array([rng.integers(5, 300, rng.integers(lo, hi)).tolist() for _ in range(n)], dtype=object)  # noqa: E731
    raw = {"prompt_ids": ids(6, 3, 20), "chosen_ids": ids(6, 2, 12), "rejected_ids": ids(6, 2, 12),
           "label": np.array([1, 0, 1, 1, 0, 0]), "ref_chosen_logps": rng.normal(-30, 3, 6).astype(np.float32),
           "ref_rejected_logps": rng.normal(-30, 3, 6).astype(np.float32)}
    model = load_causal_lm(tiny_model_dir).train()
    p = LossConfig(type=["kto"], beta=0.1)
    out = {}
    for apart in (False, True):
        batch = collate_rows(raw, 0, padding_free=padding_free, kl_apart=apart)
        assert ("kl" in batch) is apart
        model.zero_grad()
        loss, sums, logps = step_metrics(model, batch, p, across_ranks=False)
        loss.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        out[apart] = (loss.detach(), {k: float(v) for k, v in sums.items()}, logps.detach(), grads)
    (l0, s0, lp0, g0), (l1, s1, lp1, g1) = out[False], out[True]
    assert torch.allclose(l0, l1, atol=1e-6) and torch.allclose(lp0, lp1, atol=1e-4)
    assert s0.keys() == s1.keys() and all(abs(s0[k] - s1[k]) <= 1e-4 * max(1.0, abs(s0[k])) for k in s0), (s0, s1)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4) for n in g0)
    params = [q for q in model.parameters() if q.requires_grad]
    for apart in (False, True):  # the KL half's graph reaches the weights only when scored jointly
        _, _, logps = step_metrics(model, collate_rows(raw, 0, padding_free=padding_free, kl_apart=apart), p,
                                   across_ranks=False)
        # (A slice of the concatenation sends zeros back into the completions' graph: not a reach.)
        reached = [g is not None and bool(g.abs().sum() > 0) for g in torch.autograd.grad(logps[6:].sum(), params, allow_unused=True)]
        assert any(reached) is not apart
