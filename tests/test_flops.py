"""Model FLOPs (raydpo.train.flops) against torch's own FLOP counter, and the layouts' counts."""

import pytest
import torch

from raydpo.data.collate import collate_pairs, collate_rows
from raydpo.data.shared import collate_shared
from raydpo.train.flops import attended_pairs, model_shape, pass_flops, peak_flops, step_flops

PAIRS = ([[5, 6, 7, 8, 9], [10, 11]], [[12, 13, 14], [15, 16, 17, 18]], [[19, 20], [21, 22, 23]])


def tri(n):
    return n * (n + 1) / 2


def test_a_shared_prompt_counts_once():
    """Two rows per pair attend tri(p + c) + tri(p + r) pairs; one shared unit tri(p) fewer (the
    prompt's second pass), and the same tokens less the prompt's second copy."""
    padded, shared = collate_pairs(*PAIRS, 0), collate_shared(*PAIRS, 0)
    p, c, r = ([len(x) for x in col] for col in PAIRS)
    want_padded = sum(tri(a + b) + tri(a + d) for a, b, d in zip(p, c, r))
    assert float(attended_pairs(padded)) == want_padded
    assert float(attended_pairs(shared)) == want_padded - sum(tri(a) for a in p)
    free = collate_rows(dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), PAIRS)), 0, padding_free=True)
    assert float(attended_pairs(free)) == want_padded
    shared_free = collate_shared(*PAIRS, 0, padding_free=True)
    assert float(attended_pairs(shared_free)) == float(attended_pairs(shared))


def test_model_flops_equal_torchs_flop_counter(tiny_model_dir):
    """One forward and backward with full logits of a batch without padding, counted by
    ``torch.utils.flop_counter``: its matmuls are ours (6 per parameter per token, the head on every
    position; ours also counts the norms' few weights), and eager attention's batched matmuls count
    the whole T x T square where ours counts the causal half."""
    from torch.utils.flop_counter import FlopCounterMode

    from raydpo.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, attn_implementation="eager").train()
    shape = model_shape(model)
    assert shape.body_params + shape.head_params < sum(p.numel() for p in model.parameters()) + shape.head_params
    cols = ([[5 + i] * 7 for i in range(3)], [[40 + i] * 9 for i in range(3)], [[80 + i] * 9 for i in range(3)])
    batch = collate_pairs(*cols, 0)  # six rows of 16 tokens, no padding
    with FlopCounterMode(display=False) as counter:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float().sum().backward()
    rows, width = batch["input_ids"].shape
    square = 12.0 * shape.layers * shape.attention_width * rows * width * width
    ours = float(pass_flops(shape, batch, chunked=False, backward=True))
    causal = 12.0 * shape.layers * shape.attention_width * rows * tri(width)
    counts = counter.get_flop_counts()["Global"]
    assert square == counts[torch.ops.aten.bmm]
    assert ours - causal + square == pytest.approx(counter.get_total_flops(), rel=0.005)


def test_kl_sequences_apart_count_a_forward_only():
    raw = dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), PAIRS)) | {"label": [1, 0]}
    from raydpo.train.flops import ModelShape

    shape = ModelShape(1000, 100, 2, 8)
    joint, apart = collate_rows(raw, 0), collate_rows(raw, 0, kl_apart=True)
    main = {k: v for k, v in apart.items() if k != "kl"}
    assert float(step_flops(shape, apart, True)) == pytest.approx(
        float(pass_flops(shape, main, True, True)) + float(pass_flops(shape, apart["kl"], True, False)))
    assert float(step_flops(shape, apart, True)) < float(step_flops(shape, joint, True))


def test_peak_flops_is_omitted_on_a_cpu_unless_set():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12
