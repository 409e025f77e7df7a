"""The GPU checks of the long-sequence work, in one script that needs only torch and transformers
(a bare GPU machine may lack Ray, DeepSpeed and vLLM; raydpo's log-prob modules import neither).

On CUDA (at most a few minutes on one GPU):
1. bf16 chunked vs full log-probs: the drift of both against float32 on the same weights, per token;
2. padded vs padding-free rows on CUDA sdpa: the same sequence log-probs;
3. peak ``torch.cuda.max_memory_allocated`` of one training step (raydpo.DPO, cached reference
   log-probs, AdamW) at 16k tokens per sequence with a 152k vocabulary, chunked vs full logits.

``--smoke`` runs the same code on CPU at tiny sizes (the suite does, so the script keeps working).
Prints one JSON object.

    python bench/gpu_check.py            # on a GPU machine
    python bench/gpu_check.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model(vocab: int, hidden: int, layers: int, dtype, device, max_len: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def random_pairs(n: int, length: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    cols = []
    for _ in range(3):
        cols.append([torch.randint(2, vocab, (int(torch.randint(length // 2, length, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(n)])
    return cols


def drift(vocab, hidden, length, device) -> dict:
    """bf16 chunked and bf16 full against float32, per token of the completions."""
    import torch

    from raydpo.data.collate import collate_pairs
    from raydpo.logprobs import forward_logps

    cols = random_pairs(4, length, vocab)
    batch = {k: v.to(device) for k, v in collate_pairs(*cols, 0).items()}
    tokens = batch["completion_tokens"]
    with torch.inference_mode():
        exact = forward_logps(model(vocab, hidden, 2, torch.float32, device, 4 * length), batch, 0)
        half = model(vocab, hidden, 2, torch.bfloat16, device, 4 * length)
        chunked, full = forward_logps(half, batch, None), forward_logps(half, batch, 0)
    per_token = lambda x: ((x - exact).abs() / tokens).max().item()  # noqa: E731
    return {"bf16_chunked_vs_fp32_per_token": per_token(chunked), "bf16_full_vs_fp32_per_token": per_token(full),
            "bf16_chunked_vs_full_per_token": ((chunked - full).abs() / tokens).max().item()}


def padding_free(vocab, hidden, length, device) -> dict:
    import torch

    from raydpo.data.collate import collate_packed, collate_pairs
    from raydpo.logprobs import forward_logps

    m = model(vocab, hidden, 2, torch.float32, device, 4 * length)
    cols = random_pairs(4, length, vocab, seed=1)
    with torch.inference_mode():
        padded = forward_logps(m, {k: v.to(device) for k, v in collate_pairs(*cols, 0).items()})
        packed = forward_logps(m, {k: v.to(device) for k, v in collate_packed(*cols, 0).items()})
    return {"padded_vs_padding_free_max_abs": (padded - packed).abs().max().item()}


def step_memory(vocab, hidden, tokens, device, chunk) -> dict:
    """Peak memory and time of one DPO training step on one pair of ``tokens`` per sequence."""
    import torch

    import raydpo

    m = model(vocab, hidden, 2, torch.bfloat16 if device == "cuda" else torch.float32, device, 2 * tokens).train()
    dpo = raydpo.DPO(m, beta=0.1, pad_id=0, logits_chunk_tokens=chunk)
    opt = torch.optim.AdamW(dpo.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(2)
    half = tokens // 2
    p, c, r = (torch.randint(2, vocab, (half,), generator=g).tolist() for _ in range(3))
    ref = torch.tensor([-float(tokens)], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = dpo(torch.tensor([p + c], device=device), torch.tensor([p + r], device=device), prompt_lengths=[half],
              ref_chosen_logps=ref, ref_rejected_logps=ref)
    out.loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    del dpo, m, opt, out
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"peak_mib": peak, "step_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (what the suite runs)")
    args = p.parse_args()
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    vocab, hidden, length, tokens = (512, 32, 48, 256) if args.smoke else (151_646, 256, 2048, 16_384)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "vocab": vocab, "tokens_per_sequence": tokens}
    result |= drift(vocab, hidden, length, device)
    result |= padding_free(vocab, hidden, length, device)
    result["chunked"] = step_memory(vocab, hidden, tokens, device, None)
    try:
        result["full_logits"] = step_memory(vocab, hidden, tokens, device, 0)
    except torch.OutOfMemoryError as e:  # the point of the chunked path; reported, not fatal
        result["full_logits"] = {"error": f"out of memory: {str(e)[:120]}"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
