"""Training end to end: Ray Train workers running real DeepSpeed ZeRO engines on gloo."""

import json
import math

import pytest
import torch
import yaml

from conftest import shared_cache


def _run_config(tiny_model_dir, synthetic_dir, tmp_path, zero_stage, cache=None):
    return {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": cache or shared_cache(), "batch_size": 32},
        "data": {"train": f"{synthetic_dir}/train.jsonl", "eval": f"{synthetic_dir}/eval.jsonl", "max_length": 64},
        "loss": {"beta": 0.1},
        "train": {
            "num_workers": 2, "zero_stage": zero_stage, "micro_batch_size": 8, "learning_rate": 1e-3,
            "max_steps": 12, "eval_every": 6, "log_every": 1, "seed": 0,
        },
        "output": {"dir": str(tmp_path / "run")},
    }


def _params(model_dir):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_train_end_to_end(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path, zero_stage):
    from raydpo.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_run_config(tiny_model_dir, synthetic_dir, tmp_path, zero_stage)))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 6, 12]
    # Step 1 is computed before any update, with policy == reference: the loss is ln 2.
    assert abs(train[0]["loss"] - math.log(2)) < 1e-4
    assert abs(evals[0]["eval/loss"] - math.log(2)) < 1e-4
    assert train[-1]["loss"] < train[0]["loss"] - 0.01
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/rewards/accuracies"] > 0.6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate", "pairs_per_s"):
        assert key in train[-1]
    # The exported model loads with transformers and differs from the initial weights everywhere it trained.
    before, after = _params(tiny_model_dir), _params(run / "model")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} tensors changed"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run / "model").eos_token == "</s>"
    summary = json.load(open(run / "summary.json"))
    assert summary["steps"] == 12 and summary["counts_add_up"]
    # The exactness guard compared the policy's step-0 log-probs with the cache on every worker.
    guard = json.load(open(run / "guard.json"))
    assert guard["ok"] and guard["max_token_drift"] < 1e-4 and guard["tolerance"] == 1e-4
    assert summary["rows_read"] == summary["rows_used"] == 320
    assert yaml.safe_load(open(run / "config.yaml"))["train"]["zero_stage"] == zero_stage


@pytest.mark.slow
def test_streaming_then_repeated_runs_read_the_cache_and_train_identically(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """Streaming: training consumes the pool's output as it is scored, and the cache is sealed
    after. A precompute run on the same inputs hits that cache (both splits) and trains like a
    precompute run that missed its own cache, step for step. A cache entry that is sound on disk
    but holds wrong log-probs stops the run at the exactness guard. (ZeRO-0, one worker; one test,
    so that each run serves two checks.)"""
    import os

    import pyarrow.compute as pc

    from raydpo.config import from_dict
    from raydpo.pipeline import run
    from raydpo.reference import store
    from raydpo.storage import entries
    from raydpo.train.guard import GuardError

    def raw(name, cache, mode="precompute"):
        r = _run_config(tiny_model_dir, synthetic_dir, tmp_path, 0, cache=str(tmp_path / cache))
        r["train"].update(num_workers=1, max_steps=4, eval_every=0)
        r["reference"]["mode"] = mode
        r["output"]["dir"] = str(tmp_path / name)
        return r

    streamed = run(from_dict(raw("streamed", "stream-cache", "streaming")))
    ref = streamed.summary["reference"]["train"]
    assert not ref["cache_hit"] and ref["pairs_scored"] == 256
    assert os.path.exists(os.path.join(ref["entry"], "manifest.json")) and not ref["entry"].endswith(".partial")
    assert streamed.summary["timings_s"]["first_step"] > 0
    hit = run(from_dict(raw("hit", "stream-cache")))
    assert hit.summary["reference"]["train"]["cache_hit"] and hit.summary["reference"]["train"]["entry"] == ref["entry"]
    assert hit.summary["reference"]["eval"]["cache_hit"]
    # Streaming trains on pairs in scoring order, precompute in a seeded permutation of input order:
    # the same pairs and steps, in other orders, so the losses agree at step 1 (ln 2) and stay close.
    s_loss, h_loss = ([m["loss"] for m in r.metrics if "loss" in m] for r in (streamed, hit))
    assert len(s_loss) == len(h_loss) == 4 and abs(s_loss[0] - h_loss[0]) < 1e-6
    assert abs(s_loss[-1] - h_loss[-1]) < 0.05
    missed = run(from_dict(raw("missed", "cache")))
    assert not missed.summary["reference"]["train"]["cache_hit"]
    # Same data, same reference, same seed, ZeRO-0 on one worker: the runs agree step for step.
    assert [m.get("loss") for m in missed.metrics] == pytest.approx([m.get("loss") for m in hit.metrics], abs=1e-6)

    # A cache entry that is sound on disk but holds wrong log-probs (a buggy backend, a cache copied
    # from another model): the exactness guard stops the run before the first update.
    entry = missed.summary["reference"]["train"]["entry"]
    root, key = os.path.dirname(entry), os.path.basename(entry)
    manifest, writer, digests = entries.read_manifest(root, key), entries.new_writer(), []
    for shard in manifest["shards"]:  # the same pairs, every chosen log-prob off by 0.5, checksums sound
        table = store.read_table(entries.read_shard(root, key, shard))
        i = table.schema.get_field_index("ref_chosen_logps")
        store.write_shard(entries.writer_path(root, key, writer),
                          table.set_column(i, "ref_chosen_logps", pc.add(table["ref_chosen_logps"], 0.5)))
        digests += table["digest"].to_pylist()
    store.finalize(root, key, writer, [], manifest["inputs"], digests, replacing=manifest)
    with pytest.raises(GuardError, match="exactness guard: the cached reference log-probs differ"):
        run(from_dict(raw("guarded", "cache")))
    guard = json.load(open(tmp_path / "guarded" / "guard.json"))
    assert not guard["ok"] and guard["max_token_drift"] > 0.5 / 64


def test_streaming_longer_than_one_epoch_is_refused_before_scoring(tiny_model_dir, synthetic_dir, tmp_path):
    """reference.mode=streaming reads the pool's output once: more steps than one epoch would score
    every pair again, so the plan refuses it with the reason (and passes at one epoch)."""
    from raydpo.config import from_dict
    from raydpo.train.stage import plan_steps

    raw = _run_config(tiny_model_dir, synthetic_dir, tmp_path, 0)
    raw["reference"]["mode"] = "streaming"
    raw["train"].update(num_workers=1, max_steps=5)  # 64 pairs: 8 steps of 8 per epoch
    assert plan_steps(from_dict(raw), 64).total_steps == 5
    raw["train"]["max_steps"] = 9
    with pytest.raises(ValueError, match=r"train.max_steps=9 is more than one epoch \(8 steps of 64 pairs\).*reference.mode=precompute"):
        plan_steps(from_dict(raw), 64)


def test_share_prompt_is_off_with_its_reason_and_refused_when_required(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    """train.share_prompt left to raydpo: on for the tiny Llama on CPU, off (said) where it cannot be
    exact or would need a dense mask on a GPU; required there: an error before any stage."""
    from transformers import AutoConfig

    from raydpo.config import from_dict
    from raydpo.config.rules import share_prompt_issue
    from raydpo.train.preflight import check_share_prompt
    from raydpo.train.trainer import share_prompt_width

    config = AutoConfig.from_pretrained(tiny_model_dir)
    raw = _run_config(tiny_model_dir, synthetic_dir, tmp_path, 0)
    assert share_prompt_issue(from_dict(raw), config) is None and share_prompt_width(from_dict(raw), tiny_model_dir) == 4096
    flex = from_dict(raw | {"model": raw["model"] | {"attn_implementation": "flex_attention"}})
    assert share_prompt_width(flex, tiny_model_dir) > 1 << 20  # a block mask: no width limit
    off = {
        "sequence parallelism": {"train": raw["train"] | {"sequence_parallel_size": 2}},
        "takes no custom attention mask": {"model": raw["model"] | {"attn_implementation": "flash_attention_2"}},
        "flex_attention": {"train": raw["train"] | {"use_gpu": True}},
        "unpaired losses": {"loss": {"type": ["kto"], "beta": 0.1}},
    }
    for reason, change in off.items():
        cfg = from_dict(raw | change)
        assert reason in share_prompt_issue(cfg, config) and share_prompt_width(cfg, tiny_model_dir) == 0
        check_share_prompt(cfg, tiny_model_dir)  # automatic: said, not refused
        assert reason in capsys.readouterr().out
        required = from_dict(raw | change | {"train": (raw | change)["train"] | {"share_prompt": True}})
        with pytest.raises(ValueError, match="train.share_prompt is true, but .*" + reason):
            check_share_prompt(required, tiny_model_dir)
    assert share_prompt_width(from_dict(raw | {"train": raw["train"] | {"share_prompt": False}}), tiny_model_dir) == 0
