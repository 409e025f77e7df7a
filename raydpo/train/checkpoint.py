"""Checkpoints through Ray Train: DeepSpeed's sharded engine state plus what replays the data exactly.

Every worker writes its DeepSpeed shards (model, optimizer, scheduler: ``engine.save_checkpoint``),
its RNG states and the data position into one local directory and reports it under the same
``checkpoint_dir_name``; Ray Train merges the workers' files into one checkpoint directory in
``RunConfig.storage_path`` (local or any pyarrow filesystem) and keeps ``train.keep_checkpoints``.
A restarted worker group, or a re-run of the same command, gets the latest one back from
``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

TAG = "raydpo"
STATE_FILE = "raydpo_state.json"


@dataclass
class Position:
    """Where training stands; identical on every worker at a checkpoint (an optimizer-step boundary)."""

    step: int
    """Optimizer steps done."""
    epoch: int
    """The epoch the next micro-batch belongs to."""
    micro: int
    """Micro-batches of that epoch already consumed."""


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def checkpoint_name(position: Position, rounds: bool = False) -> str:
    """The checkpoint's directory name: ``step_<step>``, plus ``_round_<rounds done>`` for online runs
    (a round that trained no step must not reuse the previous round's name)."""
    return f"step_{position.step:08d}" + (f"_round_{position.epoch:04d}" if rounds else "")


def save(engine, position: Position, rank: int, metrics: dict, name: str | None = None) -> None:
    """Write this worker's part of the checkpoint and report it (a collective: every rank calls it).
    ``name``: the checkpoint directory's name (default :func:`checkpoint_name`)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raydpo-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=TAG)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(tmp, _rng_file(rank)))
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(position), f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name or checkpoint_name(position))


def restore(engine, rank: int) -> Position | None:
    """Load the latest checkpoint into ``engine`` and this process's RNGs; None when starting fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path, _ = engine.load_checkpoint(d, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed state")
        # weights_only=False: numpy and python RNG states are plain tuples of our own writing.
        rng = torch.load(os.path.join(d, _rng_file(rank)), weights_only=False)
        with open(os.path.join(d, STATE_FILE)) as f:
            position = Position(**json.load(f))
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return position


def trim_metrics(path: str, position: Position | None) -> None:
    """metrics.jsonl as of the checkpoint: rows logged after it are logged again by the resumed run
    (none at all when starting fresh), so the curve has each step once."""
    if not os.path.exists(path):
        return
    if position is None:
        os.remove(path)
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= position.step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
