# Run (after `make demo` has written runs/tiny-model and runs/data): .venv/bin/python examples/iterative_dpo.py
"""Iterative (online) DPO from Python: the prompts are a ``ray.data.Dataset`` made by your pipeline.

``raydpo online examples/online.yaml`` runs the same rounds from files. Here the prompts come from
an upstream stage as a Dataset, the judge is the synthetic task's Python reward, and each round's
row (rewards, pairs, seconds per phase) is printed as it lands. One Ray Train worker group, one
reference pool and one generator live through all rounds; weights reach the generator through
Ray's object store. Pipelines that drive their own rounds can still chain
``raydpo.tokenize_pairs`` -> ``raydpo.score_pairs`` -> ``raydpo.train_on_pairs`` on Datasets.

    .venv/bin/python examples/iterative_dpo.py [--rounds 3] [--policy runs/tiny-model] [--out runs/iterative]
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "online.yaml"))
    ap.add_argument("--policy", default="runs/tiny-model")
    ap.add_argument("--out", default="runs/iterative")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per round")
    ap.add_argument("--steps", type=int, default=16, help="DPO steps per round")
    args = ap.parse_args()

    import ray
    import ray.data

    import raydpo
    from raydpo.cluster import ensure_ray
    from raydpo.fixtures.synthetic import WORDS

    cfg = raydpo.load_config(args.config, [f"model.name_or_path={args.policy}", f"output.dir={args.out}", f"online.rounds={args.rounds}",
                                           f"online.prompts_per_round={args.prompts}", f"online.steps_per_round={args.steps}",
                                           f"reference.cache_dir={args.out}/reference-cache", "online.eval_prompts=8"])
    ensure_ray(cfg)
    # An upstream stage's prompts (any format the data stage reads: here prompt-only rows).
    prompts = ray.data.from_items([{"prompt": f"Count on from {w}:"} for w in WORDS[:16]])
    held_out = ray.data.from_items([{"prompt": f"Count on from {w}:"} for w in WORDS[16:]])

    def show(row: dict, pools: dict) -> None:
        print(f"[iterative] round {row['round']}: held-out reward {row.get('eval/reward_mean')}, {row['pairs']} pairs, "
              f"train loss {row.get('train/loss')}, {row['seconds/round']:.1f} s", flush=True)

    result = raydpo.run_online(cfg, prompts=prompts, eval_prompts=held_out, force=True, on_round=show)
    print(f"[iterative] held-out reward {result.summary['initial_eval_reward']:.2f} -> {result.summary['final_eval_reward']:.2f}; "
          f"model: {result.model_path}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
