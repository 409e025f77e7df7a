"""Policy micro-batches on hh-rlhf: padded (random order), length-grouped, and padding-free.

Counts the tokens a forward pass computes in each layout (padding fraction = 1 - real tokens /
computed tokens) over the whole file, and times forward + backward of a small random Llama
(training mode, float32) over one epoch of the first ``--timed-pairs`` pairs in each layout, collated
as the trainer does (``raydpo.data.collate``; ``raydpo.train.batches`` for length grouping).

    .venv/bin/python bench/padding_free.py [--micro-batch-size 4] [--timed-pairs 400]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from reference_batching import DEFAULT_DATA, bench_model, hh_tokenizer, tokenized_pairs


def layouts(pairs: list, mb: int, seed: int) -> dict[str, list[list[int]]]:
    """Micro-batches (lists of pair indices) of each layout over one epoch."""
    import numpy as np

    from raydpo.train.batches import length_grouped

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    shuffled = [order[i : i + mb].tolist() for i in range(0, len(order) - len(order) % mb, mb)]
    cols = {"prompt_ids": np.array([p for p, _, _ in pairs], dtype=object), "chosen_ids": np.array([c for _, c, _ in pairs], dtype=object),
            "rejected_ids": np.array([r for _, _, r in pairs], dtype=object), "index": np.arange(len(pairs))}
    grouped = [b["index"].tolist() for b in length_grouped(cols, mb, rng)]
    return {"padded, random order": shuffled, "padded, length-grouped": grouped, "padding-free": shuffled}


def computed_tokens(pairs: list, batches: list[list[int]], packed: bool) -> tuple[int, int]:
    """(real tokens, tokens computed) of both sequences of every pair in ``batches``."""
    real = computed = 0
    for b in batches:
        lens = [len(pairs[i][0]) + len(pairs[i][k]) for k in (1, 2) for i in b]
        real += sum(lens)
        from raydpo.data.collate import pack_rows

        # padding-free: rows as wide as the longest sequence (raydpo.data.collate.pack_rows), fillers included
        computed += len(pack_rows(lens, max(lens))) * max(lens) if packed else len(lens) * max(lens)
    return real, computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--rows", type=int, default=2312)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--timed-pairs", type=int, default=400, help="pairs of the timed epoch per layout")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=4)
    args = ap.parse_args()

    import torch

    from raydpo.data.collate import collate_packed, collate_pairs
    from raydpo.logprobs import forward_logps
    from raydpo.models import load_causal_lm

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = hh_tokenizer(args.data)
    pairs = tokenized_pairs(args.data, args.rows, tokenizer, args.max_length)
    plans = layouts(pairs, args.micro_batch_size, seed=0)
    timed_plans = layouts(pairs[: args.timed_pairs], args.micro_batch_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_causal_lm(bench_model(tmp, tokenizer, args.hidden_size, args.num_layers, args.max_length))
        model.train()

        def timed(batches: list[list[int]], packed: bool) -> float:
            t0 = time.perf_counter()
            for b in batches:
                cols = [[pairs[i][k] for i in b] for k in range(3)]
                batch = collate_packed(*cols) if packed else collate_pairs(*cols, tokenizer.pad_token_id)
                forward_logps(model, batch).sum().backward()
            return time.perf_counter() - t0

        timed(plans["padded, random order"][:2], False)  # warm-up
        seconds = {name: timed(b, name == "padding-free") for name, b in timed_plans.items()}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"pairs: {len(pairs)} (hh-rlhf harmless-base), max_length {args.max_length}, micro-batch {args.micro_batch_size} pairs; "
          f"timing: forward + backward over {min(args.timed_pairs, len(pairs))} pairs, model hidden {args.hidden_size} x {args.num_layers} layers, float32")
    print(f"{'layout':<26}{'padding':>9}{'tokens computed':>17}{'seconds':>9}{'speed-up':>10}")
    base = seconds["padded, random order"]
    for name, batches in plans.items():
        real, computed = computed_tokens(pairs, batches, name == "padding-free")
        print(f"{name:<26}{1 - real / computed:>9.1%}{computed:>17,}{seconds[name]:>9.2f}{base / seconds[name]:>9.2f}x")


if __name__ == "__main__":
    main()
