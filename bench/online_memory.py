"""Ray's object store over many synced rounds of ``raydpo online``: flat, or one state dict per sync.

Every round syncs (``online.sync_every: 1``); after each round the driver reads the object store's
bytes in use on every node (``ray memory --stats-only``'s numbers) and the policy's state dict size.
A run that keeps each sync's weights ref grows by one state dict per round; a flat one holds at most
the latest sync's.

    .venv/bin/python bench/online_memory.py [--rounds 20] [--tree DIR] [--out FILE.json]

``--tree``: run another checkout's raydpo (its package first on PYTHONPATH, here and in the Ray
workers), the same rounds on the same model and prompts: the before/after of a change. The tiny
model and the synthetic task are built with this checkout's fixtures either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def raw_config(model: str, data: str, work: str, rounds: int, reward_fn: str) -> dict:
    return {
        "model": {"name_or_path": model},
        "reference": {"cache_dir": os.path.join(work, "cache"), "batch_size": 32},
        "data": {"train": os.path.join(data, "train.jsonl"), "max_length": 48, "num_workers": 1},
        "loss": {"beta": 0.1},
        "train": {"num_workers": 1, "micro_batch_size": 8, "learning_rate": 1e-3, "seed": 0},
        "online": {"rounds": rounds, "prompts_per_round": 16, "steps_per_round": 2, "eval_prompts": 0, "sync_every": 1,
                   "checkpoint_every": rounds,
                   "generator": {"samples_per_prompt": 4, "max_new_tokens": 8, "batch_size": 32},
                   "judge": {"reward_fn": reward_fn}},
        "output": {"dir": os.path.join(work, "online")},
    }


def measure(config_path: str, out_path: str) -> None:
    """In the child process (the tree's raydpo first on sys.path): run and record the store per round."""
    import ray

    import raydpo
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    def store() -> dict:
        s = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
        return {"bytes_used": int(s.object_store_bytes_used), "objects": int(s.num_local_objects),
                "bytes_spilled": int(s.spilled_bytes_total)}

    rows = []

    def on_round(row, pools):
        rows.append({"round": row["round"], **store(), "synced": row["synced"]})

    ray.init(num_cpus=4, logging_level="WARNING")
    with open(config_path) as f:
        raw = json.load(f)
    result = raydpo.run_online(raydpo.config.from_dict(raw), on_round=on_round)
    weights = ray.get(pools_weights(result))
    with open(out_path, "w") as f:
        json.dump({"rounds": rows, "state_dict_bytes": weights, "raydpo": os.path.dirname(raydpo.__file__)}, f)


def pools_weights(result):
    """Bytes of the exported policy's tensors (the synced state dict's size), read in a Ray task."""
    import ray

    @ray.remote
    def size(path: str) -> int:
        from safetensors import safe_open

        total = 0
        for name in os.listdir(path):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(path, name), "pt") as f:
                    for key in f.keys():
                        t = f.get_tensor(key)
                        total += t.numel() * t.element_size()
        return total

    return size.remote(result.model_path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tree", help="a raydpo checkout to run instead of this one")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return measure(*args.child)
    sys.path.insert(0, ROOT)
    from raydpo.fixtures.synthetic import write_task
    from raydpo.fixtures.tiny import write_tiny_model

    tree = os.path.abspath(args.tree) if args.tree else ROOT
    with tempfile.TemporaryDirectory(prefix="raydpo-online-memory-") as work:
        model = write_tiny_model(os.path.join(work, "model"))
        data = os.path.join(work, "data")
        write_task(data)
        # An older tree names the reward by its older module path.
        reward = ("raydpo.fixtures.synthetic:count_on_reward" if os.path.exists(os.path.join(tree, "raydpo", "fixtures"))
                  else "raydpo.synthetic:count_on_reward")
        config = os.path.join(work, "config.json")
        with open(config, "w") as f:
            json.dump(raw_config(model, data, work, args.rounds, reward), f)
        figures = os.path.join(work, "figures.json")
        env = dict(os.environ, PYTHONPATH=tree, RAY_AUTH_MODE="disabled")
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, figures], env=env, check=True, cwd=work)
        with open(figures) as f:
            out = json.load(f)
    used = [r["bytes_used"] for r in out["rounds"]]
    state = out["state_dict_bytes"]
    out |= {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
            "seconds": round(time.perf_counter() - start, 1), "tree": tree,
            "growth_bytes_first_to_last": used[-1] - used[0], "growth_state_dicts": round((used[-1] - used[0]) / state, 2),
            "peak_state_dicts": round(max(used) / state, 2)}
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}, indent=1))
    print("store MB per round:", [round(u / 2**20, 1) for u in used])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
