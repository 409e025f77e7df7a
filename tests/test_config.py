"""Typed config: YAML, dotted overrides, clear errors."""

import pytest
import yaml

from raydpo.config import ConfigError, Config, apply_overrides, dump, from_dict, load


def write(tmp_path, raw):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BASE = {"model": {"name_or_path": "m"}, "data": {"train": "a.jsonl"}}


def test_load_with_overrides(tmp_path):
    cfg = load(write(tmp_path, BASE), ["loss.beta=0.05", "train.num_workers=4", "data.eval=[x.jsonl, y.jsonl]"])
    assert isinstance(cfg, Config)
    assert cfg.loss.beta == 0.05 and cfg.train.num_workers == 4
    assert cfg.data.train == ["a.jsonl"]  # a single path becomes a list
    assert cfg.data.eval == ["x.jsonl", "y.jsonl"]
    assert cfg.reference.name_or_path is None


def test_int_is_accepted_for_float(tmp_path):
    assert load(write(tmp_path, BASE), ["loss.beta=1"]).loss.beta == 1.0


def test_unknown_override_names_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, BASE), ["train.zero_stag=3"])
    assert "train.zero_stag" in str(e.value) and "did you mean train.zero_stage" in str(e.value)
    assert "loss.beta" in str(e.value)


def test_unknown_yaml_key_and_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key loss.betta.*did you mean loss.beta"):
        load(write(tmp_path, {**BASE, "loss": {"betta": 0.1}}))
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load(write(tmp_path, {**BASE, "trian": {}}))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dtype=fp8", "choose one of 'float32', 'bfloat16', 'float16'"),
        ("train.num_workers=two", "train.num_workers: expected int"),
        ("train.use_gpu=3", "expected true or false"),
        ("train.zero_stage=4", "zero_stage must be one of 0, 1, 2, 3"),
        ("loss.beta=-1", "loss.beta must be > 0"),
        ("loss.type=nope", "loss.type: 'nope' is not valid"),
        ("train.beta", "must look like section.key=value"),
    ],
)
def test_bad_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(write(tmp_path, BASE), [override])


def test_missing_model_is_an_error():
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        from_dict({"data": {"train": "x"}})


def test_dump_round_trips(tmp_path):
    cfg = load(write(tmp_path, BASE), ["train.learning_rate=3e-4", "reference.num_actors=3"])
    dump(cfg, tmp_path / "resolved.yaml")
    assert load(tmp_path / "resolved.yaml") == cfg


def test_overrides_do_not_mutate_input():
    raw = {"loss": {"beta": 0.1}}
    apply_overrides(raw, ["loss.beta=0.2"])
    assert raw == {"loss": {"beta": 0.1}}
