"""A config from YAML or plain data, and back: parse, apply ``key=value`` overrides, validate."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from raydpo.config.rules import validate
from raydpo.config.schema import ConfigError, build, fields_of
from raydpo.config.schema import apply_overrides as schema_overrides
from raydpo.config.sections import Config


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as parsed from YAML)."""
    raw = raw or {}
    hints = fields_of(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; valid sections are: {', '.join(hints)}")
    cfg = Config(**{k: build(k, hints[k], raw.get(k) or {}) for k in hints})
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (``model.lora.r=16`` for nested ones) to nested plain data."""
    return schema_overrides(Config, raw, overrides)


def load(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate. Relative data/model paths stay relative to the cwd."""
    from raydpo import storage

    raw = yaml.safe_load(storage.read_text(str(path))) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_dict(apply_overrides(raw, list(overrides)))


def dump(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again by :func:`load`) to a local path or URI."""
    from raydpo import storage

    storage.write_text(str(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
