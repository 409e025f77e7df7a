"""One micro-batch's loss and metrics on the policy, and the eval pass over a split.

Shared by the trainer's step (:class:`raydpo.train.trainer.Trainer`) and by the checks that drive a
DeepSpeed engine directly (bench/, tests/).
"""

from __future__ import annotations

import torch

from raydpo.train.metrics import add_sums, global_sums


def to_device(batch: dict, device) -> dict:
    """Every tensor of a collated batch (and of its nested batches) on ``device`` (copies overlap
    compute where the device allows)."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True) for k, v in batch.items()}


def policy_scores(engine, batch: dict, loss_cfg, chunk_tokens, shard, router_logits: bool):
    """The policy's :class:`raydpo.logprobs.SequenceScores` of a batch ([2B]): an unpaired batch's KL
    sequences, collated apart (``kl``), go through a second forward without gradient (their term in
    KTO's loss is detached: TRL's KTOTrainer scores them under ``no_grad`` too, and the MoE router
    loss is the completions' alone there as well); the backward then covers the completions only."""
    from raydpo.logprobs import SequenceScores, forward_scores

    main = {k: v for k, v in batch.items() if k != "kl"}
    scores = forward_scores(engine, main, chunk_tokens, shard, loss_cfg.ld_alpha, loss_cfg.use_weighting, router_logits)
    if "kl" not in batch:
        return scores
    with torch.no_grad():
        kl = forward_scores(engine, batch["kl"], chunk_tokens, shard, loss_cfg.ld_alpha).logps
    logps = torch.cat([scores.logps, kl])
    return SequenceScores(logps, torch.cat([scores.plain, kl]), None, scores.aux_loss)


def rank_mean(value: torch.Tensor) -> torch.Tensor:
    """A 0-d statistic averaged over all ranks (KTO's KL term: TRL's ``gather_for_metrics(kl).mean()``)."""
    import torch.distributed as dist

    from raydpo.train.devices import all_reduce

    if not dist.is_initialized():
        return value
    return all_reduce(value) / dist.get_world_size()


def step_metrics(engine, batch: dict, loss_cfg, chunk_tokens=None, shard=None, across_ranks: bool = True,
                 ) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Loss (mean over pairs or examples), metric sums and the policy's sequence log-probs ([2B]:
    chosen then rejected, or completions then KL sequences) of one micro-batch. batch from
    ``collate_rows``; ``loss_cfg`` the ``loss`` section; ``chunk_tokens`` ``model.logits_chunk_tokens``;
    ``shard`` this rank's sequence-parallel part; ``across_ranks``: KTO's KL estimate is averaged over
    the ranks (training, where every rank steps together), else this rank's batch alone (eval). With
    an MoE router loss (``loss.router_aux_loss_coef``, :func:`aux_coef`) the loss includes it."""
    from raydpo.data.collate import computed_tokens, sequence_tokens
    from raydpo.objectives import preference_loss, with_aux_loss

    coef = aux_coef(engine, loss_cfg)
    scores = policy_scores(engine, batch, loss_cfg, chunk_tokens, shard, coef != 0)
    logps = scores.logps
    tokens = sequence_tokens(batch)
    ref = (batch["ref_chosen_logps"], batch["ref_rejected_logps"]) if "ref_chosen_logps" in batch else None
    _, (losses, _, _), sums = preference_loss(logps, tokens, ref, loss_cfg, batch.get("label"),
                                              rank_mean if across_ranks else None, scores.plain, scores.aligned)
    loss, sums = with_aux_loss(losses.mean(), sums, scores.aux_loss, coef)
    sums["tokens"] = computed_tokens(batch)
    if shard is not None and shard.rank:  # the group's ranks hold the same pairs: counted once
        sums = {k: v * 0 for k, v in sums.items()}
    return loss, sums, logps


def aux_coef(engine, loss_cfg) -> float:
    """The MoE router loss weight for the policy in ``engine`` (0: off; TRL's reading of
    ``loss.router_aux_loss_coef``, :func:`raydpo.config.rules.router_aux_coef`)."""
    from raydpo.config.rules import router_aux_coef
    from raydpo.logprobs.chunked import unwrap

    return router_aux_coef(loss_cfg, unwrap(engine).config)


def evaluate(engine, rows: dict, mb: int, collate, loss_cfg, chunk_tokens=None) -> dict[str, float]:
    """Metric means over this worker's whole eval split, reduced over all workers (each its own
    pairs, whole: sequence parallelism is off in eval).

    ``rows``: the split as numpy columns (:func:`raydpo.train.batches.load_rows`, loaded once per
    run), read in micro-batches of ``mb`` pairs, the last one partial; ``collate``: raw columns ->
    the collated batch, in the trainer's layout."""
    from raydpo.objectives import mean_metrics, metric_keys

    engine.eval()
    sums: dict = {}
    n = len(rows["prompt_ids"]) if rows else 0
    with torch.no_grad():
        for start in range(0, n, mb):
            raw = {k: v[start : start + mb] for k, v in rows.items()}
            _, s, _ = step_metrics(engine, to_device(collate(raw), engine.device), loss_cfg, chunk_tokens, across_ranks=False)
            sums = add_sums(sums, s)
    engine.train()
    if not sums:  # an empty shard still joins the collective with zeros
        sums = {k: torch.tensor(0.0, device=engine.device) for k in metric_keys(loss_cfg, aux_coef(engine, loss_cfg) != 0)}
    totals = global_sums({k: torch.as_tensor(v) for k, v in sums.items()})
    totals.pop("tokens")
    return {f"eval/{k}": v for k, v in mean_metrics(totals).items()} | {"eval/pairs": totals["count"]}
