"""The checks of ``bench/gpu_check.py`` that need torch and transformers alone (no DeepSpeed): the
table, the tiny Qwen2 models and batches every check uses, and the model-level checks (log-probs,
padding-free rows, one step's memory, the reference scorer, flash-attention). ``gpu_check.py`` imports
this module from its own directory; its docstring describes every check."""

from __future__ import annotations

import math
import sys
import time
import traceback

#: The exactness guard's default per-token tolerances (``reference.guard_tolerance``).
GUARD_FP32, GUARD_BF16 = 1e-4, 5e-2


class Checks:
    """The table: one row per check, ``ok`` True / False / None (skipped); ``seconds`` per :meth:`run`."""

    def __init__(self):
        self.rows: list[dict] = []
        self.seconds: dict[str, float] = {}

    def add(self, name: str, value, tolerance: str, ok) -> None:
        self.rows.append({"name": name, "value": value, "tolerance": tolerance, "ok": ok})

    def le(self, name: str, value: float, tol: float) -> None:
        self.add(name, value, f"<= {tol:g}", bool(math.isfinite(value) and value <= tol))

    def skip(self, name: str, reason: str) -> None:
        self.add(name, f"skipped: {reason}", "", None)

    def error(self, name: str, e: BaseException) -> None:
        traceback.print_exc(file=sys.stderr)
        self.add(name, f"error: {type(e).__name__}: {' '.join(str(e).split())[:160]}", "", False)

    def run(self, name: str, fn, *a):
        """``fn(self, *a)``, timed; a check that raises is a failed row (the others still run)."""
        start = time.perf_counter()
        try:
            return fn(self, *a)
        except Exception as e:  # noqa: BLE001
            self.error(name, e)
            return {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)

    @property
    def failed(self) -> list[str]:
        return [r["name"] for r in self.rows if r["ok"] is False]

    def table(self) -> str:
        def show(v):
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        shown = [(r["name"], show(r["value"]), r["tolerance"], {True: "ok", False: "FAIL", None: "skip"}[r["ok"]])
                 for r in self.rows]
        w = [max(len(row[i]) for row in shown + [("check", "value", "tolerance", "ok")]) for i in range(3)]
        lines = [f"{'check':<{w[0]}}  {'value':>{w[1]}}  {'tolerance':<{w[2]}}  ok"]
        lines += [f"{n:<{w[0]}}  {v:>{w[1]}}  {t:<{w[2]}}  {ok}" for n, v, t, ok in shown]
        return "\n".join(lines)


def config(vocab: int, hidden: int, layers: int, max_len: int, attn: str = "sdpa"):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                       tie_word_embeddings=False, attn_implementation=attn)


def model(vocab: int, hidden: int, layers: int, dtype, device, max_len: int):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(config(vocab, hidden, layers, max_len)).to(device=device, dtype=dtype).eval()


def saved_model(directory: str, vocab: int, hidden: int, max_len: int) -> str:
    """A random 2-layer Qwen2 saved (float32) where raydpo's loaders read it from."""
    model(vocab, hidden, 2, None, "cpu", max_len).save_pretrained(directory)
    return directory


def random_pairs(n: int, length: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    cols = []
    for _ in range(3):
        cols.append([torch.randint(2, vocab, (int(torch.randint(length // 2, length, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(n)])
    return cols


def on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def per_token(a, b, tokens) -> float:
    return ((a.float() - b.float()).abs() / tokens.float().clamp(min=1)).max().item()


def drift(checks: Checks, vocab, hidden, length, device) -> dict:
    """bf16 chunked and bf16 full against float32, per token of the completions."""
    import torch

    from raydpo.data.collate import collate_pairs
    from raydpo.logprobs import forward_logps

    cols = random_pairs(4, length, vocab)
    batch = on(collate_pairs(*cols, 0), device)
    tokens = batch["completion_tokens"]
    with torch.inference_mode():
        exact = forward_logps(model(vocab, hidden, 2, torch.float32, device, 4 * length), batch, 0)
        half = model(vocab, hidden, 2, torch.bfloat16, device, 4 * length)
        chunked, full = forward_logps(half, batch, None), forward_logps(half, batch, 0)
    out = {"bf16_chunked_vs_fp32_per_token": per_token(chunked, exact, tokens),
           "bf16_full_vs_fp32_per_token": per_token(full, exact, tokens),
           "bf16_chunked_vs_full_per_token": per_token(chunked, full, tokens)}
    checks.le("bf16 chunked vs full logps /token", out["bf16_chunked_vs_full_per_token"], 1e-2)
    checks.add("bf16 chunked vs fp32 /token", out["bf16_chunked_vs_fp32_per_token"], "(reported)", True)
    return out


def padding_free(checks: Checks, vocab, hidden, length, device) -> dict:
    import torch

    from raydpo.data.collate import collate_packed, collate_pairs
    from raydpo.logprobs import forward_logps

    m = model(vocab, hidden, 2, torch.float32, device, 4 * length)
    cols = random_pairs(4, length, vocab, seed=1)
    with torch.inference_mode():
        padded_batch = on(collate_pairs(*cols, 0), device)
        padded = forward_logps(m, padded_batch)
        packed = forward_logps(m, on(collate_packed(*cols, 0), device))
    out = {"padded_vs_padding_free_max_abs": (padded - packed).abs().max().item(),
           "padded_vs_padding_free_per_token": per_token(padded, packed, padded_batch["completion_tokens"])}
    checks.le("sdpa fp32 padded vs padding-free /token", out["padded_vs_padding_free_per_token"], GUARD_FP32)
    return out


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


def memory(checks: Checks, result: dict, vocab, hidden, tokens, device) -> None:
    """:func:`step_memory` chunked and with the full logits, into ``result["chunked"]`` and
    ``result["full_logits"]``: reported; the full logits running out of memory is too, not a failure."""
    import torch

    for key, chunk_tokens in (("chunked", None), ("full_logits", 0)):
        name = f"one step at {tokens} tokens, {key.replace('_', ' ')}"
        try:
            result[key] = step_memory(vocab, hidden, tokens, device, chunk_tokens)
            peak = result[key]["peak_mib"]
            checks.add(name, f"{peak:.0f} MiB" if peak is not None else f"{result[key]['step_s']:.2f} s", "(reported)", True)
        except torch.OutOfMemoryError as e:  # the full logits may: the point of the chunked path
            result[key] = {"error": f"out of memory: {str(e)[:120]}"}
            checks.add(name, "out of memory", "(reported)", True if chunk_tokens == 0 else False)
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            checks.error(name, e)
            result[key] = {"error": f"{type(e).__name__}: {e}"[:500]}


def reference(checks: Checks, path: str, vocab: int, length: int, device) -> dict:
    """The reference actor's scores against ``forward_logps`` of the same weights in float32."""
    import torch

    from raydpo.data.collate import collate_pairs
    from raydpo.logprobs import forward_logps, split_pairs
    from raydpo.models import load_causal_lm
    from raydpo.reference.scorer import ReferenceScorer

    cols = random_pairs(6, length, vocab, seed=3)
    batch = on(collate_pairs(*cols, 0), device)
    with torch.inference_mode():
        exact = forward_logps(load_causal_lm(path, "float32", frozen=True).to(device), batch)
    out: dict = {}
    for dtype, tol in (("float32", GUARD_FP32), ("bfloat16", GUARD_BF16)):
        # As the reference pool builds it (raydpo.reference.stage.scorer_kwargs), packed rows on.
        scorer = ReferenceScorer(model_path=path, dtype=dtype, pad_id=0, share_prompt=True, batch_size=8)
        chosen, rejected = scorer.score(*cols)
        got = torch.cat([torch.from_numpy(chosen), torch.from_numpy(rejected)]).to(device)
        out[dtype] = {"packed_rows": scorer.backend.packed, "device": str(scorer.backend.device),
                      "per_token": per_token(got, exact, batch["completion_tokens"]),
                      "max_abs": (got - exact).abs().max().item()}
        checks.le(f"reference scorer {dtype} vs fp32 logps /token", out[dtype]["per_token"], tol)
        del scorer
    out["exact_first_pair"] = [float(x[0]) for x in split_pairs(exact)]
    return out


def flash(checks: Checks, path: str, vocab: int, length: int, device) -> dict:
    """Padded vs padding-free (one row: flash-attention varlen) on flash_attention_2, bf16."""
    import importlib.util

    import torch

    name = "flash-attn bf16 padded vs padding-free /token"
    if device.type != "cuda":
        checks.skip(name, "no CUDA")
        return {"skipped": "no CUDA"}
    if importlib.util.find_spec("flash_attn") is None:
        checks.skip(name, "flash_attn not installed")
        return {"skipped": "flash_attn not installed"}
    from raydpo.data.collate import collate_packed, collate_pairs
    from raydpo.logprobs import forward_logps
    from raydpo.models import load_causal_lm

    m = load_causal_lm(path, "bfloat16", frozen=True, device=str(device), attn_implementation="flash_attention_2").to(device)
    cols = random_pairs(4, length, vocab, seed=4)
    with torch.inference_mode():
        padded_batch = on(collate_pairs(*cols, 0), device)
        padded = forward_logps(m, padded_batch)
        packed = forward_logps(m, on(collate_packed(*cols, 0, one_row=True), device))
    out = {"per_token": per_token(padded, packed, padded_batch["completion_tokens"])}
    checks.le(name, out["per_token"], GUARD_BF16)
    return out
