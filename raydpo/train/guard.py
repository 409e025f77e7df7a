"""Exactness guard: at step 0 the policy *is* the reference, so its log-probs must match the cache.

The first micro-batch of every worker is scored by the policy anyway (for the first step's loss);
before any optimizer step those log-probs are the reference's own, computed inside the trainer.
Comparing them with the cached ``ref_*_logps`` catches a cache entry that does not belong to this
model, tokenizer or dtype (a stale or hand-copied cache, a backend bug) before the run trains on
wrong rewards. No extra forward pass is spent.

The drift is measured per completion token (a sum over 500 tokens may drift more than one over 5):
``max_i |policy_i - cached_i| / completion_tokens_i`` over the checked sequences, reduced with MAX
over all workers so every rank takes the same decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Default tolerance per completion token, by the looser of the policy's and reference's dtypes.
#: float32: both sides run the same float32 log-softmax; batch composition and padding move results
#: by ~1e-6 per token. bf16/fp16 weights move them by ~1e-3 to 1e-2 per token.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 5e-2}
#: A quantized reference drifts from the full-precision policy by design (docs/performance.md: measured figures);
#: these bounds still catch a cache that belongs to another model (gaps of 1 or more per token).
QUANTIZED_TOLERANCE = {"8bit": 5e-2, "4bit": 2.5e-1}
GUARD_FILE = "guard.json"


class GuardError(RuntimeError):
    """The cached reference log-probs are not the reference's."""


def guard_tolerance(policy_dtype: str, reference_dtype: str, configured: float | None, quantization: str | None = None) -> float:
    """The configured tolerance, or the default for the looser of the two dtypes and the quantization."""
    if configured is not None:
        return configured
    return max(DEFAULT_TOLERANCE[policy_dtype], DEFAULT_TOLERANCE[reference_dtype], QUANTIZED_TOLERANCE.get(quantization, 0.0))


def token_drift(policy_logps: "torch.Tensor", cached_logps: "torch.Tensor", completion_tokens: "torch.Tensor") -> "torch.Tensor":
    """Largest per-token gap between the policy's and the cached sequence log-probs.

    All arguments [N] (N sequences); returns a float32 scalar on the inputs' device.
    """
    gap = (policy_logps.detach().float() - cached_logps.float()).abs()
    return (gap / completion_tokens.float().clamp(min=1)).max()


def check(drift: "torch.Tensor", tolerance: float, relay, is_rank0: bool, entry: str) -> float:
    """Reduce ``drift`` with MAX over all ranks; rank 0 posts the verdict to the driver's ``relay``
    (:mod:`raydpo.train.relay`); raise GuardError above ``tolerance``."""
    import torch.distributed as dist

    from raydpo.train.devices import all_reduce

    worst = all_reduce(drift.detach().float(), dist.ReduceOp.MAX) if dist.is_initialized() else drift.detach().float()
    value = float(worst)
    ok = value <= tolerance
    if is_rank0 and relay is not None:
        import ray

        ray.get(relay.set_guard.remote({"ok": ok, "max_token_drift": value, "tolerance": tolerance, "cache_entry": entry}))
    if not ok:
        raise GuardError(failure_message(value, tolerance, entry))
    return value


def failure_message(value: float, tolerance: float, entry: str | None) -> str:
    """Why the run stopped and what to do. ``entry``: the cache entry the log-probs came from, or
    None when the caller passed them in (``raydpo.train_on_pairs``, online rounds)."""
    source = "cached reference log-probs" if entry is not None else "reference log-probs given with the pairs"
    head = (f"exactness guard: the {source} differ from the policy's own at step 0 by up to "
            f"{value:.3g} per completion token (tolerance {tolerance:.3g}), so the rewards would be wrong. ")
    tail = "if the reference is deliberately not the policy's starting point, set reference.guard=false."
    if entry is None:
        return head + ("They were not computed by this reference model, tokenizer or dtype: score the pairs with "
                       "raydpo.score_pairs on this config, or, " + tail)
    return head + (f"The cache entry {entry} does not match this reference model, tokenizer or dtype. Remove it "
                   f"(`raydpo cache prune --key {entry.rstrip('/').rsplit('/', 1)[-1]} --min-age-minutes 0`) and run again, or, " + tail)


def verdict_failure(verdict: dict | None) -> str | None:
    """The guard's failure message for a verdict the relay holds, else None."""
    if not verdict or verdict["ok"]:
        return None
    return failure_message(verdict["max_token_drift"], verdict["tolerance"], verdict["cache_entry"])
