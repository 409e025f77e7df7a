"""Per-round overhead of ``raydpo online`` against the restart-per-round iterative example it replaced.

Both run the same rounds on the same model, prompts and settings (the synthetic count-on task, K
samples per prompt, best-vs-worst pairs by the task's Python reward, a fixed number of DPO steps per
round on 2 Ray Train workers with DeepSpeed ZeRO-2):

- ``online``: ``raydpo.online.run.run_online``, one Ray Train worker group, one reference pool and one
  generator for all rounds, weights synced through the object store;
- ``restart``: the loop ``examples/iterative_dpo.py`` held before (kept here as the baseline): per round a
  Ray Data sampler pool loads the policy from disk, then ``tokenize_pairs`` -> ``score_pairs`` ->
  ``train_on_pairs`` start a tokenizer pool, a reference pool and a new Ray Train run with a new
  DeepSpeed engine, which exports the model for the next round.

Overhead per round = round wall time - compute, compute = generation time inside the generator
(both measure it in the actor) + judge time + reference forward time + the training steps' time
(``step_time_s`` summed from metrics.jsonl, both). The restart loop's reference compute is not
exposed by its Ray Data pool; it is taken as the online pool's measured seconds per pair times its
pairs (same model, same pair shapes). The online run's one-time start-up (pools, workers, engines)
is reported apart, and amortized over the rounds too.

    python bench/online_rounds.py [--rounds 3] [--prompts 64] [--samples 8] [--steps 16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def base_raw(model: str, data: str, work: str, args) -> dict:
    return {
        "model": {"name_or_path": model},
        "reference": {"cache_dir": os.path.join(work, "cache"), "batch_size": 32},
        "data": {"train": os.path.join(data, "train.jsonl"), "max_length": 48, "num_workers": 1},
        "loss": {"beta": 0.1},
        "train": {"num_workers": 2, "micro_batch_size": 8, "learning_rate": 0.003, "seed": 0, "log_every": 1},
        "online": {"rounds": args.rounds, "prompts_per_round": args.prompts, "steps_per_round": args.steps, "eval_prompts": 0,
                   "generator": {"samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens, "batch_size": 32},
                   "judge": {"reward_fn": "raydpo.fixtures.synthetic:count_on_reward"}},
        "output": {"dir": os.path.join(work, "online")},
    }


def step_seconds(metrics_path: str, key=None) -> dict:
    """Sum of ``step_time_s`` per round (``key(row)`` gives the round; default the row's ``round``)."""
    out: dict = {}
    with open(metrics_path) as f:
        for row in map(json.loads, f):
            if "step_time_s" in row:
                r = key(row) if key else row["round"]
                out[r] = out.get(r, 0.0) + row["step_time_s"]
    return out


def run_online_rounds(raw: dict) -> dict:
    from raydpo.config import from_dict
    from raydpo.online.run import run_online

    start = time.perf_counter()
    result = run_online(from_dict(raw), force=True)
    total = time.perf_counter() - start
    rounds = [r for r in result.rounds if r["kind"] == "round"]
    steps = step_seconds(os.path.join(result.output_dir, "metrics.jsonl"))
    per = []
    for r in rounds:
        compute = r["compute/generate"] + r["compute/judge"] + r["compute/reference"] + steps.get(r["round"], 0.0)
        per.append({"round": r["round"], "wall_s": r["seconds/round"], "compute_s": compute, "overhead_s": r["seconds/round"] - compute,
                    "pairs": r["pairs"], "reference_s_per_pair": r["compute/reference"] / max(r["pairs"], 1)})
    startup = total - sum(p["wall_s"] for p in per)
    return {"rounds": per, "total_s": total, "startup_s": startup,
            "overhead_per_round_s": float(np.mean([p["overhead_s"] for p in per])),
            "amortized_overhead_per_round_s": (total - sum(p["compute_s"] for p in per)) / len(per)}


class Sampler:
    """The old example's Ray Data sampler (transformers ``generate``), timing its own generation."""

    def __init__(self, model_path: str, samples: int, max_new_tokens: int, seed: int):
        import torch

        from raydpo.models import load_causal_lm, load_tokenizer

        torch.set_num_threads(1)
        self.torch, self.samples, self.max_new_tokens = torch, samples, max_new_tokens
        self.model = load_causal_lm(model_path, frozen=True)
        self.tokenizer = load_tokenizer(model_path)
        torch.manual_seed(seed)

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        completions = []
        for prompt in batch["prompt"]:
            ids = self.tokenizer(prompt, return_tensors="pt")
            with self.torch.no_grad():
                out = self.model.generate(**ids, do_sample=True, temperature=1.0, max_new_tokens=self.max_new_tokens,
                                          num_return_sequences=self.samples, pad_token_id=self.tokenizer.pad_token_id)
            n = ids["input_ids"].shape[1]
            completions.append([self.tokenizer.decode(o[n:], skip_special_tokens=True) for o in out])
        took = time.perf_counter() - start
        return {"prompt": np.array(list(batch["prompt"]), dtype=object), "completions": np.array(completions, dtype=object),
                "gen_s": np.full(len(completions), took / max(len(completions), 1))}


def run_restart_rounds(raw: dict, args, reference_s_per_pair: float) -> dict:
    import ray.data

    import raydpo
    from raydpo.pipeline.datasets import score_pairs, tokenize_pairs, train_on_pairs
    from raydpo.online.prompts import load_prompts
    from raydpo.config import from_dict
    from raydpo.models import load_tokenizer
    from raydpo.online.prompts import round_prompts
    from raydpo.fixtures.synthetic import count_on_reward

    cfg0 = from_dict(raw)
    prompts = load_prompts(cfg0, load_tokenizer(cfg0.model.name_or_path)).train
    policy, per, work = raw["model"]["name_or_path"], [], os.path.dirname(raw["output"]["dir"])
    for r in range(args.rounds):
        start = time.perf_counter()
        chosen = [p.value for p in round_prompts(prompts, args.prompts, 0, r)]
        samples = ray.data.from_items([{"prompt": p} for p in chosen]).map_batches(
            Sampler, fn_constructor_kwargs={"model_path": policy, "samples": args.samples, "max_new_tokens": args.max_new_tokens, "seed": r},
            batch_size=32, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
        rows = samples.take_all()
        gen_s = sum(float(x["gen_s"]) for x in rows)
        t = time.perf_counter()
        pairs = []
        for row in rows:
            scored = sorted(((count_on_reward(row["prompt"], c), c) for c in set(row["completions"]) if c.strip()))
            if len(scored) >= 2 and scored[-1][0] > scored[0][0]:
                pairs.append({"prompt": row["prompt"], "chosen": scored[-1][1], "rejected": scored[0][1]})
        judge_s = time.perf_counter() - t
        out_dir = os.path.join(work, "restart", f"round{r}")
        cfg = raydpo.load_config(os.path.join(work, "restart.yaml"), [f"model.name_or_path={policy}", f"output.dir={out_dir}",
                                                                       f"train.max_steps={args.steps}"])
        result = train_on_pairs(score_pairs(tokenize_pairs(ray.data.from_items(pairs), cfg), cfg), cfg)
        wall = time.perf_counter() - start
        train_s = sum(step_seconds(os.path.join(out_dir, "metrics.jsonl"), key=lambda row: 0).values())
        compute = gen_s + judge_s + reference_s_per_pair * len(pairs) + train_s
        per.append({"round": r, "wall_s": wall, "compute_s": compute, "overhead_s": wall - compute, "pairs": len(pairs)})
        policy = result.model_path
    return {"rounds": per, "overhead_per_round_s": float(np.mean([p["overhead_s"] for p in per]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="policy directory (default: a fresh `raydpo tiny-model`)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import yaml

    from raydpo.cluster import configure_data
    from raydpo.fixtures.synthetic import write_task
    from raydpo.fixtures.tiny import write_tiny_model

    work = tempfile.mkdtemp(prefix="raydpo-online-bench-")
    model = args.model or write_tiny_model(os.path.join(work, "model"))
    write_task(os.path.join(work, "data"), n_train=2000, n_eval=0, seed=0)
    raw = base_raw(model, os.path.join(work, "data"), work, args)
    restart_raw = {k: v for k, v in raw.items() if k != "online"} | {"output": {"dir": os.path.join(work, "restart")}}
    with open(os.path.join(work, "restart.yaml"), "w") as f:
        yaml.safe_dump(restart_raw, f)
    ray.init(num_cpus=8, logging_level="WARNING")
    configure_data()
    online = run_online_rounds(raw)
    per_pair = float(np.mean([r["reference_s_per_pair"] for r in online["rounds"]]))
    restart = run_restart_rounds(raw, args, per_pair)
    ray.shutdown()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
              "settings": vars(args), "online": online, "restart": restart,
              "overhead_ratio": restart["overhead_per_round_s"] / max(online["overhead_per_round_s"], 1e-9),
              "amortized_overhead_ratio": restart["overhead_per_round_s"] / max(online["amortized_overhead_per_round_s"], 1e-9)}
    print(json.dumps(result, indent=1))
    print(f"overhead per round: restart-per-round {restart['overhead_per_round_s']:.2f} s, raydpo online "
          f"{online['overhead_per_round_s']:.2f} s ({result['overhead_ratio']:.1f}x less); with the online start-up "
          f"({online['startup_s']:.1f} s) spread over {args.rounds} rounds {online['amortized_overhead_per_round_s']:.2f} s "
          f"({result['amortized_overhead_ratio']:.1f}x less)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
