"""The run, chained: ``raydpo train`` on files (:mod:`.offline`), the same stages as functions on
``ray.data.Dataset`` s for pipelines that make their own pairs (:mod:`.datasets`), and the run
directory every command writes (:mod:`.rundir`)."""

from raydpo.pipeline.offline import (
    RunResult, precompute, prepare_data, run, score_reference, train_policy, validate_data,
)
from raydpo.pipeline.datasets import score_pairs, tokenize_pairs, train_on_pairs

__all__ = ["RunResult", "precompute", "prepare_data", "run", "score_pairs", "score_reference", "tokenize_pairs", "train_on_pairs",
           "train_policy", "validate_data"]
