"""One DeepSpeed rank's policy trainer, the one both run kinds drive.

``raydpo train`` drives it epoch by epoch (:mod:`raydpo.train.loop`), ``raydpo online`` round by
round (:mod:`raydpo.online.worker`); every trainer feature (chunked or full logits, padded or
padding-free layouts, sequence parallelism, the exactness guard, checkpoints, export, weight sync)
lives here once, so neither driver can drift from the other.

There is no reference model in the trainer: the batches carry the cached reference log-probs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from raydpo.config import Config


@dataclass
class GuardSpec:
    """The exactness guard's settings for the first step (:mod:`raydpo.train.guard`)."""

    tolerance: float
    """Largest allowed per-token gap between the policy's and the cached log-probs at step 0."""
    entry: str | None
    """The cache entry the cached log-probs come from (None: given by the caller, e.g. the Dataset API)."""


class Trainer:
    """The policy on one Ray Train worker: a DeepSpeed engine with its scheduler, the settings that
    shape a batch, and the step count.

    ``cfg``: the run's config; ``model_path``: the pinned policy checkpoint every worker loads;
    ``pad_id``: the tokenizer's pad id; ``total_steps``: the schedule's length; ``guard``: check the
    first step against the cached log-probs (None: off); ``relay``: the driver's relay actor, told
    the guard's verdict (None: no relay, the error alone stops the run)."""

    def __init__(self, cfg: Config, model_path: str, pad_id: int, total_steps: int, guard: dict | None = None, relay=None):
        import ray.train

        from raydpo.models import hidden_size, weights_bytes
        from raydpo.train.devices import lean_host_allocator, release_host_memory, worker_device
        from raydpo.train.engine import build_engine, deepspeed_config
        from raydpo.train.flops import model_shape, peak_flops
        from raydpo.train.policy import build_policy, trainable_summary
        from raydpo.train.sequence_parallel import setup as setup_sp

        self.cfg, self.t, self.pad_id, self.relay = cfg, cfg.train, pad_id, relay
        self.rank = ray.train.get_context().get_world_rank()
        torch.manual_seed(self.t.seed + self.rank)
        # Flash-attention varlen skips the masked blocks of one long packed row; sdpa / eager compute them.
        self.one_row = (cfg.model.attn_implementation or "").startswith("flash_attention")
        self.share_width = share_prompt_width(cfg, model_path)
        device = worker_device(self.t.use_gpu, self.t.cpus_per_worker)
        lean_host_allocator(device, weights_bytes(model_path))
        ds_config = deepspeed_config(self.t, cfg.model.dtype, hidden_size(model_path, cfg.model.trust_remote_code))
        model = build_policy(cfg.model, model_path, device, sequence_parallel=self.t.sequence_parallel_size > 1, ds_config=ds_config)
        self.params = trainable_summary(model)
        self.shape, self.peak = model_shape(model), peak_flops(device, self.t.peak_tflops_per_device)
        self.devices = ray.train.get_context().get_world_size()
        rows = 1 if self.t.padding_free else 2 * self.t.micro_batch_size
        mpu, sp = setup_sp(model, self.t.sequence_parallel_size, self.t.zero_stage, rows)
        self.shard = sp.shard() if sp else None
        self.engine, self.scheduler = build_engine(model, self.t, cfg.model.dtype, total_steps, mpu, ds_config)
        self.model_path, self.step = model_path, 0
        self.guard = GuardSpec(**guard) if guard else None
        self.guard_drift: float | None = None
        self.totals: dict[str, float] = {}
        """The last step's metric sums over every rank (``count`` pairs, ``tokens``, ...)."""
        release_host_memory()  # what loading freed, back to the OS before the first step
        # from_pretrained returns eval mode; training must run in train mode even with no eval split
        # (gradient checkpointing and any dropout kept on act only there).
        self.engine.train()

    def collate(self, raw: dict) -> dict[str, torch.Tensor]:
        """A micro-batch of numpy columns -> the collated batch (on the host), in this trainer's layout."""
        from raydpo.data.collate import collate_rows

        return collate_rows(raw, self.pad_id, padding_free=self.t.padding_free, one_row=self.one_row,
                            pad_to_multiple_of=self.t.pad_to_multiple_of, share_prompt_width=self.share_width,
                            kl_apart=self.shard is None)

    def batch(self, raw: dict) -> dict[str, torch.Tensor]:
        """A micro-batch of numpy columns -> the collated batch on the engine's device."""
        from raydpo.train.step import to_device

        return to_device(self.collate(raw), self.engine.device)

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` raw micro-batches; returns its
        metrics row (means over every rank's pairs, learning rate, grad norm, throughput, time); the
        sums behind it stay in :attr:`totals`."""
        from raydpo.objectives import mean_metrics
        from raydpo.train.metrics import add_sums, float_or_none, global_sums
        from raydpo.train.policy import activations
        from raydpo.train.flops import step_flops
        from raydpo.train.step import step_metrics

        sums, start, lr = {}, time.perf_counter(), None
        for raw in micro_batches:
            batch = self.batch(raw)
            with activations(self.cfg.model, self.engine.device):
                loss, s, logps = step_metrics(self.engine, batch, self.cfg.loss, self.cfg.model.logits_chunk_tokens, self.shard)
            # A sequence-parallel group computes one batch together: its FLOPs count once.
            s["flops"] = step_flops(self.shape, batch, self.cfg.model.logits_chunk_tokens != 0).float() * (
                0.0 if self.shard is not None and self.shard.rank else 1.0)
            if self.guard is not None and self.step == 0 and self.guard_drift is None:
                self._check_guard(batch, logps)  # before the first update the policy is the reference
            self.engine.backward(loss)
            lr = self.scheduler.get_last_lr()[0]
            self.engine.step()
            sums = add_sums(sums, {k: v.detach() for k, v in s.items()})
        self.step += 1
        totals = self.totals = global_sums(sums)
        elapsed = time.perf_counter() - start
        return {**{k: v for k, v in mean_metrics(totals).items() if k not in ("tokens", "flops")}, "learning_rate": lr,
                "grad_norm": float_or_none(self.engine.get_global_grad_norm()), "pairs_per_s": totals["count"] / elapsed,
                **self.throughput(totals, elapsed), "step_time_s": elapsed, "time": time.time()}

    def throughput(self, totals: dict, elapsed: float) -> dict[str, float]:
        """Tokens/s (all devices and per device), model TFLOP/s per device and, where the device's peak
        is known (:func:`raydpo.train.flops.peak_flops`), MFU, of a step of ``elapsed`` seconds."""
        per_device = totals["flops"] / elapsed / self.devices
        row = {"tokens_per_s": totals["tokens"] / elapsed, "tokens_per_s_per_device": totals["tokens"] / elapsed / self.devices,
               "tflops_per_device": per_device / 1e12}
        return row | ({"mfu": per_device / self.peak} if self.peak else {})

    def _check_guard(self, batch: dict, logps: torch.Tensor) -> None:
        """Compare the policy's log-probs at step 0 with the cached ones (every rank; MAX-reduced)."""
        from raydpo.data.collate import sequence_tokens
        from raydpo.train.guard import check, token_drift

        if "ref_chosen_logps" not in batch:  # reference-free loss: nothing cached to check
            self.guard = None
            return
        cached = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        drift = token_drift(logps, cached, sequence_tokens(batch))
        self.guard_drift = check(drift, self.guard.tolerance, self.relay, self.rank == 0, self.guard.entry)

    def evaluate(self, rows: dict | None) -> dict[str, float]:
        """``eval/*`` metric means over every worker's eval split (``rows``: this worker's, loaded
        once; None or empty still joins the reduction)."""
        from raydpo.train.step import evaluate

        return evaluate(self.engine, rows, self.t.micro_batch_size, self.collate, self.cfg.loss,
                        self.cfg.model.logits_chunk_tokens)

    def restore(self):
        """Load the latest Ray Train checkpoint, if any; returns its Position (None: a fresh start).
        A restored policy has moved on from the reference: the guard is off."""
        from raydpo.train.checkpoint import restore

        position = restore(self.engine, self.rank)
        if position is not None:
            self.step, self.guard = position.step, None
        return position

    def checkpoint(self, position, report: dict, name: str | None = None) -> None:
        """Save this rank's part of a checkpoint at ``position`` and report it (every rank calls it)."""
        from raydpo.train.checkpoint import save

        save(self.engine, position, self.rank, report, name)

    def weights(self) -> dict:
        """The full policy as a plain Hugging Face state dict, LoRA merged (a collective; {} off rank 0)."""
        from raydpo.train.weights import policy_state
        from raydpo.train.export import settled

        return policy_state(settled(self.engine), self.rank == 0, self.cfg.model.lora.r > 0)

    def export(self, model_dir: str) -> None:
        """Write the trained policy to ``model_dir`` (a collective; rank 0 writes)."""
        from raydpo.train.export import export_model, settled

        export_model(settled(self.engine), model_dir, self.rank == 0, self.cfg.model, self.model_path,
                     self.cfg.output.save_adapter_only)


def share_prompt_width(cfg: Config, model_path: str) -> int:
    """Widest pair the trainer computes as one shared-prompt unit (:mod:`raydpo.data.shared`); 0: off
    (``train.share_prompt`` false, or :func:`raydpo.config.rules.share_prompt_issue`, which the
    driver's preflight has already said or refused). A dense mask bounds it; a block mask does not."""
    import sys

    from transformers import AutoConfig

    from raydpo.config.rules import share_prompt_issue
    from raydpo.data.shared import DENSE_MAX_WIDTH
    from raydpo.models import resolve_local

    if cfg.train.share_prompt is False:
        return 0
    config = AutoConfig.from_pretrained(resolve_local(model_path), trust_remote_code=cfg.model.trust_remote_code)
    if share_prompt_issue(cfg, config):
        return 0
    return sys.maxsize if cfg.model.attn_implementation == "flex_attention" else DENSE_MAX_WIDTH
