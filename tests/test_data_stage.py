"""The Ray Data stage: readers, validation, quarantine, accounting, deterministic eval split."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_config
from raydpo.pipeline import prepare_data

GOOD = [{"prompt": f"Count on from apple{i}:", "chosen": " tiger river", "rejected": " river tiger"} for i in range(20)]


def write_jsonl(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines))
    return str(path)


def kept_ids(ds):
    return sorted(r["pair_id"] for r in ds.take_all())


def test_bad_rows_are_quarantined_with_reasons(ray_cluster, tiny_model_dir, tmp_path):
    bad = [
        b'{"prompt": "p", "chosen": " a"',  # line 21: not JSON
        {"prompt": "p", "chosen": " a"},  # missing rejected
        {"prompt": "p", "chosen": 3, "rejected": " b"},
        {"prompt": "p", "chosen": "  ", "rejected": " b"},
        {"prompt": "p", "chosen": " same", "rejected": " same"},
        b'{"prompt": "p", "chosen": " \xff\xfe", "rejected": " b"}',
        [1, 2],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", GOOD + bad)
    cfg = make_config(tiny_model_dir, path, tmp_path, data={"max_bad_fraction": 0.5})
    data = prepare_data(cfg)
    s = data.summary.as_dict()
    assert s["rows_read"] == 27 and s["rows_used"] == 20 and s["rows_quarantined"] == 7
    assert s["counts_add_up"]
    assert s["quarantined_by_reason"] == {
        "invalid_json": 1, "missing_field": 1, "wrong_type": 1, "empty_completion": 1,
        "identical_completions": 1, "undecodable_bytes": 1, "not_an_object": 1,
    }
    rows = [json.loads(l) for l in open(tmp_path / "run" / "quarantine.jsonl")]
    assert sorted(r["index"] for r in rows) == list(range(21, 28))  # 1-based line numbers
    by_line = {r["index"]: r for r in rows}
    assert by_line[22]["reason"] == "missing_field: rejected" and by_line[22]["source"] == path
    assert by_line[23]["reason"].startswith("wrong_type: chosen is int")
    assert json.loads(by_line[24]["row"])["chosen"] == "  "
    assert data.n_train == 20 and data.train.count() == 20


def test_too_many_bad_rows_fail_the_run(ray_cluster, tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", GOOD[:5] + [b"not json"] * 2)
    cfg = make_config(tiny_model_dir, path, tmp_path, data={"max_bad_fraction": 0.1})
    with pytest.raises(ValueError, match=r"2 of 7 rows .* data.max_bad_fraction=0.1.*quarantine.jsonl"):
        prepare_data(cfg)
    assert len(open(tmp_path / "run" / "quarantine.jsonl").readlines()) == 2


def test_prompt_too_long_is_filtered_and_counted(ray_cluster, tiny_model_dir, tmp_path):
    long_prompt = {"prompt": "Count on from apple " * 20, "chosen": " a", "rejected": " b"}
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [long_prompt])
    data = prepare_data(make_config(tiny_model_dir, path, tmp_path, data={"max_length": 32}))
    s = data.summary.as_dict()
    assert s["filtered_by_reason"] == {"prompt_too_long": 1}
    assert s["rows_read"] == s["rows_used"] + s["rows_filtered"] + s["rows_quarantined"] == 21


def test_readers_agree_jsonl_gz_json_parquet(ray_cluster, tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", GOOD)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD))
    (tmp_path / "c.json").write_text(json.dumps(GOOD))
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "d.parquet")
    results = []
    for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.parquet"):
        out = tmp_path / name.replace(".", "_")
        data = prepare_data(make_config(tiny_model_dir, str(tmp_path / name), out))
        results.append(kept_ids(data.train))
    assert all(r == results[0] for r in results) and len(results[0]) == 20
    # A directory reads every data file under it.
    both = prepare_data(make_config(tiny_model_dir, str(tmp_path), tmp_path / "all"))
    assert both.summary.read == 80


def test_eval_fraction_split_is_deterministic(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    path = f"{synthetic_dir}/train.jsonl"
    runs = [prepare_data(make_config(tiny_model_dir, path, tmp_path / str(i), data={"eval_fraction": 0.25})) for i in (1, 2)]
    assert kept_ids(runs[0].eval) == kept_ids(runs[1].eval)
    assert 30 < runs[0].n_eval < 100 and runs[0].n_train + runs[0].n_eval == 256
    assert not set(kept_ids(runs[0].eval)) & set(kept_ids(runs[0].train))


def test_missing_file_is_a_clear_error(ray_cluster, tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data(make_config(tiny_model_dir, str(tmp_path / "nope.jsonl"), tmp_path))


def test_validate_data_reports_lengths(ray_cluster, tiny_model_dir, tmp_path):
    from raydpo.pipeline import validate_data

    path = write_jsonl(tmp_path / "v.jsonl", GOOD + [b"{oops"])
    summary = validate_data(make_config(tiny_model_dir, path, tmp_path, data={"max_bad_fraction": 0.1}))
    assert summary["rows_read"] == 21 and summary["rows_quarantined"] == 1
    # "Count on from apple0:" -> <s> Count on from apple 0 : ; " tiger river" + EOS -> 3 tokens
    assert summary["token_lengths"]["chosen"]["max"] == 3
    assert summary["token_lengths"]["prompt"]["p50"] > 4
    assert json.load(open(tmp_path / "run" / "summary.json")) == summary


def test_csv_saved_dataset_and_ray_dataset_sources(ray_cluster, tiny_model_dir, tmp_path):
    import csv

    import datasets
    import ray.data

    from raydpo.data.stage import prepare

    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(GOOD)
    datasets.Dataset.from_list(GOOD).save_to_disk(str(tmp_path / "saved"))
    expected = None
    for spec in ("p.csv", "saved"):
        data = prepare_data(make_config(tiny_model_dir, str(tmp_path / spec), tmp_path / spec.replace(".", "_")))
        ids = kept_ids(data.train)
        assert len(ids) == 20 and (expected is None or ids == expected)
        expected = ids
    cfg = make_config(tiny_model_dir, [], tmp_path / "api", data={"max_bad_fraction": 0.1})
    data = prepare(cfg, str(tmp_path / "api" / "q.jsonl"), train=ray.data.from_items(GOOD + [{"prompt": "p"}]))
    assert kept_ids(data.train) == expected
    assert data.summary.quarantined == {"missing_field": 1}


def test_saved_dataset_dict_asks_for_a_split(ray_cluster, tiny_model_dir, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict; name one split directory: train"):
        prepare_data(make_config(tiny_model_dir, str(tmp_path / "dd"), tmp_path))


def test_unreachable_hub_id_is_a_clear_error(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-set' is neither a local path nor a loadable hub data set"):
        prepare_data(make_config(tiny_model_dir, "nobody/no-such-set", tmp_path))


def test_conversational_implicit_and_dedup(ray_cluster, tiny_model_dir, tmp_path):
    conv = [{"prompt": [{"role": "user", "content": f"Count on from apple {i}"}],
             "chosen": [{"role": "assistant", "content": "tiger river"}],
             "rejected": [{"role": "assistant", "content": "river tiger"}]} for i in range(6)]
    implicit = [{"chosen": f"\n\nHuman: hi {i}\n\nAssistant: a", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: b"} for i in range(4)]
    path = write_jsonl(tmp_path / "mixed.jsonl", conv + implicit + conv[:2] + GOOD[:1] + GOOD[:1])
    data = prepare_data(make_config(tiny_model_dir, path, tmp_path, data={"deduplicate": True}))
    s = data.summary.as_dict()
    assert s["rows_read"] == 14 and s["rows_used"] == 11 and s["filtered_by_reason"] == {"duplicate": 3}
    assert s["counts_add_up"]
    first = next(r for r in data.train.take_all() if len(r["prompt_ids"]) > 8)
    assert first["prompt_ids"][0] == 1  # BOS written once, by the template


def test_dataset_input_positions_and_dedup(ray_cluster, tiny_model_dir, tmp_path):
    import ray.data

    rows = GOOD[:3] + [{"prompt": "p"}] + GOOD[:2]
    cfg = make_config(tiny_model_dir, [], tmp_path, data={"deduplicate": True, "max_bad_fraction": 0.5})
    data = prepare_data(cfg, train=ray.data.from_items(rows))
    s = data.summary.as_dict()
    assert (s["rows_used"], s["rows_quarantined"], s["filtered_by_reason"]) == (3, 1, {"duplicate": 2})
    assert [json.loads(l)["index"] for l in open(tmp_path / "run" / "quarantine.jsonl")] == [3]
    assert sorted(r["index"] for r in data.train.take_all()) == [0, 1, 2]


def test_eval_smaller_than_worker_count_is_an_error(tiny_model_dir, tmp_path):
    from raydpo.train.stage import check_eval

    cfg = make_config(tiny_model_dir, "x.jsonl", tmp_path, train={"num_workers": 4})
    with pytest.raises(ValueError, match="3 eval pairs cannot be split over train.num_workers=4"):
        check_eval(cfg, 3)
    assert check_eval(cfg, 10) == 8 and check_eval(cfg, 0) == 0
