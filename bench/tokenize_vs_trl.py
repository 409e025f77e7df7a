"""Tokenization throughput: raydpo's Ray Data stage vs TRL's DPOTrainer data preparation.

Same rows (hh-rlhf harmless-base test, implicit prompts, repeated to about 50,000 pairs), same
tokenizer (a byte-level BPE with a 32k vocabulary, Llama-sized, trained in-process on the same
texts: nothing downloads), same max_length, 2 processes each (2 Ray tokenizer actors; TRL's
``dataset_num_proc=2``), measured one after the other in one run on one machine.

    .venv/bin/python bench/tokenize_vs_trl.py [--rows 50000] [--data ../shared/data/harmless-base-test.jsonl.gz]

Prints pairs/s of both and the ratio. raydpo's time covers read + validate + split + tokenize +
accounting of every row, including the start of its tokenizer actors, on a warm Ray cluster (one
that has run a Ray Data job before; the cluster's start-up is reported separately, and a second
ratio includes it). TRL's covers prompt extraction, EOS, tokenization and the length filter on an
in-memory Dataset (its imports, model load and the building of that Dataset are not timed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "harmless-base-test.jsonl.gz")


def load_rows(path: str, n: int) -> list[dict]:
    base = [json.loads(line) for line in gzip.open(path, "rt")]
    return (base * (n // len(base) + 1))[:n]


def bench_raydpo(jsonl: str, model_dir: str, out: str, max_length: int, workers: int, shared_prompt: bool):
    """(seconds, start-up seconds, summary, {line: (status, (prompt, chosen, rejected ids))})."""
    import ray
    import ray.data

    from raydpo.cluster import configure_data
    from raydpo.config import from_dict
    from raydpo.data.blocks import blocks
    from raydpo.pipeline import prepare_data

    t0 = time.perf_counter()
    # RAY_ADDRESS set (the suite's smoke run): join that cluster rather than start one.
    ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": 8, "include_dashboard": False}), log_to_driver=False)
    configure_data()
    # A warm cluster has served a Ray Data job before: its stats and autoscaling actors exist.
    # Creating them costs a first job about 1.7 s here; it is counted in the start-up figure.
    ray.data.range(1).materialize()
    startup = time.perf_counter() - t0
    cfg = from_dict({
        "model": {"name_or_path": model_dir},
        "data": {"train": jsonl, "max_length": max_length, "num_workers": workers, "shared_prompt": shared_prompt},
        "output": {"dir": out},
    })
    t1 = time.perf_counter()
    data = prepare_data(cfg)
    elapsed = time.perf_counter() - t1
    rows = {}  # line -> (status, ids), for the comparison with TRL (not timed)
    for block in blocks(data.processed):
        for r in block.select(["index", "status", "prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist():
            rows[r["index"]] = (r["status"], (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]))
    ray.shutdown()
    return elapsed, startup, data.summary.as_dict(), rows


def bench_trl(rows: list[dict], model_dir: str, out: str, max_length: int, workers: int):
    """(seconds, [prompt_ids, chosen_ids, rejected_ids] columns of the kept rows)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = DPOConfig(output_dir=out, dataset_num_proc=workers, max_length=max_length, report_to=[],
                     per_device_train_batch_size=2, use_cpu=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows[:8]), processing_class=tok)
    big = datasets.Dataset.from_list(rows)
    t0 = time.perf_counter()
    prepared = trainer._prepare_dataset(big, tok, args, "train")
    elapsed = time.perf_counter() - t0
    return elapsed, [tuple(prepared[c]) for c in ("prompt_ids", "chosen_ids", "rejected_ids")]


def same_ids(raydpo_rows: dict, trl_columns: list, max_length: int) -> tuple[int, int, int]:
    """(pairs whose two scored sequences have identical ids, of those the pairs with the same
    prompt/completion boundary, pairs compared): every pair both tools keep, in input order.

    TRL keeps rows in order minus the over-long prompts both tools drop, and its collator later
    cuts prompt + completion to ``max_length``, as raydpo's keep_start does. The boundary differs
    where TRL takes an implicit prompt as the common *character* prefix of chosen and rejected,
    which runs into responses that begin with the same words; raydpo cuts at the last assistant
    marker inside it."""
    trl_rows = iter(zip(*trl_columns))
    same = boundary = compared = 0
    for line in sorted(raydpo_rows):
        status, (p, c, r) = raydpo_rows[line]
        if status == "filtered":
            continue
        tp, tc, tr = next(trl_rows)
        if status == "ok":
            compared += 1
            if (p + c, p + r) == ((tp + tc)[:max_length], (tp + tr)[:max_length]):
                same += 1
                boundary += len(p) == len(tp)
    return same, boundary, compared


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--no-shared-prompt", action="store_true", help="three full tokenizations per pair (ablation)")
    args = ap.parse_args()

    from raydpo.fixtures.tiny import TinyModelSpec, build_tokenizer, write_tiny_model

    rows = load_rows(args.data, args.rows)
    base = rows[: min(len(rows), 2312)]
    tokenizer = build_tokenizer(args.vocab_size, [r["chosen"] for r in base] + [r["rejected"] for r in base])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(os.path.join(tmp, "model"), TinyModelSpec(hidden_size=64, intermediate_size=128), tokenizer)
        jsonl = os.path.join(tmp, "pairs.jsonl")
        with open(jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        r_time, r_start, summary, r_rows = bench_raydpo(jsonl, model_dir, os.path.join(tmp, "run"), args.max_length, args.workers,
                                               not args.no_shared_prompt)
        t_time, t_cols = bench_trl(rows, model_dir, os.path.join(tmp, "trl"), args.max_length, args.workers)

    n = len(rows)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"shared-prompt tokenization: {'off' if args.no_shared_prompt else 'on'}")
    print(f"rows: {n} (hh-rlhf harmless-base test repeated), max_length {args.max_length}, {args.workers} processes each, "
          f"BPE vocabulary {len(tokenizer)}")
    print(f"{'tool':<34}{'seconds':>9}{'pairs/s':>11}  kept")
    print(f"{'raydpo (Ray Data, warm cluster)':<34}{r_time:>9.2f}{n / r_time:>11.0f}  {summary['rows_used']} "
          f"(+{summary['rows_quarantined']} quarantined, {summary['rows_filtered']} filtered)")
    print(f"{'raydpo incl. Ray start-up':<34}{r_time + r_start:>9.2f}{n / (r_time + r_start):>11.0f}")
    print(f"{'TRL DPOTrainer._prepare_dataset':<34}{t_time:>9.2f}{n / t_time:>11.0f}  {len(t_cols[0])}")
    same, boundary, compared = same_ids(r_rows, t_cols, args.max_length)
    print(f"identical token ids of both scored sequences: {same} of {compared} pairs both keep "
          f"({boundary} with the same prompt boundary; see same_ids)")
    print(f"ratio raydpo / TRL pairs/s: {t_time / r_time:.2f}x (incl. Ray start-up: {t_time / (r_time + r_start):.2f}x)")


if __name__ == "__main__":
    main()
