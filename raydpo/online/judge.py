"""The judge: a Python reward function or a reward model, on its own actor pool.

A sample the judge fails on (the function raises, returns a non-number or NaN) gets no reward and a
reason; the round quarantines it and makes pairs from the rest.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import time


def load_reward_fn(spec: str):
    """``module:function`` -> the callable; ValueError with one line when it cannot be had."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"online.judge.reward_fn {spec!r}: module {module!r} cannot be imported ({e})") from None
    except AttributeError:
        raise ValueError(f"online.judge.reward_fn {spec!r}: module {module!r} has no attribute {name!r}") from None
    if not callable(fn):
        raise ValueError(f"online.judge.reward_fn {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def check_reward_model(path: str, trust_remote_code: bool = False) -> None:
    """ValueError with one line unless ``path`` is a sequence-classification model with one score."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"online.judge.reward_model {path!r} is not a loadable model directory: {str(e).splitlines()[0]}") from None
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"online.judge.reward_model {path!r} is a {', '.join(archs) or 'model without architectures'}, "
                         "not a sequence classifier (a *ForSequenceClassification reward model)")


def reward_value(value) -> float:
    """A judge's return value as a finite float, or ValueError saying what it was."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise ValueError(f"judge_not_a_number: got {type(value).__name__} {str(value)[:80]!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"judge_not_a_number: got {value}")
    return value


class RewardModel:
    """A sequence-classification reward model: logit 0 of prompt + completion."""

    def __init__(self, path: str, dtype: str, trust_remote_code: bool, max_length: int, threads: int):
        import torch
        from transformers import AutoModelForSequenceClassification

        from raydpo.models import load_tokenizer, resolve_local, torch_dtype

        path = resolve_local(path)  # a hub id pinned by the driver: this node's copy
        self.torch = torch
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        # device_map: read straight onto the device, no whole copy in host memory first.
        placed = {"device_map": {"": self.device}} if self.device != "cpu" else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                                                                        **placed)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.max_length = max_length

    def text(self, prompt, completion: str) -> str:
        if isinstance(prompt, str):
            return prompt + completion
        return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        enc = self.tokenizer([self.text(p, c) for p, c in zip(prompts, completions)], return_tensors="pt", padding=True,
                             truncation=True, max_length=self.max_length)
        with self.torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return logits[:, 0].float().cpu().tolist()


class Judge:
    """A Ray actor scoring samples with ``reward_fn`` (``module:function``) or ``reward_model``."""

    def __init__(self, reward_fn: str | None = None, reward_model: str | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False, max_length: int = 512, threads: int = 1, workers_dir: str | None = None):
        self.fn = load_reward_fn(reward_fn) if reward_fn else None
        self.model = None if reward_fn else RewardModel(reward_model, dtype, trust_remote_code, max_length, threads)
        if workers_dir:
            from raydpo.observability.workers import record

            record(workers_dir, f"judge-{os.getpid()}", kind="function" if reward_fn else "reward_model")

    def score(self, prompts: list, completions: list[str]) -> dict:
        """{"rewards": [float or None], "reasons": [None or why], "seconds": wall time here}."""
        start = time.perf_counter()
        rewards, reasons = [], []
        if self.model is not None:
            values = self.model(prompts, completions)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                rewards.append(reward_value(values[i] if self.model is not None else self.fn(p, c)))
                reasons.append(None)
            except Exception as e:  # noqa: BLE001 - a failing sample is quarantined, not fatal
                rewards.append(None)
                reasons.append(str(e) if str(e).startswith("judge_not_a_number") else f"judge_error: {type(e).__name__}: {e}"[:300])
        return {"rewards": rewards, "reasons": reasons, "seconds": time.perf_counter() - start}

    def pid(self) -> int:
        return os.getpid()
