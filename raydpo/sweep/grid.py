"""The grid of a sweep: ``--grid KEY=V1,V2`` options -> named, validated run configs (pure functions)."""

from __future__ import annotations

import itertools
import re

from raydpo import storage
from raydpo.config import Config, ConfigError, apply_overrides, from_dict


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["loss.beta=0.1,0.5", "train.learning_rate=1e-5,5e-5"]`` -> ``{key: [values]}`` in order.

    A value holding a comma can be quoted in YAML flow style, e.g. ``loss.type=[sigmoid,sft]``
    keeps ``[sigmoid,sft]`` whole (commas inside brackets do not split)."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. loss.beta=0.05,0.1)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        parts = [v.strip() for v in re.split(r",(?![^\[]*\])", values)]
        if any(not v for v in parts):
            raise ConfigError(f"--grid {spec!r}: an empty value")
        grid[key] = list(dict.fromkeys(parts))
    if not grid:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2,...")
    return grid


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of the grid, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_name(point: dict[str, str]) -> str:
    """A directory name for a grid point: ``loss.beta=0.1,train.learning_rate=1e-5`` with unsafe characters replaced."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:200]


def run_configs(raw: dict, grid: dict[str, list[str]], sweep_dir: str) -> list[tuple[str, dict[str, str], Config]]:
    """(name, point, validated Config) per grid point; each run writes to ``<sweep_dir>/runs/<name>``.

    Every point is validated before any run starts: an unknown key names the valid ones, a value that
    fails validation names the run and the key."""
    if "output.dir" in grid:
        raise ConfigError("--grid output.dir: each run's directory is <output.dir>/runs/<run name>")
    out = []
    for point in points(grid):
        name = run_name(point)
        overrides = [f"{k}={v}" for k, v in point.items()] + [f"output.dir={storage.join(sweep_dir, 'runs', name)}"]
        try:
            cfg = from_dict(apply_overrides(raw, overrides))
        except ConfigError as e:
            keys = ", ".join(point)
            raise ConfigError(f"sweep run {name!r} (grid keys {keys}): {e}") from None
        out.append((name, point, cfg))
    return out
