# Run (after `make demo` has written runs/tiny-model): .venv/bin/python examples/iterative_dpo.py
"""Iterative DPO as one Python pipeline, with no files between its stages.

Each round: sample several completions per prompt from the current policy (a Ray Data actor pool;
vLLM where installed, transformers otherwise), rank them with a scoring function (here the
synthetic task's rule: how many words continue the count correctly), pair the best with the worst,
and hand that ``ray.data.Dataset`` to raydpo's stages: tokenize, score the reference (the round's
starting policy), train. The next round samples from the policy it produced.

    .venv/bin/python examples/iterative_dpo.py [--rounds 2] [--prompts 256] [--samples 4]
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np

from raydpo.synthetic import WORDS


def count_on_score(prompt: str, completion: str) -> float:
    """10 per word that continues the count from the prompt's start word (up to the first mistake),
    1 per other task word, minus a little per character: a graded score, so even an untrained
    policy's samples rank."""
    start = WORDS.index(prompt.split()[-1].rstrip(":"))
    words = completion.split()
    correct = 0
    for i, word in enumerate(words):
        if word != WORDS[(start + 1 + i) % len(WORDS)]:
            break
        correct += 1
    return 10 * correct + sum(w in WORDS for w in words[correct:]) - 0.01 * len(completion)


class Sampler:
    """A Ray Data actor: ``samples`` completions per prompt from the policy at ``model_path``."""

    def __init__(self, model_path: str, samples: int, max_new_tokens: int, seed: int):
        self.samples, self.max_new_tokens = samples, max_new_tokens
        try:
            from vllm import LLM, SamplingParams

            self.llm = LLM(model=model_path, seed=seed, gpu_memory_utilization=0.3)
            self.params = SamplingParams(n=samples, temperature=1.0, max_tokens=max_new_tokens, seed=seed)
        except ImportError:
            import torch

            from raydpo.models import load_causal_lm, load_tokenizer

            self.llm, self.torch = None, torch
            self.model = load_causal_lm(model_path, frozen=True)
            self.tokenizer = load_tokenizer(model_path)
            torch.manual_seed(seed)

    def __call__(self, batch: dict) -> dict:
        prompts = list(batch["prompt"])
        if self.llm is not None:
            outs = self.llm.generate(prompts, self.params)
            completions = [[c.text for c in o.outputs] for o in outs]
        else:
            completions = []
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt")
                with self.torch.no_grad():
                    out = self.model.generate(**ids, do_sample=True, temperature=1.0, max_new_tokens=self.max_new_tokens,
                                              num_return_sequences=self.samples, pad_token_id=self.tokenizer.pad_token_id)
                n = ids["input_ids"].shape[1]
                completions.append([self.tokenizer.decode(o[n:], skip_special_tokens=True) for o in out])
        return {"prompt": np.array(prompts, dtype=object), "completions": np.array(completions, dtype=object)}


def best_and_worst(row: dict) -> list[dict]:
    """One preference pair from ranked samples, or none when all score the same."""
    ranked = sorted({c for c in row["completions"] if c.strip()}, key=lambda c: count_on_score(row["prompt"], c))
    if len(ranked) < 2 or count_on_score(row["prompt"], ranked[0]) == count_on_score(row["prompt"], ranked[-1]):
        return []
    return [{"prompt": row["prompt"], "chosen": ranked[-1], "rejected": ranked[0]}]


def one_round(policy: str, out_dir: str, args, round_: int) -> tuple[str, dict]:
    """Sample, rank, pair and train once; returns (new policy path, round stats)."""
    import ray.data

    import raydpo
    from raydpo.api import score_pairs, tokenize_pairs, train_on_pairs

    rng = random.Random(args.seed + round_)
    prompts = ray.data.from_items([{"prompt": f"Count on from {rng.choice(WORDS)}:"} for _ in range(args.prompts)])
    samples = prompts.map_batches(Sampler, fn_constructor_kwargs={"model_path": policy, "samples": args.samples,
                                                                  "max_new_tokens": args.max_new_tokens, "seed": args.seed + round_},
                                  batch_size=32, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
    pairs = samples.flat_map(best_and_worst).materialize()
    mean_score = float(np.mean([max(count_on_score(r["prompt"], c) for c in r["completions"]) for r in samples.take_all()]))
    cfg = raydpo.load_config(args.config, [f"model.name_or_path={policy}", f"output.dir={out_dir}/round{round_}",
                                           "data.eval=[]", f"train.max_steps={args.steps}", "train.eval_every=0"])
    result = train_on_pairs(score_pairs(tokenize_pairs(pairs, cfg), cfg), cfg)
    return result.model_path, {"round": round_, "pairs": pairs.count(), "best_sample_score": mean_score,
                               "final_loss": result.summary["final_metrics"].get("loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "tiny.yaml"))
    ap.add_argument("--policy", default="runs/tiny-model")
    ap.add_argument("--out", default="runs/iterative")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    from raydpo.cluster import ensure_ray
    from raydpo.config import load

    ensure_ray(load(args.config))
    policy = args.policy
    for round_ in range(args.rounds):
        policy, stats = one_round(policy, args.out, args, round_)
        print(f"[iterative] {stats} -> {policy}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
