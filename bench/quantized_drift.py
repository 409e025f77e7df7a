"""Log-prob drift and speed of a bitsandbytes-quantized reference against the full-precision one.

Same pairs (hh-rlhf harmless-base, tokenized by raydpo's rules), same small random Llama as
``reference_batching.py``, scored in one process by ``ReferenceScorer`` in float32, 8-bit and 4-bit
(NF4). Random weights drift differently from a trained checkpoint's: read the figures as a check
that the path works and of its order of magnitude, and measure your own model before relying on it.

    .venv/bin/python bench/quantized_drift.py [--rows 300]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_batching import DEFAULT_DATA, run, tokenized_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--hidden-size", type=int, default=256)
    args = ap.parse_args()

    import numpy as np

    from raydpo.reference.scorer import ReferenceScorer
    from raydpo.fixtures.tiny import TinyModelSpec, build_tokenizer, write_tiny_model

    base = [json.loads(line) for line in gzip.open(DEFAULT_DATA, "rt")]
    tokenizer = build_tokenizer(8000, [r["chosen"] for r in base] + [r["rejected"] for r in base])
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinyModelSpec(hidden_size=args.hidden_size, intermediate_size=int(2.75 * args.hidden_size) // 64 * 64, num_layers=4,
                             num_heads=args.hidden_size // 64, max_position_embeddings=args.max_length)
        model_dir = write_tiny_model(os.path.join(tmp, "model"), spec, tokenizer)
        pairs = tokenized_pairs(DEFAULT_DATA, args.rows, tokenizer, args.max_length)
        tokens = np.array([n for _, c, r in pairs for n in (len(c), len(r))], dtype=np.float64)
        results = {}
        for name in (None, "8bit", "4bit"):
            scorer = ReferenceScorer(model_dir, "float32", tokenizer.pad_token_id, max_tokens=8192, quantization=name)
            seconds, out = run(scorer, pairs, 64)
            results[name or "float32"] = (seconds, np.array([v for pair in out for v in pair]))
    full = results["float32"][1]
    print(f"pairs: {len(pairs)} (hh-rlhf harmless-base), random Llama hidden {args.hidden_size} x 4 layers, CPU")
    print(f"{'reference':<10}{'seconds':>9}{'|gap| per token: mean':>24}{'p95':>10}{'max':>10}{'sum gap max':>13}")
    for name, (seconds, values) in results.items():
        gap = np.abs(values - full)
        per_token = gap / tokens
        print(f"{name:<10}{seconds:>9.2f}{per_token.mean():>24.2e}{np.percentile(per_token, 95):>10.2e}"
              f"{per_token.max():>10.2e}{gap.max():>13.3f}")


if __name__ == "__main__":
    main()
