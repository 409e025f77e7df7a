"""Log-probs from a full ``[B, T, V]`` logits tensor: the definition, and the path of
``model.logits_chunk_tokens: 0`` (see :mod:`raydpo.logprobs` for the convention)."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same logits.

    attention_mask: [B, T] (1 = token, 0 = pad) -> position_ids: [B, T] (pads get 0).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()


def scored_tokens(completion_mask: torch.Tensor) -> torch.Tensor:
    """Completion tokens that get a prediction, per sequence: [B, T] -> [B] float32 (a completion
    token at position 0 has no prefix and is not scored)."""
    return completion_mask[:, 1:].sum(-1).float()


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``logits`` [..., V] (any dtype) at ``targets`` [...] -> [...] float32.

    gather - logsumexp avoids materialising a second [..., V] float32 log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log sum_v p_v^2`` of the softmax of ``logits`` [..., V] -> [...] float32, without gradient
    (WPO's alignment term, TRL's fused head ``log_sum_sq_probs``): ``logsumexp(2z) - 2 logsumexp(z)``."""
    logits = logits.float()
    return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every position.

    logits: [B, T, V] (any dtype), input_ids: [B, T] -> [B, T-1] float32.
    """
    return target_logps(logits[:, :-1], input_ids[:, 1:])


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence.

    logits: [B, T, V]; input_ids, completion_mask: [B, T], the mask aligned to ``input_ids``
    (1 on completion tokens, 0 on prompt and padding) -> [B] float32.
    The mask is shifted with the targets, so the first completion token is scored (from the
    last prompt position) and no pad token is.
    """
    per_token = token_logps(logits, input_ids)
    return (per_token * completion_mask[:, 1:].float()).sum(-1)


def split_pairs(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] -> ([B] chosen, [B] rejected), undoing the chosen-then-rejected concatenation."""
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]
