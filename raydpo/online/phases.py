"""One online round, phase by phase, and its metrics row.

Each phase is timed twice: ``seconds/<phase>`` is the driver's wall time, ``compute/<phase>`` the
time spent computing in the actors or workers; ``seconds/overhead`` is the round's wall time minus
all compute (what ``bench/online_rounds.py`` compares with the restart-per-round example).
"""

from __future__ import annotations

import time

import numpy as np

from raydpo import storage
from raydpo.config import Config, uses_reference
from raydpo.online.generate import Generator, resolve_backend
from raydpo.online.judge import Judge
from raydpo.online.pairs import choose_pairs, pair_table
from raydpo.online.pool import RestartingPool, actor_options
from raydpo.online.prompts import round_prompts

LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class JudgeFailures(RuntimeError):
    """More of a round's samples failed in the judge than ``online.judge.max_failed_fraction``."""


def append_rows(path: str, rows: list[dict]) -> None:
    """Append JSON lines (metrics rows, quarantine entries) to ``path`` (a local path or URI). The
    driver is the one writer of an online run's files: the trainers send their rows with each round."""
    import json

    from raydpo import storage

    if rows:
        storage.append_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))


def start_pools(cfg: Config, model_path: str, pad_id: int) -> dict:
    """The generator, judge and (for losses that read it) reference pools, started once per run."""
    from raydpo.data.stage import tokenize_settings
    from raydpo.models import pin
    from raydpo.online.reference import RoundReference

    g, j = cfg.online.generator, cfg.online.judge
    workers = storage.join(cfg.output.dir, "workers")
    generator = RestartingPool(
        Generator, {"model_path": model_path, "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code,
                    "backend": resolve_backend(g.backend), "max_length": cfg.data.max_length, "threads": max(1, int(g.num_cpus_per_actor)),
                    "gpu_memory_utilization": g.vllm_gpu_memory_utilization, "workers_dir": workers},
        g.num_actors, actor_options(g.num_cpus_per_actor, g.num_gpus_per_actor, g.resources, g.accelerator_type), g.max_restarts,
        "generator pool")
    judge = RestartingPool(
        Judge, {"reward_fn": j.reward_fn, "reward_model": pin(j.reward_model) if j.reward_model else None,
                "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code, "max_length": cfg.data.max_length,
                "threads": max(1, int(j.num_cpus_per_actor)), "workers_dir": workers},
        j.num_actors, actor_options(j.num_cpus_per_actor, j.num_gpus_per_actor, j.resources, j.accelerator_type), j.max_restarts,
        "judge pool")
    reference = RoundReference(cfg, pad_id, tokenize_settings(cfg).__dict__) if uses_reference(cfg) else None
    return {"generator": generator, "judge": judge, "reference": reference}


def stop_pools(pools: dict) -> None:
    for pool in pools.values():
        if pool is not None:
            pool.shutdown()


def sync(pools: dict, weights, queue, trainer) -> None:
    """Load ``weights`` (an object ref of the full state dict) on every generator. The pool keeps
    no ref: a generator that replaces a dead one gets the trainer's current weights, asked of the
    idle workers through the round queue."""
    pools["generator"].set_state("load_weights", weights, replay=lambda: (trainer.wait(queue.weights.remote())[0],))


def sample(pool, prompts: list, n: int, g, seed: int, greedy: bool) -> dict:
    """``n`` completions of every prompt on the generator pool, in prompt order."""
    params = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k, "greedy": greedy}
    batches = [prompts[i:i + g.batch_size] for i in range(0, len(prompts), g.batch_size)]
    outs = pool.map("generate", [([p.ids for p in b], n, params, seed + k) for k, b in enumerate(batches)])
    return {"ids": [c for o in outs for c in o["ids"]], "texts": [c for o in outs for c in o["texts"]],
            "tokens": sum(o["tokens"] for o in outs), "compute": sum(o["seconds"] for o in outs)}


def judge(pool, values: list, texts: list[list[str]], batch_size: int) -> dict:
    """Rewards ([P][K], None where the judge failed) and reasons of every sample."""
    flat = [(v, t) for v, ts in zip(values, texts) for t in ts]
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    outs = pool.map("score", [([v for v, _ in b], [t for _, t in b]) for b in batches])
    rewards = [x for o in outs for x in o["rewards"]]
    reasons = [x for o in outs for x in o["reasons"]]
    k = len(texts[0]) if texts else 0
    return {"rewards": [rewards[i:i + k] for i in range(0, len(rewards), k)],
            "reasons": [reasons[i:i + k] for i in range(0, len(reasons), k)], "compute": sum(o["seconds"] for o in outs)}


def held_out(cfg: Config, prompts: list, pools: dict, round_: int) -> dict:
    """Mean reward of one greedy (or fixed-seed) completion per held-out prompt, current weights."""
    if not prompts:
        return {}
    o = cfg.online
    gen = sample(pools["generator"], prompts, 1, o.generator, seed=cfg.train.seed, greedy=o.eval_greedy)
    judged = judge(pools["judge"], [p.value for p in prompts], gen["texts"], o.judge.batch_size)
    values = [r[0] for r in judged["rewards"] if r[0] is not None]
    return {"eval/reward_mean": float(np.mean(values)) if values else None, "eval/prompts": len(prompts),
            "eval/judge_failures": len(prompts) - len(values), "compute/eval": gen["compute"] + judged["compute"]}


def split_rows(table, workers: int) -> tuple[list[dict], int]:
    """The scored pairs as ``workers`` equal contiguous numpy parts (as ``raydpo.train.batches.load_rows``
    gives), and how many trailing pairs the equal split leaves out."""
    per = table.num_rows // workers
    cols = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids", *LOGP_COLUMNS) if c in table.column_names]
    parts = []
    for w in range(workers):
        part = table.slice(w * per, per)
        parts.append({c: (np.array([np.asarray(x, np.int32) for x in part[c].to_pylist()] + [None], dtype=object)[:-1]
                          if c.endswith("_ids") else part[c].to_numpy().astype(np.float32)) for c in cols})
    return parts, table.num_rows - per * workers


def generate_and_judge(cfg: Config, r: int, sets, pools: dict, paths: dict, row: dict) -> tuple[list, dict, dict]:
    """Round ``r``'s prompts, K samples each and their rewards; the judge's failures quarantined
    (too many stop the run: :class:`JudgeFailures`). Fills ``row``; returns (prompts, samples, judged)."""
    o, t = cfg.online, cfg.train
    clock = time.perf_counter()
    prompts = round_prompts(sets.train, o.prompts_per_round, t.seed, r)
    gen = sample(pools["generator"], prompts, o.generator.samples_per_prompt, o.generator, seed=t.seed * 100_003 + r * 1000, greedy=False)
    row["seconds/generate"], row["compute/generate"] = time.perf_counter() - clock, gen["compute"]
    row["gen_tokens"], row["gen_tokens_per_s"] = gen["tokens"], gen["tokens"] / max(row["seconds/generate"], 1e-9)

    clock = time.perf_counter()
    judged = judge(pools["judge"], [p.value for p in prompts], gen["texts"], o.judge.batch_size)
    row["seconds/judge"], row["compute/judge"] = time.perf_counter() - clock, judged["compute"]
    bad = [{"stage": "judge", "round": r, "reason": why, "prompt": p.value, "completion": text}
           for p, texts, whys in zip(prompts, gen["texts"], judged["reasons"]) for text, why in zip(texts, whys) if why]
    append_rows(paths["quarantine"], bad)
    samples = sum(map(len, gen["texts"]))
    row |= {"samples": samples, "judge_failures": len(bad)}
    if len(bad) > o.judge.max_failed_fraction * samples:
        raise JudgeFailures(f"round {r}: the judge failed on {len(bad)} of {samples} samples (more than "
                            f"online.judge.max_failed_fraction={o.judge.max_failed_fraction}), e.g. {bad[0]['reason']}; "
                            f"see {paths['quarantine']}")
    valid = [x for rs in judged["rewards"] for x in rs if x is not None]
    row |= {"reward/mean": float(np.mean(valid)), "reward/max": float(np.max(valid)), "reward/min": float(np.min(valid))} if valid else {}
    return prompts, gen, judged


def scored_pairs(cfg: Config, prompts: list, gen: dict, judged: dict, pools: dict, row: dict):
    """The round's pairs (``online.judge.pairing``) with the reference's log-probs; fills ``row``."""
    rows, gaps, ties = [], [], 0
    for p, ids, texts, rewards in zip(prompts, gen["ids"], gen["texts"], judged["rewards"]):
        chosen_pairs, tied = choose_pairs(ids, rewards, cfg.online.judge.pairing, cfg.online.judge.margin)
        ties += tied
        for a, b in chosen_pairs:
            rows.append({"prompt": p.value, "prompt_ids": p.ids, "chosen": texts[a], "chosen_ids": ids[a],
                         "rejected": texts[b], "rejected_ids": ids[b]})
            gaps.append(rewards[a] - rewards[b])
    row |= {"pairs": len(rows), "ties": ties, "reward/gap": float(np.mean(gaps)) if gaps else None}
    table = pair_table(rows)
    clock = time.perf_counter()
    row["compute/reference"], row["reference_cache_hit"] = 0.0, None
    if pools["reference"] is not None and rows:
        table, row["reference_cache_hit"], row["compute/reference"] = pools["reference"].score(table)
    row["seconds/reference"] = time.perf_counter() - clock
    return table


def train_on(cfg: Config, r: int, table, queue, trainer, row: dict) -> tuple[dict, dict]:
    """Hand round ``r``'s pairs to the trainer workers and wait for their result; fills ``row``;
    returns (the job, the result)."""
    import ray

    o, t = cfg.online, cfg.train
    clock = time.perf_counter()
    parts, left_out = split_rows(table, t.num_workers)
    per, need = table.num_rows // t.num_workers, t.micro_batch_size * t.gradient_accumulation_steps
    steps = 0 if per < need else (o.steps_per_round or per // need * o.epochs_per_round)
    last = r == o.rounds - 1
    job = {"splits": [ray.put(part) for part in parts] if steps else [], "steps": steps,
           "sync": last or (r + 1) % o.sync_every == 0, "checkpoint": last or (r + 1) % o.checkpoint_every == 0}
    ray.get(queue.put_job.remote(r, job))
    result = trainer.wait(queue.result.remote(r))
    row["seconds/train"] = time.perf_counter() - clock
    row |= {"steps": result["steps"], "step": result["step"], "pairs_split": per * t.num_workers if steps else 0,
            "pairs_left_out": left_out if steps else table.num_rows, "trainer_pids": result["pids"],
            "compute/train": result["train_s"], **{f"train/{k}": v for k, v in result["metrics"].items()},
            **{k: v for k, v in result.items() if k.startswith("guard/")}}
    return job, result


def one_round(cfg: Config, r: int, sets, pools: dict, queue, trainer, pad_id: int, paths: dict) -> tuple[dict, list[dict], object]:
    """Run round ``r`` end to end; returns its metrics row, the training steps' rows (both
    appended to ``metrics.jsonl`` by the caller; quarantined samples appended to their file) and the
    object ref of the weights synced to the generators at its end (None: no sync this round). The
    ref is the caller's only copy: dropping it frees the weights in the object store."""
    start = time.perf_counter()
    row: dict = {"round": r, "kind": "round"}
    row |= held_out(cfg, sets.eval, pools, r)
    row["seconds/eval"] = time.perf_counter() - start
    prompts, gen, judged = generate_and_judge(cfg, r, sets, pools, paths, row)
    table = scored_pairs(cfg, prompts, gen, judged, pools, row)
    job, result = train_on(cfg, r, table, queue, trainer, row)

    clock = time.perf_counter()
    weights = result.pop("weights")[0]
    if weights is not None:
        sync(pools, weights, queue, trainer)
    row["seconds/sync"] = time.perf_counter() - clock + result["gather_s"]
    row["synced"], row["checkpointed"] = weights is not None, job["checkpoint"]
    row["seconds/round"] = time.perf_counter() - start
    row["seconds/overhead"] = row["seconds/round"] - sum(row[k] for k in ("compute/eval", "compute/generate", "compute/judge",
                                                                          "compute/reference", "compute/train") if k in row)
    row["restarts"] = {name: pool.restarts if hasattr(pool, "restarts") else pool.pool.restarts
                       for name, pool in pools.items() if pool is not None}
    row["time"] = time.time()
    return row, result.get("step_rows", []), weights


def describe(row: dict, rounds: int) -> str:
    """The console line of one round."""

    def num(key, fmt=".2f"):
        v = row.get(key)
        return "-" if v is None else format(v, fmt)

    phases = " ".join(f"{p} {row[f'seconds/{p}']:.1f}s" for p in ("generate", "judge", "reference", "train", "sync"))
    held = f"; held-out reward {num('eval/reward_mean')}" if "eval/reward_mean" in row else ""
    note = "" if row["steps"] else " (too few pairs to fill a step: no training this round)"
    return (f"online round {row['round'] + 1}/{rounds}: sample reward mean {num('reward/mean')} max {num('reward/max')}, "
            f"gap {num('reward/gap')}; {row['pairs']} pairs, {row['ties']} ties, {row['judge_failures']} judge failures{held}; "
            f"{row['steps']} steps loss {num('train/loss', '.4f')}{note}; {row['gen_tokens_per_s']:.0f} gen tok/s; {phases}")


def summarize(rounds: list[dict], final: dict, prompt_counts: dict, paths: dict, status: str, seconds: float) -> dict:
    """summary.json of an online run (sample and pair counts add up: see the field names)."""
    total = lambda key: sum(r.get(key) or 0 for r in rounds)  # noqa: E731
    first = rounds[0].get("eval/reward_mean") if rounds else None
    return {
        "rounds": len(rounds),
        "steps": rounds[-1]["step"] if rounds else 0,
        "prompts": prompt_counts,
        "samples": total("samples"),
        "samples_judged": total("samples") - total("judge_failures"),
        "judge_failures": total("judge_failures"),
        "pairs": total("pairs"),
        "pairs_split": total("pairs_split"),
        "pairs_left_out": total("pairs_left_out"),
        "ties": total("ties"),
        "initial_eval_reward": first,
        "final_eval_reward": final.get("eval/reward_mean"),
        "quarantine_file": paths["quarantine"],
        "model_dir": paths["model"],
        "timings_s": {"total": round(seconds, 3), **{p: round(total(f"seconds/{p}"), 3)
                                                    for p in ("eval", "generate", "judge", "reference", "train", "sync", "overhead")}},
        "start": status,
        "finished": True,
    }
