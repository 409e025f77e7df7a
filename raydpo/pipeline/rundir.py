"""The run directory: its files (local paths or URIs, as ``output.dir`` is) and the checks and
writes every command makes before its first stage. Shared by ``raydpo train``, the Dataset API,
``raydpo online`` and sweeps."""

from __future__ import annotations

from raydpo import config as config_mod
from raydpo import storage
from raydpo.config import Config

#: Files of a run directory, by role.
FILES = {"config": "config.yaml", "metrics": "metrics.jsonl", "quarantine": "quarantine.jsonl", "summary": "summary.json",
         "model": "model", "train_result": "train_result.json", "guard": "guard.json", "state": "online_state.json"}


def run_paths(cfg: Config) -> dict[str, str]:
    """The run directory (``dir``) and its files (:data:`FILES`)."""
    out = storage.normalize(cfg.output.dir)
    return {"dir": out} | {k: storage.join(out, v) for k, v in FILES.items()}


def start(cfg: Config) -> dict[str, str]:
    """Before any stage: the console, every written directory checked (a missing bucket or denied
    access stops here), the resolved config written, Ray up, and every node seeing the run's local
    paths (:mod:`raydpo.storage.probe`)."""
    from raydpo.cluster import ensure_ray
    from raydpo.observability import console
    from raydpo.storage.probe import check_nodes_see
    from raydpo.train.preflight import check_storage

    console.configure(cfg.logging.console, cfg.logging.progress_every_s)
    check_storage(cfg)
    paths = run_paths(cfg)
    storage.makedirs(paths["dir"])
    config_mod.dump(cfg, paths["config"])
    ensure_ray(cfg)
    check_nodes_see(cfg)
    return paths


def save_tokenizer(tokenizer, model_dir: str) -> None:
    """The policy's tokenizer beside the exported weights (``model_dir`` a local path or URI)."""
    with storage.local_dir_for_writing(model_dir) as local:
        tokenizer.save_pretrained(local)
