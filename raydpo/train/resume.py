"""Re-running a run: resume an unfinished one, say so for a finished one, or start over (``--force``)."""

from __future__ import annotations

import yaml

from raydpo import storage

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
        return bool(storage.read_json(summary_path).get("finished"))
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


def has_checkpoint(run_storage: str) -> bool:
    """Whether this run's Ray Train storage (``<storage path>/<run name>``, local or a URI) holds a
    checkpoint."""
    try:
        found = storage.listing(run_storage)
    except OSError:
        return False
    return any(e.is_dir and e.relative.startswith("step_") for e in found)


def latest_registered(run_storage: str) -> str | None:
    """The directory name of the latest checkpoint Ray Train's controller has registered for the run
    (the one a re-run resumes from), or None. Read from its snapshot file, local or remote."""
    try:
        snapshot = storage.read_json(storage.join(run_storage, "checkpoint_manager_snapshot.json"))
    except (OSError, ValueError):
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def prepare_run_dir(paths: dict, config_dict: dict, run_storage: str, force: bool) -> str:
    """Decide what this run does with ``output.dir``: 'fresh', 'resume' or (with ``force``) 'restart'.

    ``run_storage``: this run's own checkpoint directory (:func:`raydpo.train.stage.run_storage`);
    ``force`` removes it and nothing else of a shared ``train.storage_path``. Raises FinishedRun for
    a finished run without ``force``, and ValueError when an unfinished run's checkpoint was made
    under a config that differs in keys that change the numbers."""
    if is_finished(paths["summary"]) and not force:
        raise FinishedRun(paths["dir"])
    if force:
        storage.delete_dir(run_storage)
        for name in ("metrics", "train_result", "summary", "guard"):
            storage.delete_file(paths[name])
        storage.delete_dir(paths["model"])
        return "restart"
    storage.delete_file(paths["train_result"])
    if not has_checkpoint(run_storage):
        return "fresh"
    try:
        old = yaml.safe_load(storage.read_text(paths["config"])) or {}
    except FileNotFoundError:
        return "resume"
    changed = config_changes(old, config_dict)
    if changed:
        raise ValueError(
            f"{paths['dir']} holds an unfinished run whose checkpoints were made with other values of "
            f"{', '.join(changed)}; re-run with the same config to resume it, with --force to start over, "
            "or choose another output.dir"
        )
    return "resume"
