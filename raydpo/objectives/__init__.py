"""The training objectives: what a batch's sequence log-probs turn into a loss.

- :mod:`.logps`: the batch's log-probs (:class:`PairLogps`) and the math every loss shares (log
  ratios, per-token means, f-divergence scores, smoothing).
- :mod:`.pairwise`: DPO and its relatives on chosen/rejected pairs (TRL's DPOTrainer, CPO, ORPO).
- :mod:`.unpaired`: KTO and unpaired APO on labelled single completions (TRL's KTOTrainer).
- :mod:`.registry`: ``loss.type`` names -> functions, the batch loss and its metrics, used by the
  Ray trainer and :class:`raydpo.DPO` alike.
"""

from raydpo.objectives.logps import PairLogps, log1mexp
from raydpo.objectives.registry import (
    LOSSES, UNPAIRED_LOSSES, compute_loss, is_unpaired, mean_metrics, metric_keys, pair_metrics, preference_loss,
    with_aux_loss,
)
from raydpo.objectives.unpaired import UnpairedLogps

__all__ = ["LOSSES", "UNPAIRED_LOSSES", "PairLogps", "UnpairedLogps", "compute_loss", "is_unpaired", "log1mexp",
           "mean_metrics", "metric_keys", "pair_metrics", "preference_loss", "with_aux_loss"]
