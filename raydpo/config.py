"""Typed run configuration: one dataclass per section of DESIGN.md's table.

A config is loaded from YAML, then dotted ``key=value`` overrides are applied, then it is
validated. Every error names the offending key and the valid keys or values, because a typo
in a 40-line YAML should cost the user seconds, not a failed cluster job.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

Dtype = Literal["float32", "bfloat16", "float16"]
LossType = Literal["sigmoid"]
Quantization = Literal["8bit", "4bit"]
Backend = Literal["hf", "vllm"]
ReferenceMode = Literal["precompute", "streaming"]


class ConfigError(ValueError):
    """A config key or value is invalid; the message says which and what is valid."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Policy initial weights: a local Hugging Face directory or a hub id."""
    dtype: Dtype = "float32"
    """Dtype of the policy weights during training."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory / hub repo to run (off unless set)."""


@dataclass
class ReferenceConfig:
    name_or_path: Optional[str] = None
    """Frozen reference weights; defaults to ``model.name_or_path``."""
    dtype: Optional[Dtype] = None
    """Dtype of the reference weights; defaults to ``model.dtype``. Log-softmax is always float32."""
    num_actors: Union[int, list[int]] = 1
    """Reference actors, each holding one copy of the reference: a fixed number, or ``[min, max]``
    to let Ray Data grow the pool with the backlog of unscored batches."""
    num_cpus_per_actor: float = 1.0
    """Logical CPUs each reference actor reserves."""
    num_gpus_per_actor: float = 0.0
    """GPUs each reference actor reserves (0 on CPU-only clusters; a fraction packs several per GPU)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each actor needs, e.g. ``{reference_node: 1}``, so the pool is placed on
    the nodes that declare them (another node type than the trainers)."""
    accelerator_type: Optional[str] = None
    """Ray accelerator type each actor needs (e.g. ``L4``, ``A10G``): the reference on cheaper GPUs."""
    max_restarts: int = 3
    """How often a dead reference actor is restarted (-1: always); its unfinished batches are retried."""
    max_task_retries: int = 3
    """How often a batch is retried after its actor died (-1: always)."""
    guard: bool = True
    """Exactness guard: on every worker's first micro-batch, before any update, the policy still is
    the reference, so its log-probs must match the cached ones; a gap above ``guard_tolerance`` stops
    the run. Applies when the reference is the policy's starting weights (the default)."""
    guard_tolerance: Optional[float] = None
    """Largest allowed gap per completion token; default by the looser dtype: float32 1e-4, bf16/fp16 5e-2."""
    batch_size: int = 8
    """Pairs per reference forward pass (chosen and rejected are scored together: 2x sequences).
    With ``max_tokens_per_batch`` set: pairs per length-sorted bucket instead (use a few hundred)."""
    mode: ReferenceMode = "precompute"
    """``precompute``: every pair is scored (or read from the cache) before training starts.
    ``streaming``: on a cache miss training starts on the first scored batches while the pool keeps
    scoring and writing the cache (needs ``train.num_epochs`` 1: later epochs would score again)."""
    backend: Backend = "hf"
    """``hf``: transformers forward. ``vllm``: vLLM ``prompt_logprobs`` on the exact token ids (the
    optional extra: ``pip install 'raydpo[vllm]'``); ignores ``quantization`` and ``max_tokens_per_batch``."""
    vllm_gpu_memory_utilization: float = 0.9
    """vLLM's memory share for weights and KV cache; lower it on CPU and when actors share a GPU."""
    vllm_max_model_len: Optional[int] = None
    """vLLM's longest sequence; defaults to ``data.max_length``."""
    quantization: Optional[Quantization] = None
    """bitsandbytes quantization of the reference weights, ``8bit`` or ``4bit`` (NF4), to fit a big
    reference on small devices (runs on CPU too). Log-probs drift from the full-precision reference:
    see the README for measured figures; part of the cache key."""
    max_tokens_per_batch: Optional[int] = None
    """Token budget per forward pass, padding included (2 x pairs x longest pair): each bucket of
    ``batch_size`` pairs is sorted by length and cut to fit, instead of fixed row counts."""
    cache_dir: str = "~/.cache/raydpo/reference"
    """Root of the content-addressed reference log-prob cache."""


DataFormat = Literal["auto", "standard", "conversational", "implicit"]
TruncationMode = Literal["keep_start", "keep_end"]


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training data: files (jsonl, json, parquet, csv; .gz allowed), globs, directories, ``datasets``
    ``save_to_disk`` directories, or hub data set ids (``org/name`` or ``org/name:split``)."""
    eval: list[str] = field(default_factory=list)
    """Evaluation data, as ``train``; empty means hold out ``eval_fraction`` of train."""
    format: DataFormat = "auto"
    """Row format: standard {prompt, chosen, rejected} strings, conversational message lists,
    implicit (only chosen/rejected, prompt = their common part); ``auto`` detects it per row."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for data sets that name fields differently, e.g. ``{prompt: question, chosen: response_j}``."""
    chat_template: Optional[str] = None
    """Jinja chat template (or a path to a .jinja file) replacing the tokenizer's for conversational rows."""
    prompt_marker: str = "\n\nAssistant:"
    """Implicit-prompt text rows: the prompt ends after the last marker inside the common prefix."""
    max_prompt_length: Optional[int] = None
    """Max prompt tokens; a longer prompt keeps its first tokens under keep_start, its last under keep_end."""
    truncation_mode: TruncationMode = "keep_start"
    """Which end of prompt + completion survives ``max_length``: keep_start cuts completions,
    keep_end cuts the shared prompt's start (and the completion's start if it alone is too long)."""
    deduplicate: bool = False
    """Drop exact duplicate pairs (same prompt, chosen and rejected) after the first, counted as filtered."""
    eval_fraction: float = 0.0
    """Fraction of train pairs held out for eval when ``eval`` is empty, chosen by pair content."""
    max_length: int = 512
    """Max tokens of prompt + completion (per sequence); longer sequences keep their start."""
    max_bad_fraction: float = 0.01
    """The run fails when more than this fraction of rows read is quarantined."""
    tokenize_batch_size: int = 256
    """Rows per Ray Data tokenization batch (one batched tokenizer call each)."""
    num_workers: int = 2
    """Tokenization actors (each loads the tokenizer once)."""
    shared_prompt: bool = True
    """Tokenize each prompt's head once instead of three times where the tokenizer provably gives
    the same ids (byte-level BPE with GPT-2, Llama 3 or Qwen 2 splitting; see
    ``raydpo/data/prompt_cut.py``); other tokenizers take the plain path whatever this says."""


@dataclass
class LossConfig:
    type: LossType = "sigmoid"
    """Loss family, named as in TRL's DPOTrainer."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward ``beta * (policy - reference)``."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped (0 = plain DPO)."""


@dataclass
class TrainConfig:
    num_workers: int = 2
    """Ray Train workers, one DeepSpeed rank each."""
    use_gpu: bool = False
    """One GPU per worker and nccl; otherwise CPU and gloo."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each train worker reserves."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0 to 3."""
    micro_batch_size: int = 4
    """Pairs per worker per forward/backward."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up over this many steps (step k uses (k+1)/(warmup+1) of ``learning_rate``); constant afterwards."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means ``num_epochs`` full passes."""
    num_epochs: int = 1
    """Passes over the training pairs (ignored when ``max_steps`` > 0)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (and always before the first and after the last); 0 = only those two."""
    log_every: int = 1
    """Write a metrics.jsonl row every N optimizer steps."""
    seed: int = 42
    """Seed for weights-independent randomness (shuffling, dropout)."""


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, quarantine.jsonl, summary.json, model/."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray cluster to join ('auto', 'ray://...'); None joins RAY_ADDRESS if set, else starts an embedded local cluster."""
    num_cpus: Optional[int] = None
    """Logical CPUs of an embedded local cluster (may exceed physical cores so all stages get placed)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The frozen reference and its actor pool."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data and tokenization."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The preference loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Ray Train + DeepSpeed settings."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the run writes."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Which Ray cluster to use."""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the safe cases (int -> float, str -> [str])."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:  # the first alternative that accepts the value wins
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {' or '.join(map(_type_name, args))}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping from names to {_type_name(value_tp)}, got {value!r}")
        return {k: _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(items)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads "3e-4" (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(name: str, cls: type, raw: dict[str, Any]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = _section_types(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(_unknown_key(f"{name}.{unknown[0]}", [f"{name}.{k}" for k in hints]))
    return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()})


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as parsed from YAML)."""
    raw = raw or {}
    hints = _section_types(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; valid sections are: {', '.join(hints)}")
    cfg = Config(**{k: _build_section(k, hints[k], raw.get(k) or {}) for k in hints})
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _unknown_key(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {key}{hint}; valid keys are: {', '.join(valid)}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to nested plain data; values are parsed as YAML scalars."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    valid = [f"{s}.{k}" for s, cls in _section_types(Config).items() for k in _section_types(cls)]
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        if key not in valid:
            raise ConfigError(_unknown_key(key, valid))
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(text) if text != "" else ""
    return raw


def load(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate. Relative data/model paths stay relative to the cwd."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_dict(apply_overrides(raw, list(overrides)))


def pool_size(num_actors: int | list[int]) -> tuple[int, int]:
    """(min, max) actors of a pool size given as a number or ``[min, max]``."""
    return (num_actors, num_actors) if isinstance(num_actors, int) else (num_actors[0], num_actors[-1])


def _pool_ok(num_actors: int | list[int]) -> bool:
    if isinstance(num_actors, list) and len(num_actors) != 2:
        return False
    low, high = pool_size(num_actors)
    return 1 <= low <= high


def validate(cfg: Config) -> None:
    """Cross-field and range checks that the type annotations cannot express."""
    checks = [
        (cfg.model.name_or_path != "", "model.name_or_path is required"),
        (_pool_ok(cfg.reference.num_actors), "reference.num_actors must be a number >= 1 or [min, max] with 1 <= min <= max"),
        (cfg.reference.max_restarts >= -1 and cfg.reference.max_task_retries >= -1,
         "reference.max_restarts and reference.max_task_retries must be >= -1 (-1: no limit)"),
        (cfg.reference.batch_size >= 1, "reference.batch_size must be >= 1"),
        (cfg.reference.mode != "streaming" or cfg.train.num_epochs == 1,
         "reference.mode=streaming scores pairs while the first epoch reads them; with train.num_epochs > 1 "
         "use reference.mode=precompute (every epoch then reads the cache)"),
        (cfg.reference.max_tokens_per_batch is None or cfg.reference.max_tokens_per_batch >= 2,
         "reference.max_tokens_per_batch must be >= 2 (or unset for fixed batches of reference.batch_size)"),
        (cfg.data.max_length >= 2, "data.max_length must be >= 2"),
        (cfg.data.max_prompt_length is None or 1 <= cfg.data.max_prompt_length < cfg.data.max_length,
         "data.max_prompt_length must be >= 1 and < data.max_length"),
        (set(cfg.data.columns) <= {"prompt", "chosen", "rejected"},
         "data.columns maps prompt / chosen / rejected to your column names, e.g. {chosen: response_j}"),
        (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (cfg.loss.beta > 0, "loss.beta must be > 0"),
        (0.0 <= cfg.loss.label_smoothing < 0.5, "loss.label_smoothing must be in [0, 0.5)"),
        (cfg.train.num_workers >= 1, "train.num_workers must be >= 1"),
        (cfg.train.zero_stage in (0, 1, 2, 3), "train.zero_stage must be one of 0, 1, 2, 3"),
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (cfg.train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
        (cfg.train.learning_rate > 0, "train.learning_rate must be > 0"),
        (cfg.train.max_steps >= 0, "train.max_steps must be >= 0"),
        (cfg.train.num_epochs >= 1, "train.num_epochs must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.eval_every >= 0, "train.eval_every must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def reference_path(cfg: Config) -> str:
    return cfg.reference.name_or_path or cfg.model.name_or_path


def reference_dtype(cfg: Config) -> str:
    return cfg.reference.dtype or cfg.model.dtype


def dump(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again by :func:`load`)."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
