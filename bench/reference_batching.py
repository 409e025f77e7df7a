"""Reference scoring: token-budget batching with length-sorted buckets vs fixed-size batches.

The same reference actor class the pool runs (``ReferenceScorer``), in one process on the same
pairs (hh-rlhf harmless-base, tokenized by raydpo's data stage rules, ``max_length`` 512), once with
fixed batches of ``--batch-size`` pairs in input order and once with buckets of ``--bucket`` pairs
cut into forward passes of at most ``--max-tokens`` padded tokens (by default the fixed batches'
worst case, 2 x batch x max_length, so both need the same peak memory). The model is a small random
Llama (nothing downloads); only sequence lengths matter for the comparison.

    .venv/bin/python bench/reference_batching.py [--rows 2312] [--batch-size 8]

Prints pairs/s, real tokens/s and the padding share of both, the ratio, and the largest gap between
the two runs' log-probs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "harmless-base-test.jsonl.gz")


def tokenized_pairs(path: str, rows: int, tokenizer, max_length: int) -> list[tuple[list, list, list]]:
    from raydpo.data.prompt_cut import special_prefix
    from raydpo.data.tokenize import TokenizeSettings, tokenize_normalized
    from raydpo.data.validate import parse_row

    pairs = [p for p, _ in (parse_row(line.encode()) for line in gzip.open(path, "rt")) if p is not None][:rows]
    out = tokenize_normalized(tokenizer, pairs, TokenizeSettings(max_length), special_prefix(tokenizer)[0])
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out if r["filtered"] is None and r["error"] is None]


def run(scorer, pairs, batch: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        c, r = scorer.score(*(list(col) for col in zip(*chunk)))
        results.extend(zip(c.tolist(), r.tolist()))
    return time.perf_counter() - t0, results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--rows", type=int, default=2312)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bucket", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=0, help="default: 2 x batch size x max length")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=4)
    args = ap.parse_args()
    max_tokens = args.max_tokens or 2 * args.batch_size * args.max_length

    import torch

    from raydpo.reference.batching import pair_lengths, padded_tokens, plan_batches
    from raydpo.reference.scorer import ReferenceScorer
    from raydpo.tiny import TinyModelSpec, build_tokenizer, write_tiny_model

    torch.set_num_threads(os.cpu_count() or 1)
    base = [json.loads(line) for line in gzip.open(args.data, "rt")]
    tokenizer = build_tokenizer(8000, [r["chosen"] for r in base] + [r["rejected"] for r in base])
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinyModelSpec(hidden_size=args.hidden_size, intermediate_size=int(2.75 * args.hidden_size) // 64 * 64,
                             num_layers=args.num_layers, num_heads=args.hidden_size // 64, max_position_embeddings=args.max_length)
        model_dir = write_tiny_model(os.path.join(tmp, "model"), spec, tokenizer)
        pairs = tokenized_pairs(args.data, args.rows, tokenizer, args.max_length)
        fixed = ReferenceScorer(model_dir, "float32", tokenizer.pad_token_id)
        budget = ReferenceScorer(model_dir, "float32", tokenizer.pad_token_id, max_tokens=max_tokens)
        run(fixed, pairs[:16], args.batch_size)  # warm-up
        f_time, f_out = run(fixed, pairs, args.batch_size)
        b_time, b_out = run(budget, pairs, args.bucket)

    lengths = pair_lengths(*([len(x) for x in col] for col in zip(*pairs)))
    real = sum(len(p) * 2 + len(c) + len(r) for p, c, r in pairs)
    fixed_groups = [list(range(i, min(i + args.batch_size, len(pairs)))) for i in range(0, len(pairs), args.batch_size)]
    budget_groups = [[s + j for j in g] for s in range(0, len(pairs), args.bucket)
                     for g in plan_batches(lengths[s : s + args.bucket], max_tokens)]
    gap = max(abs(a - b) for fo, bo in zip(f_out, b_out) for a, b in zip(fo, bo))
    n = len(pairs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"pairs: {n} (hh-rlhf harmless-base), max_length {args.max_length}, model hidden {args.hidden_size} x "
          f"{args.num_layers} layers, float32")
    print(f"{'batching':<44}{'seconds':>9}{'pairs/s':>9}{'tokens/s':>10}{'padding':>9}")
    for name, secs, groups in ((f"fixed {args.batch_size} pairs", f_time, fixed_groups),
                               (f"token budget {max_tokens}, buckets of {args.bucket}", b_time, budget_groups)):
        pad = 1 - real / padded_tokens(lengths, groups)
        print(f"{name:<44}{secs:>9.2f}{n / secs:>9.1f}{real / secs:>10.0f}{pad:>9.1%}")
    print(f"ratio token budget / fixed pairs/s: {f_time / b_time:.2f}x; largest log-prob gap between the runs: {gap:.2e}")


if __name__ == "__main__":
    main()
