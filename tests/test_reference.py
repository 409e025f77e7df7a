"""The reference actor pool and its content-addressed cache."""

import json
import shutil

import pytest
import torch
import yaml

from conftest import make_config
from ray_actors import actors_created
from raydpo.pipeline import precompute


def scorer_actors() -> int:
    """Reference actors ever created in this cluster (alive or dead)."""
    return actors_created("ReferenceScorer")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache for the module, so the baseline entry is scored once."""
    return str(tmp_path_factory.mktemp("refcache"))


@pytest.fixture
def base(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path, cache_dir):
    def cfg(model=tiny_model_dir, data_path=f"{synthetic_dir}/train.jsonl", **sections):
        sections.setdefault("reference", {}).setdefault("cache_dir", cache_dir)
        return make_config(model, data_path, tmp_path, **sections)

    return cfg


def test_cached_logps_equal_in_process_computation(base, tiny_model_dir):
    from raydpo.data.collate import collate_pairs
    from raydpo.logprobs import forward_logps, split_pairs
    from raydpo.models import load_causal_lm, load_tokenizer

    _, refs = precompute(base(reference={"num_actors": 2, "batch_size": 7}))
    rows = refs["train"].dataset.take_all()
    assert len(rows) == 256  # the synthetic task repeats some pairs: each copy is scored
    model = load_causal_lm(tiny_model_dir, frozen=True)
    pad = load_tokenizer(tiny_model_dir).pad_token_id
    for i in range(0, len(rows), 64):  # different batch composition than the pool's
        chunk = rows[i : i + 64]
        batch = collate_pairs(*([r[k] for r in chunk] for k in ("prompt_ids", "chosen_ids", "rejected_ids")), pad)
        with torch.no_grad():
            chosen, rejected = split_pairs(forward_logps(model, batch))
        # The pool packs each pair into one row (prompt computed once): equal up to float rounding.
        assert torch.allclose(chosen, torch.tensor([r["ref_chosen_logps"] for r in chunk]), atol=1e-4)
        assert torch.allclose(rejected, torch.tensor([r["ref_rejected_logps"] for r in chunk]), atol=1e-4)


def test_second_run_hits_cache_and_loads_no_model(base, tmp_path):
    first = precompute(base(reference={"cache_dir": str(tmp_path / "fresh")}))[1]["train"]
    assert not first.cache_hit and first.pairs_scored == 256
    actors = scorer_actors()
    assert actors >= 1
    second = precompute(base(reference={"cache_dir": str(tmp_path / "fresh")}))[1]["train"]
    assert second.cache_hit and second.pairs_scored == 0 and second.key == first.key
    assert scorer_actors() == actors  # no reference actor (so no reference model) was started
    a = sorted((r["pair_id"], r["ref_chosen_logps"]) for r in first.dataset.take_all())
    b = sorted((r["pair_id"], r["ref_chosen_logps"]) for r in second.dataset.take_all())
    assert a == b
    manifest = json.load(open(f"{second.entry}/manifest.json"))
    assert set(manifest["inputs"]) >= {"reference", "tokenizer", "tokenization", "data", "dtype", "backend"}


def _perturbed_weights(src, dst):
    from raydpo.models import load_causal_lm

    shutil.copytree(src, dst)
    model = load_causal_lm(src)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    model.save_pretrained(dst)
    return str(dst)


def _other_chat_template(src, dst):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text((dst / "chat_template.jinja").read_text() + "{# v2 #}")
    return str(dst)


def _one_row_changed(src, dst):
    lines = open(src).read().splitlines()
    row = json.loads(lines[3])
    row["chosen"] += " apple"
    lines[3] = json.dumps(row)
    dst.write_text("\n".join(lines) + "\n")
    return str(dst)


def test_training_settings_do_not_touch_the_key(base):
    """A sweep over loss.beta or trainer settings reuses the scored pairs."""
    baseline = precompute(base())[1]["train"]
    swept = precompute(base(loss={"beta": 0.5}, train={"num_workers": 1, "learning_rate": 0.1}))[1]["train"]
    assert swept.cache_hit and swept.key == baseline.key


@pytest.mark.parametrize("change", ["weights", "tokenizer", "data", "max_length", "dtype"])
def test_changing_any_key_input_misses(base, tiny_model_dir, synthetic_dir, tmp_path, change):
    baseline = precompute(base())[1]["train"]
    if change == "weights":
        cfg = base(reference={"name_or_path": _perturbed_weights(tiny_model_dir, tmp_path / "w")})
    elif change == "tokenizer":
        cfg = base(model=_other_chat_template(tiny_model_dir, tmp_path / "t"), reference={"name_or_path": tiny_model_dir})
    elif change == "data":
        cfg = base(data_path=_one_row_changed(f"{synthetic_dir}/train.jsonl", tmp_path / "d.jsonl"))
    elif change == "max_length":
        cfg = base(data={"max_length": 9})
    else:
        cfg = base(reference={"dtype": "bfloat16"})
    changed = precompute(cfg)[1]["train"]
    assert not changed.cache_hit and changed.key != baseline.key and changed.pairs_scored > 0


def test_export_is_in_input_order(ray_cluster, tiny_model_dir, tmp_path):
    from raydpo.cli import main

    rows = [{"prompt": f"Count on from apple {i}:", "chosen": " tiger", "rejected": " river"} for i in range(40)]
    rows[5] = {"prompt": "bad", "chosen": " x", "rejected": " x"}  # quarantined: not exported
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    cfg = {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": str(tmp_path / "cache"), "num_actors": 2, "batch_size": 3},
        "data": {"train": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], "max_bad_fraction": 0.1},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["precompute", str(tmp_path / "cfg.yaml"), "--export", str(tmp_path / "out.jsonl")]) == 0
    exported = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
    from raydpo.data.tokenize import pair_id

    expected = [pair_id(r["prompt"], r["chosen"], r["rejected"]) for i, r in enumerate(rows) if i != 5]
    assert [e["pair_id"] for e in exported] == expected
    assert set(exported[0]) == {"pair_id", "ref_chosen_logps", "ref_rejected_logps", "prompt_tokens", "chosen_tokens", "rejected_tokens"}
    assert exported[0]["chosen_tokens"] == 2 and exported[0]["ref_chosen_logps"] < 0
    # The same pairs written with an explicit EOS tokenize identically: a cache hit, and the export
    # (joined on token digests) still covers every pair under the new ids.
    with_eos = [r if i == 5 else {**r, "chosen": r["chosen"] + "</s>"} for i, r in enumerate(rows)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_eos[:30]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_eos[30:]))
    assert main(["precompute", str(tmp_path / "cfg.yaml"), "--export", str(tmp_path / "out2.jsonl")]) == 0
    again = [json.loads(l) for l in open(tmp_path / "out2.jsonl")]
    assert [e["ref_chosen_logps"] for e in again] == [e["ref_chosen_logps"] for e in exported]
    assert [e["pair_id"] for e in again] != [e["pair_id"] for e in exported]


def _scored_rows(result) -> list[tuple]:
    return sorted((r["pair_id"], r["digest"], r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in result.dataset.take_all())


def _same_pairs(a: list[tuple], b: list[tuple]) -> None:
    """Same pairs, each exactly once per input copy, with the same log-probs up to batch composition."""
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert [v for r in a for v in r[2:]] == pytest.approx([v for r in b for v in r[2:]], abs=1e-4)


def test_a_dead_actor_is_restarted_and_its_batch_retried(base, tmp_path):
    import os

    from raydpo.models import load_tokenizer
    from raydpo.pipeline import prepare_data
    from raydpo.reference.scorer import ReferenceScorer
    from raydpo.reference.stage import run_reference

    marker = str(tmp_path / "crashed")

    class CrashOnce(ReferenceScorer):
        """The first batch anywhere in the pool kills its actor's process before it is scored."""

        def __call__(self, batch):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return super().__call__(batch)
            os._exit(1)

    baseline = _scored_rows(precompute(base())[1]["train"])
    cfg = base(reference={"cache_dir": str(tmp_path / "cache"), "num_actors": 2, "batch_size": 16})
    data = prepare_data(cfg)
    result = run_reference(data.train, cfg, load_tokenizer(cfg.model.name_or_path).pad_token_id, data.settings.__dict__, scorer=CrashOnce)
    assert os.path.exists(marker)  # an actor really died mid-run
    assert result.pairs_scored == 256
    _same_pairs(_scored_rows(result), baseline)


def test_interrupted_run_resumes_with_only_the_missing_pairs(base, tmp_path):
    import glob
    import os

    cfg = base(reference={"cache_dir": str(tmp_path / "cache"), "batch_size": 16, "shard_rows": 32})
    full = precompute(cfg)[1]["train"]
    shards = sorted(glob.glob(f"{full.entry}/w-*/shard-*.parquet"))
    assert len(shards) == 8  # shards of shard_rows pairs, each scored in two batches
    # What a run killed after three batches leaves: no manifest, three shards under its writer prefix.
    os.remove(f"{full.entry}/manifest.json")
    for path in shards[3:]:
        os.remove(path)
    resumed = precompute(cfg)[1]["train"]
    assert resumed.pairs_scored == 256 - 3 * 32 and not resumed.cache_hit and resumed.entry == full.entry
    assert len(glob.glob(f"{full.entry}/w-*/shard-*.parquet")) == 8  # three adopted, five new
    _same_pairs(_scored_rows(resumed), _scored_rows(full))


def test_damaged_shards_in_s3_are_detected_and_rebuilt(base, s3_server):
    """A bit-rotted and a truncated shard of an entry on S3: the next run finds both (sha256, size),
    scores only their pairs into a new writer prefix, publishes a manifest that replaces the damaged
    one, and deletes nothing; the run after that is a hit."""
    from raydpo import storage
    from raydpo.storage import entries

    bucket = s3_server.bucket("reference-damage")
    cfg = base(reference={"cache_dir": f"{bucket}/cache", "batch_size": 48})
    full = precompute(cfg)[1]["train"]
    before = _scored_rows(full)
    root, key = f"{bucket}/cache", full.key
    shards = entries.read_manifest(root, key)["shards"]
    rot, cut = (storage.join(root, key, s["file"]) for s in shards[:2])
    data = storage.read_bytes(rot)  # bit rot: same size, other bytes in the middle
    storage.write_bytes(rot, data[: len(data) // 2] + b"\xff" * 16 + data[len(data) // 2 + 16:])
    storage.write_bytes(cut, storage.read_bytes(cut)[:100])
    objects = s3_server.keys("reference-damage")
    again = precompute(cfg)[1]["train"]
    assert again.pairs_scored == shards[0]["rows"] + shards[1]["rows"] and not again.cache_hit
    assert set(objects) <= set(s3_server.keys("reference-damage"))  # nothing removed, the new shards added
    _same_pairs(_scored_rows(again), before)
    third = precompute(cfg)[1]["train"]
    assert third.cache_hit and third.pairs_scored == 0


def test_token_budget_batches_score_the_same_log_probs(base, tmp_path):
    baseline = _scored_rows(precompute(base())[1]["train"])
    budget = base(reference={"cache_dir": str(tmp_path / "cache"), "batch_size": 100, "max_tokens_per_batch": 300})
    _same_pairs(_scored_rows(precompute(budget)[1]["train"]), baseline)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_reference_stays_within_its_documented_drift(base, tmp_path, bits):
    from raydpo.train.guard import QUANTIZED_TOLERANCE

    full = precompute(base())[1]["train"]
    quant = precompute(base(reference={"cache_dir": str(tmp_path / "cache"), "quantization": bits, "batch_size": 32}))[1]["train"]
    assert quant.key != full.key and store_inputs(quant)["quantization"] == bits
    want = {(r["pair_id"], r["digest"]): r for r in full.dataset.take_all()}
    drift = []
    for r in quant.dataset.take_all():
        w = want[(r["pair_id"], r["digest"])]
        drift.append(abs(r["ref_chosen_logps"] - w["ref_chosen_logps"]) / len(r["chosen_ids"]))
        drift.append(abs(r["ref_rejected_logps"] - w["ref_rejected_logps"]) / len(r["rejected_ids"]))
    assert len(drift) == 2 * 256
    assert 0 < max(drift) < QUANTIZED_TOLERANCE[bits]  # quantized, so not bit-identical, yet close


def store_inputs(result) -> dict:
    from raydpo import storage
    from raydpo.storage import entries

    return entries.read_manifest(storage.parent(result.entry), result.key)["inputs"]


def test_shards_are_bounded_and_spread_over_the_pool():
    """A million pairs make a few hundred shards (not one per forward batch); a small split still
    gives every actor of the pool a few; a shard is a whole number of forward batches."""
    from raydpo.config import ReferenceConfig
    from raydpo.reference.stage import shard_batch

    r = ReferenceConfig(batch_size=8, num_actors=[1, 4])
    assert shard_batch(1_000_000, r) == 4096 and -(-1_000_000 // 4096) == 245
    assert shard_batch(256, r) == 16  # 16 shards: four for each of the four actors
    assert shard_batch(10, r) == 8
    odd = ReferenceConfig(batch_size=24, shard_rows=100)
    assert shard_batch(1_000_000, odd) == 96
