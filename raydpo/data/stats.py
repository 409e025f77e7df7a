"""Token-length statistics of kept pairs and the input-order export of reference log-probs."""

from __future__ import annotations

import json

import numpy as np

from raydpo.data.stage import input_order


def token_length_stats(pairs) -> dict[str, dict[str, float]]:
    """p50 / p95 / max / mean token counts of prompt, chosen and rejected (after truncation)."""
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    for batch in pairs.iter_batches(batch_format="pyarrow", batch_size=4096):
        for name in lengths:
            lengths[name].append(np.asarray(batch[f"{name}_ids"].combine_chunks().value_lengths()))
    stats = {}
    for name, parts in lengths.items():
        arr = np.concatenate(parts) if parts else np.zeros(0)
        stats[name] = (
            {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": int(arr.max()), "mean": float(arr.mean())}
            if arr.size
            else {}
        )
    return stats


def export_reference(processed, files: list[str], scored: list, path: str) -> int:
    """Write one JSON line per kept pair in input order with its reference log-probs and token counts.

    ``scored``: datasets with ``CACHED_COLUMNS`` (train and eval). Returns lines written.
    """
    # Joined on the token digest, not the pair id: a cache hit may come from differently written
    # text that tokenizes to the same ids.
    by_digest = {}
    for ds in scored:
        for b in ds.iter_batches(batch_format="pyarrow"):
            for row in zip(
                b["digest"].to_pylist(),
                b["ref_chosen_logps"].to_pylist(),
                b["ref_rejected_logps"].to_pylist(),
                b["prompt_ids"].combine_chunks().value_lengths().to_pylist(),
                b["chosen_ids"].combine_chunks().value_lengths().to_pylist(),
                b["rejected_ids"].combine_chunks().value_lengths().to_pylist(),
            ):
                by_digest[row[0]] = row[1:]
    n = 0
    with open(path, "w") as f:
        for pid, _, _, digest in input_order(processed, files):
            rc, rr, pt, ct, rt = by_digest[digest]
            line = {"pair_id": pid, "ref_chosen_logps": rc, "ref_rejected_logps": rr,
                    "prompt_tokens": pt, "chosen_tokens": ct, "rejected_tokens": rt}
            f.write(json.dumps(line) + "\n")
            n += 1
    return n
