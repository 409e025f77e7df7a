"""Reference scoring: token-budget batching with length-sorted buckets, and the shared-prompt
packed rows, vs fixed-size batches of two rows per pair.

The same reference actor class the pool runs (``ReferenceScorer``), in one process on the same
pairs (hh-rlhf harmless-base, tokenized by raydpo's data stage rules, ``max_length`` 512): fixed
batches of ``--batch-size`` pairs in input order (two rows per pair, the prompt computed twice);
buckets of ``--bucket`` pairs cut into forward passes of at most ``--max-tokens`` padded tokens (by
default the fixed batches' worst case, 2 x batch x max_length, so all need the same peak memory),
first with two rows per pair, then packed (one row per pair, the prompt computed once, raydpo's
default). The model is a small random Llama (nothing downloads); only sequence lengths matter.

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


def bench_model(tmp: str, tokenizer, hidden_size: int, num_layers: int, max_length: int) -> str:
    """A random Llama of width ``hidden_size`` (head_dim 64) written under ``tmp``; returns its directory."""
    from raydpo.fixtures.tiny import TinyModelSpec, write_tiny_model

    spec = TinyModelSpec(hidden_size=hidden_size, intermediate_size=int(2.75 * hidden_size) // 64 * 64,
                         num_layers=num_layers, num_heads=hidden_size // 64, max_position_embeddings=max_length)
    return write_tiny_model(os.path.join(tmp, "model"), spec, tokenizer)


def hh_tokenizer(path: str):
    """A BPE tokenizer trained on the hh-rlhf file's texts (nothing downloads)."""
    from raydpo.fixtures.tiny import build_tokenizer

    base = [json.loads(line) for line in gzip.open(path, "rt")]
    return build_tokenizer(8000, [r["chosen"] for r in base] + [r["rejected"] for r in base])


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

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = hh_tokenizer(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model(tmp, tokenizer, args.hidden_size, args.num_layers, args.max_length)
        pairs = tokenized_pairs(args.data, args.rows, tokenizer, args.max_length)
        pad_id = tokenizer.pad_token_id
        fixed = ReferenceScorer(model_dir, "float32", pad_id, share_prompt=False)
        budget = ReferenceScorer(model_dir, "float32", pad_id, max_tokens=max_tokens, share_prompt=False)
        packed = ReferenceScorer(model_dir, "float32", pad_id, max_tokens=max_tokens)
        assert packed.backend.packed, "the model did not pass the packed-mask probe"
        run(fixed, pairs[:16], args.batch_size)  # warm-up
        f_time, f_out = run(fixed, pairs, args.batch_size)
        b_time, b_out = run(budget, pairs, args.bucket)
        p_time, p_out = run(packed, pairs, args.bucket)

    lens = [[len(x) for x in col] for col in zip(*pairs)]
    two_rows, one_row = pair_lengths(*lens), pair_lengths(*lens, packed=True)
    both = sum(len(p) * 2 + len(c) + len(r) for p, c, r in pairs)  # tokens of both sequences
    once = sum(len(p) + len(c) + len(r) for p, c, r in pairs)  # with the prompt once
    n = len(pairs)
    fixed_groups = [list(range(i, min(i + args.batch_size, n))) for i in range(0, n, args.batch_size)]

    def bucketed(lengths, rows):
        return [[s + j for j in g] for s in range(0, n, args.bucket) for g in plan_batches(lengths[s : s + args.bucket], max_tokens, rows)]

    gap = max(abs(a - b) for other in (b_out, p_out) for fo, bo in zip(f_out, other) for a, b in zip(fo, bo))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"pairs: {n} (hh-rlhf harmless-base), max_length {args.max_length}, model hidden {args.hidden_size} x "
          f"{args.num_layers} layers, float32; tokens/s counts both sequences of a pair")
    print(f"{'batching':<52}{'seconds':>9}{'pairs/s':>9}{'tokens/s':>10}{'padding':>9}{'ratio':>7}")
    rows = ((f"fixed {args.batch_size} pairs, two rows per pair", f_time, padded_tokens(two_rows, fixed_groups), both),
            (f"token budget {max_tokens}, buckets of {args.bucket}", b_time, padded_tokens(two_rows, bucketed(two_rows, 2)), both),
            ("  + one packed row per pair (prompt once)", p_time, padded_tokens(one_row, bucketed(one_row, 1), 1), once))
    for name, secs, computed, useful in rows:
        print(f"{name:<52}{secs:>9.2f}{n / secs:>9.1f}{both / secs:>10.0f}{1 - useful / computed:>9.1%}{f_time / secs:>6.2f}x")
    print(f"largest log-prob gap against the fixed batches: {gap:.2e}")


if __name__ == "__main__":
    main()
