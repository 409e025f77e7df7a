"""Packed pairs (prompt computed once) score what two separate rows per pair score."""

import random

import torch

from raydpo.data.collate import collate_pairs
from raydpo.logprobs import forward_logps, split_pairs
from raydpo.reference.packing import pack_pairs, packed_logps


def random_pairs(n: int, seed: int, vocab: int, min_prompt: int = 1):
    rng = random.Random(seed)
    tok = lambda k: [rng.randint(5, vocab - 1) for _ in range(k)]  # noqa: E731
    return ([tok(rng.randint(min_prompt, 40)) for _ in range(n)], [tok(rng.randint(1, 25)) for _ in range(n)],
            [tok(rng.randint(1, 25)) for _ in range(n)])


def test_packed_equals_two_rows_per_pair(tiny_model_dir, tokenizer):
    from raydpo.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, frozen=True)
    for seed in range(3):
        cols = random_pairs(16, seed, len(tokenizer))
        with torch.no_grad():
            want = split_pairs(forward_logps(model, collate_pairs(*cols, tokenizer.pad_token_id)))
            got = packed_logps(model, pack_pairs(*cols, tokenizer.pad_token_id))
        for a, b in zip(want, got):
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert not torch.allclose(got[0], got[1])  # chosen and rejected really differ


def test_rejected_never_sees_chosen():
    batch = pack_pairs([[1, 2]], [[3, 4, 5]], [[6, 7]], 0)
    mask = batch["attention_mask"][0, 0]
    seg = batch["segments"][0].tolist()
    assert seg == [0, 0, 1, 1, 1, 2, 2]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    rejected_rows = mask[5:]
    assert not rejected_rows[:, 2:5].any() and rejected_rows[:, :2].all()
    assert mask[2:5, 5:].sum() == 0  # chosen never sees rejected either


def test_reference_backend_attention_implementations_agree(tiny_model_dir, tokenizer):
    """reference.attn_implementation reaches the model; eager and sdpa both honour the packed mask."""
    from raydpo.reference.scorer import HfBackend

    cols = random_pairs(8, 7, len(tokenizer))
    scores = {}
    for impl in ("eager", "sdpa"):
        backend = HfBackend(tiny_model_dir, "float32", tokenizer.pad_token_id, attn_implementation=impl)
        assert backend.model.config._attn_implementation == impl and backend.packed
        scores[impl] = backend.score(*cols)
    for a, b in zip(scores["eager"], scores["sdpa"]):
        assert abs(a - b).max() < 1e-3
