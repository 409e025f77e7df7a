"""Shared-prompt rows (each pair's prompt computed once) score what two separate rows per pair score."""

import random

import pytest
import torch

from raydpo.data.collate import collate_pairs
from raydpo.data.shared import collate_shared, dense_mask
from raydpo.logprobs import forward_logps, split_pairs


def random_pairs(n: int, seed: int, vocab: int, min_prompt: int = 1):
    rng = random.Random(seed)
    tok = lambda k: [rng.randint(5, vocab - 1) for _ in range(k)]  # noqa: E731
    return ([tok(rng.randint(min_prompt, 40)) for _ in range(n)], [tok(rng.randint(1, 25)) for _ in range(n)],
            [tok(rng.randint(1, 25)) for _ in range(n)])


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_shared_rows_equal_two_rows_per_pair(tiny_model_dir, tokenizer, padding_free):
    from raydpo.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir, frozen=True)
    for seed in range(3):
        cols = random_pairs(16, seed, len(tokenizer), min_prompt=0 if seed == 2 else 1)
        shared = collate_shared(*cols, tokenizer.pad_token_id, padding_free=padding_free)
        concatenated = collate_pairs(*cols, tokenizer.pad_token_id)
        assert torch.equal(shared["completion_tokens"], concatenated["completion_tokens"])
        if padding_free:  # several pairs share a row
            assert shared["input_ids"].shape[0] < 16
        with torch.no_grad():
            want = split_pairs(forward_logps(model, concatenated))
            got = split_pairs(forward_logps(model, shared))
        for a, b in zip(want, got):
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert not torch.allclose(got[0], got[1])  # chosen and rejected really differ


def test_rejected_never_sees_chosen():
    batch = collate_shared([[1, 2]], [[3, 4, 5]], [[6, 7]], 0)
    mask = dense_mask(batch)[0, 0]
    seg = batch["segments"][0].tolist()
    assert seg == [0, 0, 1, 1, 1, 2, 2]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    # The first rejected token is predicted from the prompt's last token, the next from the rejected one.
    assert batch["pred_cols"][0].tolist()[2:] == [1, 2, 3, 1, 5]
    rejected_rows = mask[5:]
    assert not rejected_rows[:, 2:5].any() and rejected_rows[:, :2].all()
    assert mask[2:5, 5:].sum() == 0  # chosen never sees rejected either


def test_units_in_one_row_never_see_each_other():
    batch = collate_shared([[1, 2, 3, 4], [8], [11]], [[5], [9], [12]], [[6], [10], [13]], 0, padding_free=True)
    assert batch["units"].tolist() == [[0] * 6, [1, 1, 1, 2, 2, 2]]  # rows as wide as the widest pair
    assert batch["pred_cols"][1].tolist()[4:] == [3, 3]  # pair 2's completions follow its own prompt
    mask = dense_mask(batch)[1, 0]
    assert not mask[3:, :3].any() and mask[3:, 3].all()  # pair 2 sees its own prompt only


def test_reference_backend_attention_implementations_agree(tiny_model_dir, tokenizer):
    """reference.attn_implementation reaches the model; eager and sdpa both honour the shared mask."""
    from raydpo.reference.scorer import HfBackend

    cols = random_pairs(8, 7, len(tokenizer))
    scores = {}
    for impl in ("eager", "sdpa"):
        backend = HfBackend(tiny_model_dir, "float32", tokenizer.pad_token_id, attn_implementation=impl)
        assert backend.model.config._attn_implementation == impl and backend.packed
        scores[impl] = backend.score(*cols)
    for a, b in zip(scores["eager"], scores["sdpa"]):
        assert abs(a - b).max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_flex_attention_block_masks_equal_two_rows(tmp_path, family):
    """Under flex_attention the shared rows get a BlockMask (per layer type, with gemma2's sliding
    window) instead of a dense mask, and score what two sdpa rows per pair score, padded and several
    pairs a row. Forward only: torch has no flex-attention backward on CPU (the GPU path trains)."""
    from raydpo.fixtures.families import write_family_model
    from raydpo.logprobs.masks import shared_attention_mask
    from raydpo.models import load_causal_lm

    path = write_family_model(tmp_path / family, family)
    sdpa = load_causal_lm(path, attn_implementation="sdpa", frozen=True)
    flex = load_causal_lm(path, attn_implementation="flex_attention", frozen=True)
    cols = random_pairs(6, 3, sdpa.config.vocab_size, min_prompt=30)  # past gemma2's 24-token window
    with torch.no_grad():
        want = forward_logps(sdpa, collate_pairs(*cols, 0))
        for padding_free in (False, True):
            batch = collate_shared(*cols, 0, padding_free=padding_free)
            mask = shared_attention_mask(flex, flex.config, batch)
            kinds = mask.values() if isinstance(mask, dict) else [mask]
            assert all(type(m).__name__ == "BlockMask" for m in kinds) and (family != "gemma2" or len(mask) == 2)
            got = forward_logps(flex, batch)
            assert torch.allclose(got, want, atol=1e-4), (family, padding_free, (got - want).abs().max())
