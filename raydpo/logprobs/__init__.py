"""Sequence log-probabilities of completions, the quantity every preference loss is built on.

Convention (TRL's): the log-prob of a completion is the **sum** over its tokens of
``log p(token | prefix)``, logits shifted by one so position t predicts token t+1, the prompt
and padding masked out, accumulated in float32 whatever the model's dtype.

- :mod:`.full`: the definition on a ``[B, T, V]`` logits tensor (and the batch helpers).
- :mod:`.chunked`: the same numbers from the final hidden states, ``lm_head`` applied in chunks of
  scored positions only, so no ``[T, V]`` tensor ever exists (recomputed in backward).
- :mod:`.forward`: one forward of a collated batch (padded, padding-free or one sequence-parallel
  shard of it) -> per-sequence log-probs (LD-DPO-weighted with ``ld_alpha``, WPO sums and the MoE
  router loss on request); the one entry point of the trainer, the reference actors and ``raydpo.DPO``.
"""

from raydpo.logprobs.forward import SequenceScores, forward_logps, forward_scores, sum_by_sequence
from raydpo.logprobs.full import position_ids_from_mask, scored_tokens, sequence_logps, split_pairs, token_logps

__all__ = ["SequenceScores", "forward_logps", "forward_scores", "position_ids_from_mask", "scored_tokens",
           "sequence_logps", "split_pairs", "sum_by_sequence", "token_logps"]
