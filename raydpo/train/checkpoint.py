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


def _rng_files(rank: int) -> tuple[str, str]:
    """This rank's RNG state files: tensors (torch, CUDA) and JSON (numpy, Python)."""
    return f"rng_rank{rank:05d}.pt", f"rng_rank{rank:05d}.json"


def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON-able values) of this process's RNGs: nothing that needs pickle to load."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    plain = {"numpy": [name, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), gauss_next]}
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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
        tensors, plain = rng_state()
        tensor_file, json_file = _rng_files(rank)
        torch.save(tensors, os.path.join(tmp, tensor_file))
        with open(os.path.join(tmp, json_file), "w") as f:
            json.dump(plain, f)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(position), f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name or checkpoint_name(position))


def restore(engine, rank: int) -> Position | None:
    """Load the latest checkpoint into ``engine`` and this process's RNGs; None when starting fresh.
    Nothing in it is unpickled: RNG tensors load with ``weights_only=True``, the rest is JSON."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path, _ = engine.load_checkpoint(d, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed state")
        tensor_file, json_file = _rng_files(rank)
        tensors = torch.load(os.path.join(d, tensor_file), weights_only=True)
        with open(os.path.join(d, json_file)) as f:
            plain = json.load(f)
        with open(os.path.join(d, STATE_FILE)) as f:
            position = Position(**json.load(f))
    set_rng_state(tensors, plain)
    return position


def trim_metrics(path: str, position: Position | None) -> list[dict]:
    """metrics.jsonl (a local path or URI) as of the checkpoint: rows logged after it are logged
    again by the resumed run (none at all when starting fresh), so the curve has each step once.
    Returns the rows kept."""
    from raydpo import storage

    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return []
    if position is None:
        storage.delete_file(path)
        return []
    keep = [json.loads(line) for line in text.splitlines() if line.strip()]
    keep = [row for row in keep if row["step"] <= position.step]
    storage.write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
    return keep
