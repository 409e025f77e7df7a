"""Re-running a run: resume an unfinished one, say so for a finished one, or start over (``--force``)."""

from __future__ import annotations

import json
import os
import shutil

import yaml

#: Keys that may change between an interrupted run and its resumption: where and how wide things
#: run, and how often it logs and checkpoints, but nothing that changes the numbers.
RESUMABLE_CHANGES = {
    "ray": None,
    "logging": None,
    "train": {"max_failures", "keep_checkpoints", "checkpoint_every", "log_every", "eval_every", "storage_path"},
    "reference": {"num_actors", "num_cpus_per_actor", "num_gpus_per_actor", "resources", "accelerator_type",
                  "max_restarts", "max_task_retries", "batch_size", "max_tokens_per_batch", "guard"},
    "data": {"num_workers", "tokenize_batch_size"},
    "online": {"checkpoint_every"},
}


class FinishedRun(Exception):
    """``output.dir`` holds a finished run and ``--force`` was not given."""


def is_finished(summary_path: str) -> bool:
    try:
        with open(summary_path) as f:
            return bool(json.load(f).get("finished"))
    except (OSError, ValueError):
        return False


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ and may not (see ``RESUMABLE_CHANGES``)."""
    out = []
    for section in sorted(set(old) | set(new)):
        allowed = RESUMABLE_CHANGES.get(section, set())
        if allowed is None:
            continue
        a, b = old.get(section) or {}, new.get(section) or {}
        out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if k not in allowed and a.get(k) != b.get(k)]
    return out


def has_checkpoint(storage_path: str) -> bool:
    """Whether Ray Train's storage for this run holds a checkpoint (local or remote)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(storage_path) if "://" in storage_path else (pafs.LocalFileSystem(), storage_path)
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/train", allow_not_found=True))
    except OSError:
        return False
    return any(i.type == pafs.FileType.Directory and os.path.basename(i.path).startswith("step_") for i in infos)


def latest_registered(storage_path: str) -> str | None:
    """The directory name of the latest checkpoint Ray Train's controller has registered for the run
    (the one a re-run resumes from), or None. Read from its snapshot file, local or remote."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(storage_path) if "://" in storage_path else (pafs.LocalFileSystem(), storage_path)
        with fs.open_input_stream(f"{root}/train/checkpoint_manager_snapshot.json") as f:
            snapshot = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def remove_storage(storage_path: str) -> None:
    import pyarrow.fs as pafs

    if "://" in storage_path:
        fs, root = pafs.FileSystem.from_uri(storage_path)
        try:
            fs.delete_dir(root)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(storage_path, ignore_errors=True)


def prepare_run_dir(paths: dict, config_dict: dict, storage_path: str, force: bool) -> str:
    """Decide what this run does with ``output.dir``: 'fresh', 'resume' or (with ``force``) 'restart'.

    Raises FinishedRun for a finished run without ``force``, and ValueError when an unfinished run's
    checkpoint was made under a config that differs in keys that change the numbers."""
    if is_finished(paths["summary"]) and not force:
        raise FinishedRun(paths["dir"])
    if force:
        remove_storage(storage_path)
        for name in ("metrics", "train_result", "summary", "guard"):
            if os.path.exists(paths[name]):
                os.remove(paths[name])
        shutil.rmtree(paths["model"], ignore_errors=True)
        return "restart"
    if os.path.exists(paths["train_result"]):
        os.remove(paths["train_result"])
    if not has_checkpoint(storage_path):
        return "fresh"
    if os.path.exists(paths["config"]):
        with open(paths["config"]) as f:
            changed = config_changes(yaml.safe_load(f) or {}, config_dict)
        if changed:
            raise ValueError(
                f"{paths['dir']} holds an unfinished run whose checkpoints were made with other values of "
                f"{', '.join(changed)}; re-run with the same config to resume it, with --force to start over, "
                "or choose another output.dir"
            )
    return "resume"
