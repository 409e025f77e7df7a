"""Token-length statistics of kept pairs and the input-order export of reference log-probs."""

from __future__ import annotations

import json

import numpy as np

from raydpo.data.passes import input_order


FIELDS = {"prompt": "prompt_ids", "chosen": "chosen_ids", "rejected": "rejected_ids"}
#: Unpaired examples (KTO) hold their completion and their KL sequence's completion in the pair columns.
EXAMPLE_FIELDS = {"prompt": "prompt_ids", "completion": "chosen_ids", "kl_completion": "rejected_ids"}


def _lengths(tables) -> dict[str, np.ndarray]:
    """Token counts per pair (or unpaired example) of each part (after truncation): name -> [N]."""
    parts, fields = {}, None
    for batch in tables:
        if fields is None:
            fields = EXAMPLE_FIELDS if "label" in batch.column_names else FIELDS
            parts = {name: [] for name in fields}
        for name, column in fields.items():
            parts[name].append(np.asarray(batch[column].combine_chunks().value_lengths()))
    return {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in (parts or {n: [] for n in FIELDS}).items()}


def _stats(arr: np.ndarray) -> dict[str, float]:
    if not arr.size:
        return {}
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": int(arr.max()), "mean": float(arr.mean())}


def token_length_summary(pairs, max_length: int, bins: int = 32) -> dict:
    """:func:`length_summary` of ``pairs`` (datasets or block refs), in a task where the blocks are."""
    from raydpo.data.blocks import reduce_blocks, refs_of

    refs = [r for p in pairs for r in (p if isinstance(p, list) else refs_of(p))]
    return reduce_blocks(length_summary, refs, max_length, bins)


def length_summary(tables, max_length: int, bins: int = 32) -> dict:
    """summary.json's ``token_lengths`` (p50 / p95 / max / mean of prompt, chosen and rejected; for
    unpaired examples prompt, completion and kl_completion) and
    ``token_length_histogram``: ``edges`` ([bins + 1] integers from 0 to ``max_length``) and
    per-pair counts per bin for prompt, chosen, rejected and ``total`` (prompt + longer completion,
    the width the pair takes in a batch)."""
    lengths = _lengths(tables)
    first, second = list(lengths)[1:]
    lengths_total = lengths["prompt"] + np.maximum(lengths[first], lengths[second])
    edges = np.unique(np.linspace(0, max(max_length, 1), bins + 1).round().astype(np.int64))
    hist = {"edges": edges.tolist()}
    for name, arr in (*lengths.items(), ("total", lengths_total)):
        hist[name] = np.histogram(arr, bins=edges)[0].tolist()
    return {"token_lengths": {name: _stats(arr) for name, arr in lengths.items()}, "token_length_histogram": hist}


def export_reference(processed, files: list[str], scored: list, path: str) -> int:
    """Write one JSON line per kept pair in input order with its reference log-probs and token counts.

    ``scored``: datasets with ``CACHED_COLUMNS`` (train and eval). Runs as a task on the driver's
    node (a local ``path`` is the driver's disk). Returns lines written.
    """
    from raydpo.data.blocks import refs_of
    from raydpo.storage.remote import on_cluster

    return on_cluster(_export, refs_of(processed), files, [r for ds in scored for r in refs_of(ds)], path, on_driver_node=True)


def _export(processed: list, files: list[str], scored: list, path: str) -> int:
    from raydpo.data.blocks import blocks

    # Joined on the token digest, not the pair id: a cache hit may come from differently written
    # text that tokenizes to the same ids.
    by_digest = {}
    for b in blocks(scored):
        for row in zip(
            b["digest"].to_pylist(),
            b["ref_chosen_logps"].to_pylist(),
            b["ref_rejected_logps"].to_pylist(),
            b["prompt_ids"].combine_chunks().value_lengths().to_pylist(),
            b["chosen_ids"].combine_chunks().value_lengths().to_pylist(),
            b["rejected_ids"].combine_chunks().value_lengths().to_pylist(),
        ):
            by_digest[row[0]] = row[1:]
    lines = []
    for pid, _, _, digest, _ in input_order(blocks(processed), files):
        rc, rr, pt, ct, rt = by_digest[digest]
        lines.append(json.dumps({"pair_id": pid, "ref_chosen_logps": rc, "ref_rejected_logps": rr,
                                 "prompt_tokens": pt, "chosen_tokens": ct, "rejected_tokens": rt}) + "\n")
    from raydpo import storage

    storage.write_text(path, "".join(lines))  # a local path or URI
    return len(lines)
