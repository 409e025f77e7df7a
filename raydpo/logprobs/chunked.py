"""Token log-probs from the final hidden states, ``lm_head`` applied a chunk of positions at a time.

With a 152k-token vocabulary the ``[T, V]`` float32 logits of one 4k-token sequence are 2.5 GB, and
their log-softmax and gradient as much again, against a few MB of hidden states. Here the model's own
forward runs with its output head cut to the last position (a forward pre-hook on
``get_output_embeddings()``), its input, the final hidden states ``[B, T, H]``, is kept, and only
the **scored** positions (completion tokens, TRL's ``logits_to_keep`` idea taken per token) go
through the head, in chunks of ``chunk`` positions: ``logits -> float32 -> final transform ->
gather - logsumexp``. With gradients each chunk is a non-reentrant ``torch.utils.checkpoint``, so
its logits are recomputed in backward instead of kept: peak memory is one chunk's logits.

Why not DeepSpeed's ALST pieces (``deepspeed.runtime.sequence_parallel.ulysses_sp``):
``TiledFusedLogitsLoss`` runs the backward inside the forward with an incoming gradient of 1, which
is right for a loss that is a sum over tokens (SFT's cross-entropy), not for DPO's, a non-linear
function of per-sequence sums; ``SequenceTiledCompute``'s backward requires the output to have its
input's shape (the tiled MLP) or be one scalar. torch's checkpoint gives the same recomputation for
any downstream loss, and works under ZeRO-3 as gradient checkpointing does (the head module's hooks
gather its weight again on recomputation).

The model's last-position logits, which it still computes, check the transform once per head: a
family whose logits are not ``transform(lm_head(hidden))`` stops with a clear error instead of
training on wrong numbers.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from raydpo.families.rules import logit_transform
from raydpo.logprobs.full import log_sum_sq_probs, target_logps

#: float32 logits of one chunk are kept at most this many elements (128 MiB) by the automatic size;
#: at a 152k vocabulary 256 MiB chunks made a 4k-token step's peak 1.67 GB, 128 MiB ones 1.15 GB, at
#: the same speed (bench/long_context.py).
AUTO_CHUNK_ELEMENTS = 1 << 25
#: Bounds of the automatic chunk, in positions.
AUTO_CHUNK_MIN, AUTO_CHUNK_MAX = 128, 1 << 16


def auto_chunk(vocab_size: int) -> int:
    """Scored positions per head chunk when ``model.logits_chunk_tokens`` is unset: as many as keep a
    chunk's float32 logits within :data:`AUTO_CHUNK_ELEMENTS` (220 at a 152k vocabulary, 16,384 at 2k)."""
    return max(AUTO_CHUNK_MIN, min(AUTO_CHUNK_MAX, AUTO_CHUNK_ELEMENTS // max(1, vocab_size)))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DeepSpeed engine (``.module``); peft models pass through."""
    return model.module if hasattr(model, "module") and hasattr(model, "optimizer") else model


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that maps final hidden states to logits (``lm_head``; tied or not), or None."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    return get() if get is not None else None


@contextlib.contextmanager
def captured_hidden(head: torch.nn.Module) -> Iterator[dict]:
    """Inside the block the first call of ``head`` records its input under ``"hidden"`` ([B, T, H])
    and runs on the last position only ([B, 1, H]); later calls (the chunks) pass through."""
    store: dict = {}

    def pre_hook(module, args):
        if "hidden" in store or not args:
            return None
        store["hidden"] = args[0]
        return (args[0][..., -1:, :], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield store
    finally:
        handle.remove()


def partitioned(head: torch.nn.Module) -> bool:
    """Whether ``head``'s weights are ZeRO-3 partitioned: each call of it is then a collective
    gather, and every rank must call it equally often."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and any(hasattr(p, "ds_id") for p in head.parameters())


def chunk_count(n: int, chunk: int, collective: bool) -> int:
    """Head calls for ``n`` positions; with ``collective`` the most over all ranks (a rank with fewer
    scored positions makes empty calls, so ZeRO-3's gathers match up)."""
    count = max(1, -(-n // chunk))
    if not collective:
        return count
    import torch.distributed as dist

    from raydpo.train.devices import all_reduce

    # On the collective's device: NCCL (GPU workers) has no CPU backend.
    return int(all_reduce(torch.tensor([count], dtype=torch.long), dist.ReduceOp.MAX).item())


def recomputable(head: torch.nn.Module) -> bool:
    """Whether a chunk's logits can be recomputed in backward. Not for a frozen ZeRO-3 head (LoRA's
    lm_head under ZeRO-3): ZeRO-3 gathers a module's weights for backward only when they train, so
    the recomputation would meet the empty partition; those chunks keep their logits instead (still
    only the scored positions')."""
    return not partitioned(head) or any(p.requires_grad for p in head.parameters())


def head_logps(head: torch.nn.Module, transform: Callable, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
               count: int | None = None, sum_sq: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) at each scored position, and with ``sum_sq`` ``log sum_v p_v^2`` there (WPO).

    hidden: [N, H] (model dtype) final hidden states of the predicting positions; targets: [N] token
    ids -> ([N] float32, [N] float32 without gradient or None). ``chunk`` positions per head call, in
    ``count`` calls (default: as many as needed; more give empty calls); with gradients and more than
    one call, each chunk's logits are recomputed in backward (one chunk's logits alive at a time)."""
    def piece(h: torch.Tensor, y: torch.Tensor):
        logits = transform(head(h).float())  # [n, V]
        # The no-grad term comes last and saves nothing: checkpoint's recomputation in backward stops
        # once the saved tensors of the log-probs are rebuilt, so it does not run twice.
        return target_logps(logits, y), log_sum_sq_probs(logits) if sum_sq else None

    count = count or max(1, -(-hidden.shape[0] // chunk))
    bounds = [min(i * chunk, hidden.shape[0]) for i in range(count)] + [hidden.shape[0]]
    chunks = [(hidden[a:b], targets[a:b]) for a, b in zip(bounds, bounds[1:])]
    if count == 1 or not (torch.is_grad_enabled() and hidden.requires_grad) or not recomputable(head):
        parts = [piece(h, y) for h, y in chunks]
    else:
        parts = [checkpoint(piece, h, y, use_reentrant=False) for h, y in chunks]
    logps, sq = zip(*parts)
    return torch.cat(logps), torch.cat(sq) if sum_sq else None


def check_transform(head: torch.nn.Module, transform: Callable, hidden_last: torch.Tensor, model_logits: torch.Tensor,
                    config) -> None:
    """Stop unless ``transform(head(h))`` equals the model's own logits on the last positions.

    hidden_last: [B, 1, H]; model_logits: [B, 1, V] (what the model returned from the cut head)."""
    with torch.no_grad():
        ours = transform(head(hidden_last).float())
    theirs = model_logits.float()
    half = hidden_last.dtype in (torch.float16, torch.bfloat16)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=2e-2 if half else 1e-5, atol=2e-2 if half else 1e-5):
        diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("nan")
        raise RuntimeError(
            f"chunked log-probs: model_type {getattr(config, 'model_type', '?')!r} computes its logits with more than "
            f"its output embeddings and the final transform raydpo knows (soft-capping, logit scale); max difference "
            f"{diff:.3g}. Set model.logits_chunk_tokens: 0 to score from the model's full logits")


def chunked_token_logps(model: torch.nn.Module, inputs: dict, rows: torch.Tensor, cols: torch.Tensor,
                        targets: torch.Tensor, chunk: int | None, sum_sq: bool = False) -> tuple | None:
    """One forward of ``model(**inputs)`` -> log-probs of ``targets`` at positions ``(rows, cols)``.

    rows, cols, targets: [N] (the predicting position and the token it predicts) -> ([N] float32,
    ``log sum_v p_v^2`` [N] with ``sum_sq`` else None, the model's output), or None when the model
    has no output head to cut (the caller then scores full logits)."""
    head = output_head(model)
    if head is None:
        return None
    config = unwrap(model).config
    transform = logit_transform(config)
    with captured_hidden(head) as store:
        out = model(**inputs)
    if "hidden" not in store:
        return None
    hidden = store["hidden"]  # [B, T, H]
    if not getattr(head, "_raydpo_transform_checked", False):
        check_transform(head, transform, hidden[..., -1:, :], out.logits, config)
        head._raydpo_transform_checked = True
    size = chunk or auto_chunk(int(out.logits.shape[-1]))
    count = chunk_count(rows.shape[0], size, partitioned(head))
    return (*head_logps(head, transform, hidden[rows, cols], targets, size, count, sum_sq), out)
