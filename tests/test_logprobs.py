"""Sequence log-probs: completion tokens only, summed, padding-side independent."""

import torch
import torch.nn.functional as F

from raydpo.data.collate import collate_pairs
from raydpo.logprobs import forward_logps, sequence_logps, split_pairs


def _model(tiny_model_dir):
    from raydpo.models import load_causal_lm

    return load_causal_lm(tiny_model_dir, frozen=True)


def test_sum_equals_cross_entropy_by_hand(tiny_model_dir):
    model = _model(tiny_model_dir)
    prompt, completion = [1, 40, 41, 42], [43, 44, 2]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits
    # By hand: position t predicts token t+1; completion tokens sit at positions 4, 5, 6 and are
    # predicted from positions 3, 4, 5.
    targets = torch.tensor(completion)
    by_hand = -F.cross_entropy(logits[0, 3:6].float(), targets, reduction="sum")
    mask = torch.tensor([[0] * len(prompt) + [1] * len(completion)])
    assert torch.allclose(sequence_logps(logits, ids, mask), by_hand.unsqueeze(0), atol=1e-5)


def test_prompt_and_padding_are_excluded(tiny_model_dir):
    model = _model(tiny_model_dir)
    batch = collate_pairs([[1, 40, 41]], [[43, 2]], [[44, 45, 46, 47, 2]], pad_id=0)
    with torch.no_grad():
        chosen, _ = split_pairs(forward_logps(model, batch))
        alone = collate_pairs([[1, 40, 41]], [[43, 2]], [[43, 2]], pad_id=0)  # no padding at all
        chosen_alone, _ = split_pairs(forward_logps(model, alone))
        # Same completion after a different prompt: a different value, so the prompt is context only.
        other_prompt = collate_pairs([[1, 50, 51]], [[43, 2]], [[43, 2]], pad_id=0)
        chosen_other, _ = split_pairs(forward_logps(model, other_prompt))
    assert batch["input_ids"].shape == (2, 8)  # chosen row carries 3 pads
    assert batch["completion_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert torch.allclose(chosen, chosen_alone, atol=1e-5)
    # The mask counts exactly the 2 completion tokens.
    with torch.no_grad():
        logits = model(alone["input_ids"][:1]).logits
    manual = -F.cross_entropy(logits[0, 2:4], torch.tensor([43, 2]), reduction="sum")
    assert torch.allclose(chosen, manual.unsqueeze(0), atol=1e-5)
    assert not torch.allclose(chosen, chosen_other, atol=1e-3)


def test_left_and_right_padding_agree(tiny_model_dir):
    model = _model(tiny_model_dir)
    prompts, chosen, rejected = [[1, 40], [1, 40, 41, 42, 43]], [[44, 2], [45, 46, 47, 2]], [[48, 2], [49, 2]]
    with torch.no_grad():
        right = forward_logps(model, collate_pairs(prompts, chosen, rejected, pad_id=0, padding_side="right"))
        left = forward_logps(model, collate_pairs(prompts, chosen, rejected, pad_id=0, padding_side="left"))
    assert torch.allclose(right, left, atol=1e-5)
