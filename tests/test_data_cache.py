"""The tokenized-data cache: a second run on the same inputs reads the data stage's result instead
of tokenizing; other inputs miss; a damaged entry is rebuilt; `raydpo cache` lists and prunes it."""

import glob
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_config
from ray_actors import actors_created
from raydpo.cli import main
from raydpo.data.blocks import blocks
from raydpo.data.stage import prepare

BAD_ROWS = ['{"prompt": "p", "chosen": 3, "rejected": "r"}', "not json at all"]


@pytest.fixture(scope="module")
def data_file(synthetic_dir, tmp_path_factory) -> str:
    """The synthetic task's train rows plus two bad ones (quarantined, so the accounting is cached too)."""
    path = tmp_path_factory.mktemp("cached_data") / "train.jsonl"
    with open(os.path.join(synthetic_dir, "train.jsonl")) as f:
        rows = f.read().splitlines()[:96]
    path.write_text("\n".join(rows[:40] + BAD_ROWS + rows[40:]) + "\n")
    return str(path)


def tokenizers_started() -> int:
    return actors_created("Preprocess")


def columns(ds) -> dict:
    table = pa.concat_tables(blocks(ds))
    return {c: table[c].to_pylist() for c in table.column_names}


def prepared(cfg, tmp_path, name: str):
    out = prepare(cfg, str(tmp_path / f"{name}.quarantine.jsonl"))
    return out, open(tmp_path / f"{name}.quarantine.jsonl").read()


def test_hit_reads_the_same_pairs_and_accounting_without_a_tokenizer(ray_cluster, tiny_model_dir, data_file, tmp_path):
    cfg = make_config(tiny_model_dir, [data_file], tmp_path, data={"eval_fraction": 0.25, "max_bad_fraction": 0.5})
    first, q1 = prepared(cfg, tmp_path, "first")
    assert first.cache["hit"] is False and first.cache["status"] == "written"
    assert os.path.dirname(first.cache["entry"]) == str(tmp_path / "tokenized")  # beside reference.cache_dir
    started = tokenizers_started()
    second, q2 = prepared(cfg, tmp_path, "second")
    assert tokenizers_started() == started, "a cache hit must start no tokenizer actor"
    assert second.cache == {"hit": True, "key": first.cache["key"], "entry": first.cache["entry"]}
    assert second.summary == first.summary and second.summary.read == 98 and sum(second.summary.quarantined.values()) == 2
    assert (second.n_train, second.n_eval) == (first.n_train, first.n_eval) and first.n_eval > 0
    assert columns(second.train) == columns(first.train) and columns(second.eval) == columns(first.eval)
    assert q2 == q1 and q1.count("\n") == 2
    assert second.files == first.files == [os.path.abspath(data_file)]

    # Any input of the table changes the key: a tokenization setting, the file's bytes.
    other, _ = prepared(make_config(tiny_model_dir, [data_file], tmp_path, data={"eval_fraction": 0.25, "max_bad_fraction": 0.5,
                                                                                 "max_length": 48}), tmp_path, "other")
    assert other.cache["hit"] is False and other.cache["key"] != first.cache["key"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text(open(data_file).read().replace('"not json at all"', "still not json"))
    changed, _ = prepared(make_config(tiny_model_dir, [str(edited)], tmp_path, data={"max_bad_fraction": 0.5}), tmp_path, "edited")
    assert changed.cache["hit"] is False

    # Off by the switch: tokenized as before, nothing written.
    off, q_off = prepared(make_config(tiny_model_dir, [data_file], tmp_path, data={"eval_fraction": 0.25, "max_bad_fraction": 0.5,
                                                                                   "cache": False}), tmp_path, "off")
    assert off.cache == {"hit": False, "status": "off (data.cache)"} and off.summary == first.summary and q_off == q1


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_damaged_entry_is_detected_and_rebuilt(ray_cluster, tiny_model_dir, data_file, tmp_path, damage, capsys):
    cfg = make_config(tiny_model_dir, [data_file], tmp_path, data={"max_bad_fraction": 0.5})
    first, _ = prepared(cfg, tmp_path, "first")
    shard = glob.glob(os.path.join(first.cache["entry"], "w-*", "shard-000000.parquet"))[0]
    if damage == "altered":
        table = pq.read_table(shard)
        pq.write_table(table.slice(1), shard)  # a readable file with a row fewer
    else:
        os.remove(shard)
    rebuilt, _ = prepared(cfg, tmp_path, "rebuilt")
    assert rebuilt.cache["hit"] is False and rebuilt.cache["status"] == "rebuilt"
    said = capsys.readouterr()
    assert "is damaged" in said.out + said.err
    assert rebuilt.summary == first.summary and columns(rebuilt.train) == columns(first.train)
    assert prepared(cfg, tmp_path, "again")[0].cache["hit"] is True


def test_dataset_inputs_are_not_cached(ray_cluster, tiny_model_dir, data_file, tmp_path):
    import ray.data

    rows = [json.loads(line) for line in open(data_file) if line.startswith("{") and '"chosen": 3' not in line]
    cfg = make_config(tiny_model_dir, [data_file], tmp_path)
    out = prepare(cfg, str(tmp_path / "q.jsonl"), train=ray.data.from_items(rows))
    assert out.cache == {"hit": False, "status": "off for ray.data.Dataset and hub data set inputs"}
    assert not (tmp_path / "tokenized").exists()


def test_cache_cli_lists_and_prunes_tokenized_entries(ray_cluster, tiny_model_dir, data_file, tmp_path, capsys):
    cfg = make_config(tiny_model_dir, [data_file], tmp_path, data={"max_bad_fraction": 0.5})
    key = prepared(cfg, tmp_path, "first")[0].cache["key"]
    interrupted = tmp_path / "tokenized" / "0123abcd" / "w-1-aaaaaaaaaaaa"  # a write that never published
    os.makedirs(interrupted)
    (interrupted / "shard-000000.parquet").write_bytes(b"PAR1")
    ref_root = str(tmp_path / "cache")
    capsys.readouterr()  # the data stage's lines
    assert main(["cache", "list", "--cache-dir", ref_root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    entry = next(e for e in listed if e["status"] == "complete")
    assert entry["kind"] == "tokenized" and entry["key"] == key and entry["pairs"] == 98 and entry["files"] == [os.path.abspath(data_file)]
    assert any(e["status"] == "partial" and e["kind"] == "tokenized" for e in listed)
    assert main(["cache", "list", "--cache-dir", ref_root]) == 0
    assert f"{key}" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache-dir", ref_root]) == 0  # written in the last hour: left alone
    assert sorted(os.listdir(tmp_path / "tokenized")) == sorted([key, "0123abcd"])
    assert main(["cache", "prune", "--cache-dir", ref_root, "--min-age-minutes", "0"]) == 0  # no rule: the unfinished one
    assert os.listdir(tmp_path / "tokenized") == [key]
    assert main(["cache", "prune", "--cache-dir", ref_root, "--data-cache-dir", str(tmp_path / "tokenized"), "--key", key,
                 "--min-age-minutes", "0"]) == 0
    assert os.listdir(tmp_path / "tokenized") == []
    shutil.rmtree(tmp_path / "tokenized")


NUMBER_ROWS = [{"prompt": f"Human: Call {n} now, or {n + 7} at {n % 24}:30?\n\nAssistant:",
                "chosen": f" Calling {n * 3} in 1999.", "rejected": f" No, {n + 11} instead."} for n in range(12345, 12357)]
#: What AutoTokenizer reads from a model directory besides config.json: copied, the files are identical.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def family_pair(root, first: str, second: str) -> tuple[str, str]:
    """Two tiny models whose tokenizer files are byte for byte the same (``first``'s)."""
    from raydpo.fixtures.families import write_family_model

    a, b = write_family_model(root / first, first), write_family_model(root / second, second, seed=1)
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(a, f), os.path.join(b, f))
    return a, b


def test_the_tokenizer_class_is_keyed_not_only_its_files(ray_cluster, tmp_path):
    """The issue's case: the same tokenizer files under a qwen2 and a qwen3 config, one cache. AutoTokenizer
    picks Qwen2Tokenizer (digits split) for the first and the generic class for the second: a miss, and
    each run's ids are its own AutoTokenizer's. The same class on the same files (llama, gemma2) hits."""
    from transformers import AutoTokenizer

    from raydpo.reference.cache import fingerprint_tokenizer

    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in NUMBER_ROWS))
    qwen2, qwen3 = family_pair(tmp_path / "models", "qwen2", "qwen3")
    assert fingerprint_tokenizer(qwen2) == fingerprint_tokenizer(qwen3)
    runs = {}
    for path in (qwen2, qwen3):
        out, _ = prepared(make_config(path, [str(data)], tmp_path, data={"max_length": 128}), tmp_path, os.path.basename(path))
        assert out.cache["hit"] is False and out.cache["status"] == "written", out.cache
        auto = AutoTokenizer.from_pretrained(path)
        got = columns(out.processed)
        assert got["index"] == sorted(got["index"]) and got["status"] == ["ok"] * len(NUMBER_ROWS)
        want = [[auto(r["prompt"] + r["chosen"] + auto.eos_token)["input_ids"], auto(r["prompt"] + r["rejected"] + auto.eos_token)["input_ids"]]
                for r in NUMBER_ROWS]
        assert [[p + c, p + r] for p, c, r in zip(got["prompt_ids"], got["chosen_ids"], got["rejected_ids"])] == want
        manifest = json.load(open(os.path.join(out.cache["entry"], "manifest.json")))
        assert manifest["inputs"]["tokenizer"]["class"] == type(auto).__name__
        runs[path] = (out.cache["key"], got["chosen_ids"])
    assert runs[qwen2][0] != runs[qwen3][0]
    assert runs[qwen2][1] != runs[qwen3][1], "the fixture must make the two classes' ids differ"

    llama, gemma2 = family_pair(tmp_path / "models", "llama", "gemma2")
    assert type(AutoTokenizer.from_pretrained(gemma2)).__name__ == "LlamaTokenizer"
    first, _ = prepared(make_config(llama, [str(data)], tmp_path, data={"max_length": 128}), tmp_path, "llama")
    again, _ = prepared(make_config(gemma2, [str(data)], tmp_path, data={"max_length": 128}), tmp_path, "gemma2")
    assert first.cache["status"] == "written" and again.cache == {"hit": True, "key": first.cache["key"], "entry": first.cache["entry"]}


def test_an_entry_of_the_previous_format_is_never_a_hit(ray_cluster, tiny_model_dir, data_file, tmp_path):
    """An entry written under the files-only tokenizer key (format 2) is not read, even at the new key."""
    from raydpo.data import cache

    cfg = make_config(tiny_model_dir, [data_file], tmp_path, data={"max_bad_fraction": 0.5})
    first, _ = prepared(cfg, tmp_path, "first")
    path = os.path.join(first.cache["entry"], "manifest.json")
    manifest = json.load(open(path))
    assert manifest["format"] == cache.FORMAT == 3 and set(manifest["inputs"]["tokenizer"]) == {"class", "spec", "files"}
    with open(path, "w") as f:
        json.dump(manifest | {"format": 2}, f)
    found, _, problems = cache.load(os.path.dirname(first.cache["entry"]), first.cache["key"])
    assert found is None and problems[0].startswith("format 2 with") and problems[0].endswith("this raydpo writes 3")
