"""KTO training throughput: raydpo's trainer (``loss.type: kto``, reference log-probs from the cache) vs TRL's KTOTrainer.

The setting of ``train_vs_trl.py`` (whose helpers this imports): a random Llama, 4 layers x 256 hidden,
a ~2k BPE vocabulary trained on the file (nothing downloads); hh-rlhf pairs in explicit-prompt form
whose sequences fit ``max_length``; float32 on CPU (bf16 on a GPU with ``--device cuda``); one process
each. The pairs are unpaired into a desirable (chosen) and an undesirable (rejected) example each:
TRL by ``unpair_preference_dataset``, raydpo by ``data.unpair_pairs``, both in the same order, and
both cut the examples into KL groups of the batch size with the completions rotated by one. Same
batch size (also the KL group), steps, learning rate, AdamW (clipping 1.0, constant schedule):

- TRL ``KTOTrainer``, the reference forwards (completion and KL sequence) in every step (its default);
- TRL with ``precompute_ref_log_probs=True`` (the precompute is reported apart, as set-up time);
- ``--trl-checkpointing``: also TRL in the loop with its own default ``gradient_checkpointing=True``
  (the rows above turn it off, as raydpo's ``model.gradient_checkpointing`` is off);
- raydpo, 1 Ray Train worker, DeepSpeed ZeRO-0, padded batches: a first run fills the reference
  cache, the second one (timed) hits it.

By default there are ``steps x batch / 2`` pairs, so each tool trains exactly one epoch over the same
examples: TRL reads them in order (``train_sampling_strategy='sequential'``, which its KL pairing
requires), raydpo shuffles them (each example carries its own KL sequence). Step time is the interval
between consecutive optimizer-step ends; the first ``--warmup`` steps are left out. Tokens/s counts
the real tokens of both sequences an example puts through the policy (completion and KL), per step:
TRL's from its prepared dataset in its sequential order, raydpo's from ``metrics.jsonl``. End to end:
TRL's trainer construction (data preparation, reference load or precompute) plus ``train()``, against
the whole cache-hit ``raydpo.run`` (data stage, Ray Train start, training, export).

    .venv/bin/python bench/kto_vs_trl.py [--steps 45] [--warmup 5] [--batch-size 8] [--trl-checkpointing]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_batching import DEFAULT_DATA, bench_model  # noqa: E402
from train_memory import memory_table  # noqa: E402
from train_vs_trl import explicit_rows, machine, peak_mib, raydpo_config, run_raydpo, step_stats  # noqa: E402

#: Command-line options: name -> (default, type, help). ``pairs`` 0: ``steps x batch_size / 2``.
OPTIONS = {
    "data": (DEFAULT_DATA, str, "hh-rlhf jsonl.gz"),
    "pairs": (0, int, "pairs to unpair (0: steps x batch size / 2, one epoch for both tools)"),
    "max_length": (256, int, "sequence length the pairs must fit"),
    "batch_size": (8, int, "examples per step (also KTO's KL group)"),
    "steps": (45, int, "optimizer steps, warm-up included"),
    "warmup": (5, int, "first steps left out of the timing"),
    "lr": (1e-5, float, "AdamW learning rate"),
    "seed": (0, int, "seed"),
    "vocab_size": (2048, int, "BPE vocabulary"),
    "hidden_size": (256, int, "model width"),
    "num_layers": (4, int, "model depth"),
    "threads": (os.cpu_count() or 1, int, "torch threads (and CPUs of raydpo's worker)"),
}


def now(device: str) -> float:
    """perf_counter after the device's queued work (a CUDA sync on a GPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def trl_kto(rows: list[dict], model_dir: str, out: str, args, precompute: bool, checkpointing: bool, callback):
    """TRL's KTOTrainer on the pairs unpaired by TRL -> (trainer, seconds its precompute took)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer
    from trl.data_utils import unpair_preference_dataset

    spent = []

    class Trainer(KTOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            t0 = time.perf_counter()
            result = super()._precompute_ref_logps(*a, **k)
            spent.append(time.perf_counter() - t0)
            return result

    datasets.disable_caching()  # no reuse of precomputed log-probs between runs
    gpu = args.device == "cuda"
    settings = dict(per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
                    learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.1, loss_type="kto",
                    max_length=args.max_length, precompute_ref_log_probs=precompute,
                    precompute_ref_batch_size=4 * args.batch_size, gradient_checkpointing=checkpointing,
                    train_sampling_strategy="sequential", logging_steps=1, report_to=[], save_strategy="no",
                    eval_strategy="no", use_cpu=not gpu, bf16=gpu, optim="adamw_torch", dataloader_num_workers=0,
                    seed=args.seed, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="bfloat16" if gpu else "float32")
    examples = unpair_preference_dataset(datasets.Dataset.from_list(rows))
    trainer = Trainer(model=model, args=KTOConfig(output_dir=out, **settings), train_dataset=examples,
                      processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[callback])
    return trainer, sum(spent)


def trl_step_tokens(dataset, batch: int, steps: int, max_length: int) -> np.ndarray:
    """Real tokens of each of TRL's ``steps`` batches, read in order (epochs repeat): per example its
    prompt + completion and prompt + KL completion, each cut at ``max_length`` as TRL's collator cuts."""
    p, c, kl = (np.array([len(x) for x in dataset[k]]) for k in ("prompt_ids", "completion_ids", "KL_completion_ids"))
    per_example = np.minimum(p + c, max_length) + np.minimum(p + kl, max_length)
    per_batch = [per_example[a:a + batch].sum() for a in range(0, len(per_example), batch)]
    return np.array([per_batch[i % len(per_batch)] for i in range(steps)], dtype=float)


def timed(times: dict, ends: list[float], start: float, tokens: np.ndarray, args) -> dict:
    """step_stats over the steps after the warm-up, tokens/s from each step's own token count."""
    per_example = float(tokens[args.warmup:].sum()) / (args.batch_size * (len(tokens) - args.warmup))
    stats = step_stats(ends, start, args.warmup, args.batch_size, per_example)
    return {"examples_s": stats.pop("pairs_s"), **stats, **times}


def bench_trl(rows, model_dir, tmp, args, precompute: bool, checkpointing: bool = False) -> dict:
    from transformers import TrainerCallback

    clock = {"start": 0.0, "ends": []}

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock["start"] = now(args.device)

        def on_step_end(self, *_, **__):
            clock["ends"].append(now(args.device))

    peak_mib(args.device, reset=True)
    t0 = time.perf_counter()
    trainer, precompute_s = trl_kto(rows, model_dir, os.path.join(tmp, f"trl-{precompute}-{checkpointing}"), args,
                                    precompute, checkpointing, StepClock())
    setup = time.perf_counter() - t0
    trainer.train()
    end_to_end = time.perf_counter() - t0
    tokens = trl_step_tokens(trainer.train_dataset, args.batch_size, len(clock["ends"]), args.max_length)
    return timed({"setup_s": setup, "precompute_s": precompute_s if precompute else None, "end_to_end_s": end_to_end,
                  "peak_mib": peak_mib(args.device)}, clock["ends"], clock["start"], tokens, args)


def kto_config(jsonl: str, model_dir: str, tmp: str, name: str, args) -> dict:
    """train_vs_trl's raydpo config (1 worker, ZeRO-0, padded) with loss.type kto on split pairs."""
    raw = raydpo_config(jsonl, model_dir, tmp, name, args, padding_free=False)
    raw["loss"]["type"] = "kto"
    raw["data"]["unpair_pairs"] = True
    return raw


def bench_raydpo(raw: dict, args) -> dict:
    wall, rows = run_raydpo(raw)
    with open(os.path.join(raw["output"]["dir"], "summary.json")) as f:
        summary = json.load(f)
    ends = np.cumsum([r["step_time_s"] for r in rows]).tolist()  # each row's step_time_s: since the previous step's end
    tokens = np.array([r["tokens_per_s"] * r["step_time_s"] for r in rows])
    return timed({"setup_s": None, "precompute_s": None, "end_to_end_s": wall, "peak_mib": None,
                  "cache_hit": summary["reference"]["train"]["cache_hit"], "examples": summary.get("examples"),
                  "timings_s": summary["timings_s"]}, ends, 0.0, tokens, args)


def table(results: dict, args) -> str:
    loop, pre = results["TRL, reference in loop"], results["TRL, precompute_ref_log_probs"]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = ["| trainer | examples/s | tokens/s | step p50 s | step p95 s | x TRL loop | x TRL precompute | set-up s | end to end s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        setup = fmt(r["setup_s"], ".1f") + (f" (precompute {r['precompute_s']:.1f})" if r["precompute_s"] else "")
        lines.append(f"| {name} | {r['examples_s']:.2f} | {r['tokens_s']:,.0f} | {r['p50']:.3f} | {r['p95']:.3f} | "
                     f"{r['examples_s'] / loop['examples_s']:.2f} | {r['examples_s'] / pre['examples_s']:.2f} | {setup} | "
                     f"{r['end_to_end_s']:.1f} |")
    if args.device == "cuda":
        lines.append("peak MiB (in-process runs): " + ", ".join(f"{n} {r['peak_mib']:.0f}" for n, r in results.items() if r["peak_mib"]))
    return "\n".join(lines)


def bench_inputs(args, tmp: str) -> tuple[str, list[dict], str]:
    """train_vs_trl's setting under ``tmp``: (the bench model's directory, the explicit-prompt pairs that
    fit ``max_length``, their jsonl for raydpo)."""
    from raydpo.fixtures.tiny import build_tokenizer

    texts = [json.loads(line) for line in gzip.open(args.data, "rt")]
    tokenizer = build_tokenizer(args.vocab_size, [r["chosen"] for r in texts] + [r["rejected"] for r in texts])
    rows, _ = explicit_rows(args.data, tokenizer, args.max_length, args.pairs)
    jsonl = os.path.join(tmp, "pairs.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return bench_model(tmp, tokenizer, args.hidden_size, args.num_layers, args.max_length), rows, jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, (default, kind, text) in OPTIONS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--trl-checkpointing", action="store_true", help="also TRL in the loop with gradient_checkpointing=True (its default)")
    args = ap.parse_args()
    import torch

    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.pairs = args.pairs or args.steps * args.batch_size // 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, rows, jsonl = bench_inputs(args, tmp)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        ray.init(num_cpus=max(4, 2 * args.threads), num_gpus=1 if args.device == "cuda" else 0, log_to_driver=False)
        cold, _ = run_raydpo(kto_config(jsonl, model_dir, tmp, "cold", args))  # fills the cache
        results = {"raydpo, padded (cache warm)": bench_raydpo(kto_config(jsonl, model_dir, tmp, "warm", args), args)}
        ray.shutdown()
        results["TRL, reference in loop"] = bench_trl(rows, model_dir, tmp, args, False)
        results["TRL, precompute_ref_log_probs"] = bench_trl(rows, model_dir, tmp, args, True)
        if args.trl_checkpointing:
            results["TRL, reference in loop, gradient_checkpointing"] = bench_trl(rows, model_dir, tmp, args, False, True)
        memory = memory_table(model_dir, args.device)
    warm = results["raydpo, padded (cache warm)"]
    date, where = time.strftime("%Y-%m-%d"), f"{platform.platform()}; {machine(args)}"
    print(f"\n{date}, {where}")
    print(f"{len(rows)} hh-rlhf pairs fitting {args.max_length} tokens -> {2 * len(rows)} examples "
          f"(raydpo: {warm['examples']}); batch {args.batch_size} examples (= KL group), {args.steps} steps "
          f"({args.warmup} warm-up left out); AdamW lr {args.lr}, {'bf16' if args.device == 'cuda' else 'float32'}\n")
    print(table(results, args))
    loop = results["TRL, reference in loop"]
    print(f"\nraydpo / TRL examples/s: {warm['examples_s'] / loop['examples_s']:.2f}x (reference in loop), "
          f"{warm['examples_s'] / results['TRL, precompute_ref_log_probs']['examples_s']:.2f}x (precompute); "
          f"end to end: raydpo cache-hit run {warm['end_to_end_s']:.1f} s (cache hit: {warm['cache_hit']}; "
          f"stages {warm['timings_s']}), cold first run {cold:.1f} s; TRL whole runs (set-up + train()): "
          + ", ".join(f"{n[5:]} {r['end_to_end_s']:.1f} s ({r['end_to_end_s'] / warm['end_to_end_s']:.2f}x raydpo's)"
                      for n, r in results.items() if n.startswith("TRL")))
    print(memory)
    print(json.dumps({"bench": "kto_vs_trl", "date": date, "platform": platform.platform(), "cpus": os.cpu_count(),
                      "machine": machine(args), "args": vars(args), "pairs": len(rows), "raydpo_cold_run_s": cold,
                      "results": results}, default=float))


if __name__ == "__main__":
    main()
