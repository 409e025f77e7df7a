"""Training throughput: raydpo's trainer (reference log-probs from the cache) vs TRL's DPOTrainer.

Same model (a random Llama, 4 layers x 256 hidden, a ~2k BPE vocabulary trained on the file; nothing
downloads), same hh-rlhf pairs in explicit-prompt form (only pairs whose sequences fit ``max_length``,
so neither tool truncates and both see the same tokens), same batch size, steps, learning rate and
AdamW, float32 on CPU (bf16 + nccl on a GPU with ``--device cuda``), one process each:

- TRL ``DPOTrainer``, the reference forward in every step (its default);
- TRL with ``precompute_ref_log_probs=True`` (the precompute is reported apart, as set-up time);
- raydpo, 1 Ray Train worker, DeepSpeed ZeRO-0, the reference cache already warm, its default config
  (``train.share_prompt`` on: one row per pair, the prompt computed once);
- raydpo the same with ``train.share_prompt: false`` (two rows per pair, as TRL computes them);
- with ``--full``: raydpo with ``train.padding_free``, and a bare PyTorch loop doing raydpo's math
  (collate, ``forward_logps``, ``preference_loss``, AdamW) with no Ray and no DeepSpeed: the floor
  that raydpo's framework overhead is measured against.

Each on the row shapes of :data:`DATASETS` (``--datasets``), all from hh-rlhf: as it is, its multi-turn
dialogues, and its prompts cut to one short turn, so the gain of sharing the prompt shows where it is
large and where it is small.

Step time is the interval between consecutive optimizer-step ends (data loading, collation, forward,
backward, update, metrics); the first ``--warmup`` steps are left out. Tokens/s counts real tokens.
``--sweep`` also times a sweep of 4 runs with different ``loss.beta`` end to end (data preparation,
reference, training): raydpo scores once and hits its cache three times; TRL runs four times.

    .venv/bin/python bench/train_vs_trl.py [--datasets hh-rlhf multi-turn short-prompt] [--steps 60]
        [--batch-size 8] [--full] [--sweep]
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


HUMAN = "\n\nHuman:"
#: The row shapes the trainer is timed on, each from hh-rlhf (``--datasets``), with its ``max_length``:
#: how much of a pair its prompt is decides what computing the prompt once saves.
DATASETS = {
    "hh-rlhf": ("hh-rlhf as it is: dialogues split at the last Assistant turn (prompt ~3x a response)", 256),
    "multi-turn": ("the hh-rlhf dialogues of 3+ Human turns: a long multi-turn history, short replies "
                   "(the shape of LLaMA-Factory's multi-turn preference sets)", 512),
    "short-prompt": ("hh-rlhf with each prompt cut to its last Human turn: single-turn, short prompts", 256),
}


def shaped(pair, dataset: str):
    """``pair`` as ``dataset`` wants it (None: not of that shape)."""
    if dataset == "multi-turn":
        return pair if pair.prompt.count(HUMAN) >= 3 else None
    if dataset == "short-prompt":
        return type(pair)(pair.prompt[pair.prompt.rfind(HUMAN):], pair.chosen, pair.rejected, pair.kind)
    return pair


def explicit_rows(path: str, tokenizer, max_length: int, limit: int, dataset: str = "hh-rlhf") -> tuple[list[dict], dict]:
    """hh-rlhf rows as ``{prompt, chosen, rejected}`` strings (split at the last Assistant turn, shaped
    as ``dataset``) whose tokenized sequences (BOS + prompt + completion + EOS) fit ``max_length``;
    plus their token columns."""
    from raydpo.data.tokenize import TokenizeSettings, tokenize_normalized
    from raydpo.data.validate import parse_row

    pairs = [shaped(p, dataset) for p, _ in (parse_row(line.encode()) for line in gzip.open(path, "rt")) if p is not None]
    pairs = [p for p in pairs if p is not None]
    toks = tokenize_normalized(tokenizer, pairs, TokenizeSettings(max_length=1 << 20))
    rows, cols = [], {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for pair, t in zip(pairs, toks):
        if t["error"] or t["filtered"] or len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"])) > max_length:
            continue
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
        for k in cols:
            cols[k].append(np.asarray(t[k], dtype=np.int64))
        if len(rows) == limit:
            break
    return rows, {k: np.array(v, dtype=object) for k, v in cols.items()}


def tokens_per_pair(cols: dict) -> float:
    """Mean real tokens a pair puts through the model as two rows: prompt twice, both completions
    (the same work unit for every tool; one shared-prompt row computes fewer)."""
    p, c, r = (np.array([len(x) for x in cols[k]]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return float(np.mean(2 * p + c + r))


def prompt_share(cols: dict) -> float:
    """The fraction of a pair's two-row tokens that are its prompt's second copy (what sharing saves)."""
    p, c, r = (np.array([len(x) for x in cols[k]]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return float(p.sum() / (2 * p + c + r).sum())


def step_stats(ends: list[float], start: float, warmup: int, batch: int, tok_per_pair: float) -> dict:
    """Per-step intervals after the warm-up -> pairs/s, tokens/s, p50 and p95 step time."""
    times = np.diff([start] + ends)[warmup:]
    pairs_s = batch * len(times) / times.sum()
    return {"pairs_s": pairs_s, "tokens_s": pairs_s * tok_per_pair, "p50": float(np.percentile(times, 50)),
            "p95": float(np.percentile(times, 95)), "steps": len(times)}


def trl_trainer(rows: list[dict], model_dir: str, out: str, args, precompute: bool, beta: float = 0.1, clock=None):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    datasets.disable_caching()  # no cross-run reuse of TRL's precomputed log-probs (each run pays, as timed)
    gpu = args.device == "cuda"
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=beta,
        max_length=args.max_length, precompute_ref_log_probs=precompute, precompute_ref_batch_size=4 * args.batch_size,
        logging_steps=1, report_to=[], save_strategy="no", eval_strategy="no", use_cpu=not gpu, bf16=gpu,
        optim="adamw_torch", dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="bfloat16" if gpu else "float32")
    return DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[clock] if clock else None)


def bench_trl(rows, model_dir, tmp, args, precompute: bool, tok_per_pair: float) -> dict:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.ends = 0.0, []

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                import torch

                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = Clock()
    peak_mib(args.device, reset=True)
    t0 = time.perf_counter()
    trainer = trl_trainer(rows, model_dir, os.path.join(tmp, f"trl-{precompute}"), args, precompute, clock=clock)
    setup = time.perf_counter() - t0
    trainer.train()
    return step_stats(clock.ends, clock.start, args.warmup, args.batch_size, tok_per_pair) | {
        "setup_s": setup, "peak_mib": peak_mib(args.device)}


def raydpo_config(jsonl: str, model_dir: str, tmp: str, name: str, args, padding_free: bool, beta: float = 0.1,
                  share_prompt: bool | None = None, max_length: int | None = None) -> dict:
    gpu = args.device == "cuda"
    return {
        "model": {"name_or_path": model_dir, "dtype": "bfloat16" if gpu else "float32"},
        "reference": {"cache_dir": os.path.join(tmp, "cache"), "num_actors": 1, "num_cpus_per_actor": args.threads,
                      "num_gpus_per_actor": 0.5 if gpu else 0.0},
        "data": {"train": jsonl, "max_length": max_length or args.max_length, "num_workers": 1},
        "loss": {"beta": beta},
        "train": {"num_workers": 1, "zero_stage": 0, "micro_batch_size": args.batch_size, "learning_rate": args.lr,
                  "max_steps": args.steps, "log_every": 1, "eval_every": 0, "seed": args.seed, "use_gpu": gpu,
                  "cpus_per_worker": args.threads, "padding_free": padding_free, "share_prompt": share_prompt},
        "output": {"dir": os.path.join(tmp, name)},
    }


def run_raydpo(raw: dict) -> tuple[float, list[dict]]:
    """One pipeline run in this process's Ray cluster -> (wall seconds, metrics rows)."""
    import raydpo
    from raydpo.config import from_dict

    t0 = time.perf_counter()
    result = raydpo.run(from_dict(raw))
    return time.perf_counter() - t0, [m for m in result.metrics if "loss" in m]


def bench_raydpo(raw: dict, args, tok_per_pair: float) -> dict:
    wall, rows = run_raydpo(raw)
    ends = np.cumsum([r["step_time_s"] for r in rows]).tolist()  # each row's step_time_s: since the previous step's end
    return step_stats(ends, 0.0, args.warmup, args.batch_size, tok_per_pair) | {"setup_s": wall}


def bench_floor(cols: dict, model_dir: str, args, tok_per_pair: float) -> dict:
    """raydpo's math in a plain loop: the same collate, log-prob and loss functions and batch order."""
    import torch

    from raydpo.config import LossConfig, TrainConfig
    from raydpo.data.collate import collate_rows
    from raydpo.logprobs import forward_logps
    from raydpo.objectives import preference_loss
    from raydpo.models import load_causal_lm
    from raydpo.train.batches import epoch_order, take

    device = args.device
    dtype = "bfloat16" if device == "cuda" else "float32"
    pad_id = 0  # the tokenizer's <pad> (build_tokenizer's first special token); padded positions are masked anyway
    peak_mib(device, reset=True)
    model = load_causal_lm(model_dir, dtype).to(device)
    with torch.no_grad():  # the reference log-probs (the cache's role), not timed
        ref = [forward_logps(model, {k: v.to(device) for k, v in collate_rows(take(cols, np.arange(i, min(i + 32, len(cols["prompt_ids"])))), pad_id).items()}).float().cpu()
               for i in range(0, len(cols["prompt_ids"]), 32)]
    half = [(x[: len(x) // 2], x[len(x) // 2:]) for x in ref]
    cols = cols | {"ref_chosen_logps": torch.cat([c for c, _ in half]).numpy(),
                   "ref_rejected_logps": torch.cat([r for _, r in half]).numpy()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_cfg = LossConfig(beta=0.1)
    order = [b for epoch in range(100) for b in epoch_order(cols, args.batch_size, args.seed, epoch, False)][: args.steps]
    start, ends = time.perf_counter(), []
    for index in order:
        batch = {k: v.to(device) for k, v in collate_rows(take(cols, index), pad_id).items()}
        logps = forward_logps(model, batch)
        _, (losses, _, _), sums = preference_loss(logps, batch["completion_tokens"],
                                                  (batch["ref_chosen_logps"], batch["ref_rejected_logps"]), loss_cfg)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TrainConfig().max_grad_norm)  # as the engine clips
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = {k: float(v) for k, v in sums.items()}  # the metrics the trainer logs (a device sync, as there)
        ends.append(time.perf_counter())
    return step_stats(ends, start, args.warmup, args.batch_size, tok_per_pair) | {"setup_s": 0.0, "peak_mib": peak_mib(device)}


def sweep(rows, jsonl, model_dir, tmp, args, betas) -> tuple[float, float, list]:
    """(raydpo seconds, TRL seconds, per-run seconds) for ``len(betas)`` full runs each."""
    r_times, t_times = [], []
    for i, beta in enumerate(betas):
        raw = raydpo_config(jsonl, model_dir, os.path.join(tmp, "sweep"), f"beta{i}", args, padding_free=args.sweep_padding_free, beta=beta)
        r_times.append(run_raydpo(raw)[0])
    for beta in betas:
        t0 = time.perf_counter()
        trl_trainer(rows, model_dir, os.path.join(tmp, f"trl-sweep-{beta}"), args, False, beta=beta).train()
        t_times.append(time.perf_counter() - t0)
    return sum(r_times), sum(t_times), list(zip(betas, r_times, t_times))


def peak_mib(device: str, reset: bool = False) -> float | None:
    """Peak CUDA memory allocated by this process since the last reset (None on CPU)."""
    if device != "cuda":
        return None
    import torch

    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**20


def machine(args) -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, {args.threads} threads"


def bench_dataset(dataset: str, tokenizer, model_dir: str, tmp: str, args) -> dict:
    """Every trainer timed on one row shape (:data:`DATASETS`) -> {name: stats}; prints its table."""
    rows, cols = explicit_rows(args.data, tokenizer, args.max_length, args.pairs, dataset)
    jsonl = os.path.join(tmp, f"{dataset}.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tpp = tokens_per_pair(cols)
    print(f"\n== {dataset}: {DATASETS[dataset][0]}\n{len(rows)} pairs fitting {args.max_length} tokens ({tpp:.0f} "
          f"two-row tokens per pair, {prompt_share(cols):.0%} of them the prompt's second copy), batch "
          f"{args.batch_size} pairs, {args.steps} steps ({args.warmup} warm-up)", flush=True)
    config = lambda name, **kw: raydpo_config(jsonl, model_dir, tmp, f"{dataset}-{name}", args, **kw)  # noqa: E731
    cold, _ = run_raydpo(config("cold", padding_free=False))  # fills the cache
    results = {"raydpo, default (one row per pair)": bench_raydpo(config("default", padding_free=False), args, tpp),
               "raydpo, two rows per pair": bench_raydpo(config("two-rows", padding_free=False, share_prompt=False), args, tpp)}
    if args.full:
        results["raydpo, padding-free"] = bench_raydpo(config("free", padding_free=True), args, tpp)
        results["bare PyTorch floor (two rows)"] = bench_floor(cols, model_dir, args, tpp)
    results["TRL, reference in loop"] = bench_trl(rows, model_dir, tmp, args, False, tpp)
    results["TRL, precompute_ref_log_probs"] = bench_trl(rows, model_dir, tmp, args, True, tpp)
    base, pre = results["TRL, reference in loop"]["pairs_s"], results["TRL, precompute_ref_log_probs"]["pairs_s"]
    print(f"{'trainer phase':<36}{'pairs/s':>9}{'tokens/s':>10}{'p50 s':>8}{'p95 s':>8}{'x TRL':>7}{'x TRL pre':>10}  set-up s"
          + ("  peak MiB" if args.device == "cuda" else ""))
    for name, r in results.items():
        peak = f"  {r['peak_mib']:.0f}" if r.get("peak_mib") is not None else ""
        print(f"{name:<36}{r['pairs_s']:>9.2f}{r['tokens_s']:>10.0f}{r['p50']:>8.3f}{r['p95']:>8.3f}"
              f"{r['pairs_s'] / base:>7.2f}{r['pairs_s'] / pre:>10.2f}  {r['setup_s']:.1f}{peak}")
    print(f"cold first run (scoring the cache) {cold:.1f} s", flush=True)
    return results | {"_rows": (rows, jsonl)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=None, help="default: each dataset's own (DATASETS)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (and CPUs of raydpo's worker)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--full", action="store_true", help="also raydpo padding-free and the bare PyTorch floor")
    ap.add_argument("--sweep", action="store_true", help="also time a 4-run loss.beta sweep end to end (first dataset)")
    ap.add_argument("--sweep-runs", type=int, default=4, help="runs in the sweep (betas 0.05, 0.1, 0.2, 0.5, ...)")
    ap.add_argument("--sweep-padding-free", action="store_true", help="raydpo's sweep runs padding-free")
    args = ap.parse_args()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from raydpo.fixtures.tiny import build_tokenizer

    texts = [json.loads(line) for line in gzip.open(args.data, "rt")]
    tokenizer = build_tokenizer(args.vocab_size, [r["chosen"] for r in texts] + [r["rejected"] for r in texts])
    lengths = {d: args.max_length or DATASETS[d][1] for d in args.datasets}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model(tmp, tokenizer, args.hidden_size, args.num_layers, max(lengths.values()))
        print(f"machine: {machine(args)}; model: Llama {args.num_layers} x {args.hidden_size}, vocab {args.vocab_size}")
        import ray

        # RAY_ADDRESS set (the suite's smoke run): join that cluster rather than start one.
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(4, 2 * args.threads),
                                                            "num_gpus": 1 if args.device == "cuda" else 0}), log_to_driver=False)
        summary = {}
        for dataset in args.datasets:
            one = argparse.Namespace(**(vars(args) | {"max_length": lengths[dataset]}))
            results = bench_dataset(dataset, tokenizer, model_dir, tmp, one)
            summary[dataset] = results
        print(f"\n{'dataset':<14}{'default x TRL':>14}{'x TRL pre':>11}{'two rows x TRL':>16}")
        for dataset, r in summary.items():
            base, pre = r["TRL, reference in loop"]["pairs_s"], r["TRL, precompute_ref_log_probs"]["pairs_s"]
            ours, two = r["raydpo, default (one row per pair)"]["pairs_s"], r["raydpo, two rows per pair"]["pairs_s"]
            print(f"{dataset:<14}{ours / base:>14.2f}{ours / pre:>11.2f}{two / base:>16.2f}")
        if args.full:
            print(memory_table(model_dir, args.device))
        if args.sweep:
            first = args.datasets[0]
            one = argparse.Namespace(**(vars(args) | {"max_length": lengths[first]}))
            rows, jsonl = summary[first]["_rows"]
            betas = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0][: args.sweep_runs]
            r_total, t_total, runs = sweep(rows, jsonl, model_dir, tmp, one, betas)
            print(f"\n{len(betas)}-run beta sweep, end to end: raydpo {r_total:.1f} s, TRL {t_total:.1f} s, "
                  f"{t_total / r_total:.2f}x; per run (beta, raydpo s, TRL s): "
                  + ", ".join(f"({b}, {r:.1f}, {t:.1f})" for b, r, t in runs))
        ray.shutdown()


if __name__ == "__main__":
    main()
