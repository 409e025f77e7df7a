"""Typed config: YAML, dotted overrides, clear errors."""

import glob
import os

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
        ("loss.type=nope", "loss.type: expected 'sigmoid'"),
        ("loss.type=[sigmoid,sft] loss.weights=[1]", "loss.weights needs one weight per loss"),
        ("loss.type=exo_pair", "loss exo_pair needs loss.label_smoothing > 0"),
        ("loss.type=bco_pair loss.f_divergence=js_divergence", "loss.f_divergence other than reverse_kl works with"),
        ("model.quantization=4bit", "set model.lora.r > 0 (QLoRA)"),
        ("output.save_adapter_only=true", "output.save_adapter_only needs model.lora.r > 0"),
        ("train.optimizer=cpu_adam", "set train.offload_optimizer=true"),
        ("train.offload_params=true", "train.offload_params needs train.zero_stage=3"),
        ("model.lora.rank=4", "unknown key model.lora.rank (did you mean model.lora.r?)"),
        ("train.beta", "must look like section.key=value"),
    ],
)
def test_bad_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load(write(tmp_path, BASE), override.split(" "))


def test_nested_lora_section_and_loss_lists(tmp_path):
    from raydpo.config import loss_names, loss_weights, uses_reference

    cfg = load(write(tmp_path, {**BASE, "model": {**BASE["model"], "lora": {"r": 16}}}),
               ["model.lora.target_modules=[q_proj,v_proj]", "loss.type=[sigmoid,sft]", "loss.weights=[1,0.5]"])
    assert cfg.model.lora.r == 16 and cfg.model.lora.target_modules == ["q_proj", "v_proj"] and cfg.model.lora.alpha == 16.0
    assert loss_names(cfg.loss) == ["sigmoid", "sft"] and loss_weights(cfg.loss) == [1.0, 0.5] and uses_reference(cfg)
    assert not uses_reference(load(write(tmp_path, BASE), ["loss.type=[simpo,sft]"]))
    dump(cfg, tmp_path / "resolved.yaml")
    assert load(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("name, expected", [
    # warm-up from 0 over 2 steps, then: constant / linear to 0 at step 10 / cosine to 0 at step 10
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 7 / 8, 6 / 8]),
    ("cosine", [0.0, 0.5, 1.0, 0.9619397662556434, 0.8535533905932737]),
])
def test_learning_rate_schedules(name, expected):
    import torch

    from raydpo.config import TrainConfig
    from raydpo.train.engine import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(lr_scheduler=name, warmup_steps=2, learning_rate=1.0), total_steps=10)
    lrs = []
    for _ in expected:
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


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


def test_reference_pool_placement(tmp_path):
    from raydpo.config import pool_size
    from raydpo.reference.stage import pool_options

    cfg = load(write(tmp_path, BASE), ["reference.num_actors=[1, 3]", "reference.resources={ref_node: 1}",
                                       "reference.accelerator_type=L4", "reference.max_restarts=-1"])
    r = cfg.reference
    assert pool_size(r.num_actors) == (1, 3) and r.resources == {"ref_node": 1.0}
    opts = pool_options(r)
    assert (opts["compute"].min_size, opts["compute"].max_size) == (1, 3)
    assert opts["resources"] == {"ref_node": 1.0} and opts["accelerator_type"] == "L4"
    assert opts["max_restarts"] == -1 and "max_task_retries" not in opts  # only what is set is passed
    fixed = pool_options(load(write(tmp_path, BASE), ["reference.num_actors=2"]).reference)
    assert (fixed["compute"].min_size, fixed["compute"].max_size) == (2, 2) and "resources" not in fixed
    # Unset limits are Ray Data's own default (always restart, always retry), with no deprecated remote args.
    assert not {"max_restarts", "max_task_retries"} & set(fixed)
    for bad in ("[3, 1]", "[1, 2, 3]", "0"):
        with pytest.raises(ConfigError, match="reference.num_actors must be"):
            load(write(tmp_path, BASE), [f"reference.num_actors={bad}"])
    with pytest.raises(ConfigError, match="reference.num_actors: expected int or a list of int"):
        load(write(tmp_path, BASE), ["reference.num_actors=many"])
    with pytest.raises(ConfigError, match="reference.resources.ref_node: expected float"):
        load(write(tmp_path, BASE), ["reference.resources={ref_node: lots}"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml"))))
def test_example_configs_load(path):
    load(path)
    with open(path) as f:
        assert f.readline().startswith("# Run"), "each example starts with the command that runs it"
