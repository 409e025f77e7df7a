"""Typed dataclasses from plain data (parsed YAML) and dotted ``key=value`` overrides.

Generic over any tree of dataclasses whose fields are annotated with str/int/float/bool,
Literal, Optional/Union, list, dict[str, X] or another dataclass (a nested section such as
``model.lora``). Every error names the offending key and the valid keys or values, because a
typo in a 40-line YAML should cost the user seconds, not a failed cluster job.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message says which and what is valid."""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the safe cases (int -> float, str -> [str])."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(key, tp, value or {})
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:  # the first alternative that accepts the value wins
            try:
                return coerce(key, value, arg)
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
        return {k: coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(items)]
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


def fields_of(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation."""
    return typing.get_type_hints(cls)


def build(name: str, cls: type, raw: Any) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``raw`` (``name``: its dotted key, for errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = fields_of(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        prefix = f"{name}." if name else ""
        raise ConfigError(unknown_key(f"{prefix}{unknown[0]}", [f"{prefix}{k}" for k in hints]))
    return cls(**{k: coerce(f"{name}.{k}" if name else k, v, hints[k]) for k, v in raw.items()})


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key under ``cls`` (nested dataclasses expanded)."""
    out = []
    for k, tp in fields_of(cls).items():
        key = f"{prefix}{k}"
        out.extend(leaf_keys(tp, key + ".") if dataclasses.is_dataclass(tp) else [key])
    return out


def unknown_key(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {key}{hint}; valid keys are: {', '.join(valid)}"


def apply_overrides(cls: type, raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``section.sub.key=value``) strings to nested plain data;
    values are parsed as YAML scalars. Keys are checked against the dataclass tree ``cls``."""
    raw = _copy(raw or {})
    valid = leaf_keys(cls)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        if key not in valid:
            raise ConfigError(unknown_key(key, valid))
        *path, name = key.split(".")
        node = raw
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[name] = yaml.safe_load(text) if text != "" else ""
    return raw


def _copy(raw: Any) -> Any:
    return {k: _copy(v) for k, v in raw.items()} if isinstance(raw, dict) else raw


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys: {'loss': {'beta': 0.1}} -> {'loss.beta': 0.1} (empty
    mappings stay values)."""
    out = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
