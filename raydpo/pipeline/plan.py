"""The run planned once: what every stage needs that follows from the config and the disk.

``raydpo train``, ``raydpo online`` and the Dataset API resolve the policy and reference once (a
local directory, or a hub id pinned at the revision this driver downloaded), the run directory and
Ray Train's storage, and load the tokenizer at most once, on first use (the caches' keys hold the
class and pipeline it builds: :func:`raydpo.data.tokenizer.tokenizer_key`). The stages receive
this object instead of re-deriving each part from ``cfg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from raydpo.config import Config


@dataclass
class RunPlan:
    """One run's resolved inputs and outputs."""

    cfg: Config
    """The validated config."""
    paths: dict[str, str]
    """The run directory and its files (:func:`raydpo.pipeline.rundir.run_paths`)."""
    model: str
    """The policy as every node loads it: a local directory, or a hub id pinned at a revision."""
    model_dir: str
    """This driver's local copy of the policy (what preflight checks read)."""
    reference: str | None
    """The reference model, pinned like :attr:`model`; None when the loss reads no reference."""
    run_storage: str
    """Where Ray Train keeps this run's checkpoints (``train.storage_path`` / run name)."""

    @cached_property
    def tokenizer(self):
        """The policy's tokenizer, loaded on first use (:func:`raydpo.models.load_tokenizer`, memoized)."""
        from raydpo.models import load_tokenizer

        return load_tokenizer(self.model, self.cfg.model.trust_remote_code)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def reference_is_policy(self) -> bool:
        """Whether the reference is the weights the policy starts from (the exactness guard applies)."""
        return self.reference is not None and self.reference == self.model


def plan_run(cfg: Config) -> RunPlan:
    """Resolve ``cfg``'s models, run directory and checkpoint storage (downloads a hub model's
    snapshot on first use; nothing is loaded)."""
    from raydpo.config import reference_path, uses_reference
    from raydpo.models import pin, resolve_local
    from raydpo.pipeline.rundir import run_paths
    from raydpo.train.stage import run_storage

    model = pin(cfg.model.name_or_path)  # each worker loads this very revision on its own node
    reference = pin(reference_path(cfg)) if uses_reference(cfg) else None
    return RunPlan(cfg=cfg, paths=run_paths(cfg), model=model, model_dir=resolve_local(model), reference=reference,
                   run_storage=run_storage(cfg))
