"""raydpo online: rounds of generate -> judge -> reference -> train -> sync on real Ray, real
DeepSpeed and the tiny model, with one long-lived Ray Train worker group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml


ONLINE = {"rounds": 3, "prompts_per_round": 64, "steps_per_round": 16, "eval_prompts": 24,
          "generator": {"samples_per_prompt": 8, "max_new_tokens": 8, "batch_size": 32},
          "judge": {"reward_fn": "raydpo.fixtures.synthetic:count_on_reward"}}


def online_raw(tiny_model_dir, synthetic_dir, tmp_path, workers: int = 2, **online) -> dict:
    """The plain config of an online run on the synthetic task (``online`` overrides merged in).
    ``workers``: trainers; 1 where the test is not about data parallelism (each one more costs a
    process start and a DeepSpeed set-up)."""
    section = {**ONLINE, **{k: v for k, v in online.items() if k not in ("generator", "judge")}}
    section["generator"] = {**ONLINE["generator"], **online.get("generator", {})}
    section["judge"] = {**ONLINE["judge"], **online.get("judge", {})}
    return {
        "model": {"name_or_path": tiny_model_dir},
        "reference": {"cache_dir": str(tmp_path / "cache"), "batch_size": 32},
        "data": {"train": os.path.join(synthetic_dir, "train.jsonl"), "eval": os.path.join(synthetic_dir, "eval.jsonl"), "max_length": 48},
        "loss": {"beta": 0.1},
        "train": {"num_workers": workers, "micro_batch_size": 8, "learning_rate": 0.003, "seed": 0},
        "online": section,
        "output": {"dir": str(tmp_path / "run")},
    }


def online_config(tiny_model_dir, synthetic_dir, tmp_path, workers: int = 2, **online):
    from raydpo.config import from_dict

    return from_dict(online_raw(tiny_model_dir, synthetic_dir, tmp_path, workers, **online))


@pytest.fixture(scope="module")
def online_run(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path_factory):
    """One 3-round run shared by the checks below; the generator's weights are read after the last sync."""
    import ray

    from raydpo.online.run import run_online

    from raydpo.config import from_dict

    raw = online_raw(tiny_model_dir, synthetic_dir, tmp_path_factory.mktemp("online"))
    cfg = from_dict(raw | {"logging": {"backends": ["tensorboard"]}})
    seen = {}

    def weights(actor) -> dict:
        # Copies: tensors read from the object store would otherwise keep their object pinned there.
        return {k: v.clone() for k, v in ray.get(actor.weights.remote()).items()}

    def on_round(row, pools):
        from raydpo.observability.store import object_store_stats

        seen.setdefault("store", []).append(object_store_stats())  # before this callback reads anything
        generators = pools["generator"]
        if row["round"] == 0:
            seen["initial_pids"] = ray.get(generators.actors[0].pid.remote())
        if row["round"] == 1:  # a generator dies after a sync: its replacement asks the trainer for the weights
            seen["before_kill"] = weights(generators.actors[0])
            os.kill(seen["initial_pids"], signal.SIGKILL)
            seen["replaced_pid"] = generators.map("pid", [()])[0]
            seen["replacement"] = weights(generators.actors[0])
        if row["round"] == cfg.online.rounds - 1:
            seen["weights"] = weights(generators.actors[0])

    result = run_online(cfg, on_round=on_round)
    return result, seen, cfg


def test_held_out_reward_climbs_over_rounds(online_run):
    result, _, cfg = online_run
    rounds = [r for r in result.rounds if r["kind"] == "round"]
    final = result.rounds[-1]
    assert [r["round"] for r in rounds] == [0, 1, 2] and final["kind"] == "final" and final["round"] == 3
    start, end = rounds[0]["eval/reward_mean"], final["eval/reward_mean"]
    # Untrained, the tiny model's greedy answers earn about 0 (no task word); 10 per correct word.
    assert end > start + 3.0, [r.get("eval/reward_mean") for r in result.rounds]
    for r in rounds:
        assert r["steps"] == cfg.online.steps_per_round and r["synced"]
        assert r["pairs"] + r["ties"] <= cfg.online.prompts_per_round and r["pairs"] > 0
        assert r["reward/max"] >= r["reward/mean"] >= r["reward/min"] and r["reward/gap"] > 0
        assert r["gen_tokens_per_s"] > 0 and r["samples"] == 64 * 8
        for phase in ("eval", "generate", "judge", "reference", "train", "sync", "round"):
            assert r[f"seconds/{phase}"] >= 0, phase
        assert 0 < r["compute/train"] <= r["seconds/train"] and r["seconds/overhead"] < r["seconds/round"]


def test_trainer_workers_live_through_every_round(online_run):
    result, _, _ = online_run
    rounds = [r for r in result.rounds if r["kind"] == "round"]
    pids = {tuple(r["trainer_pids"]) for r in rounds}
    assert len(pids) == 1 and len(set(next(iter(pids)))) == 2, [r["trainer_pids"] for r in rounds]
    with open(os.path.join(result.output_dir, "workers", "rank0.json")) as f:
        assert json.load(f)["pid"] in next(iter(pids))
    # One engine for the whole run: the optimizer steps count on across rounds, no restart from 1.
    with open(os.path.join(result.output_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert [s["step"] for s in steps] == list(range(1, 49)) and [s["round"] for s in steps[::16]] == [0, 1, 2]


def test_generator_weights_equal_the_trainers_after_sync(online_run, tiny_model_dir):
    from safetensors.torch import load_file

    from raydpo.train.weights import max_difference

    result, seen, _ = online_run
    trained = load_file(os.path.join(result.model_path, "model.safetensors"))  # exported by the trainer's rank 0
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    generator = {k: v for k, v in seen["weights"].items() if k in trained}
    assert set(generator) == set(trained)
    assert max_difference(generator, trained) <= 1e-6
    assert max_difference(initial, trained) > 1e-3  # training moved the weights: the check can fail


def test_a_generator_that_joins_late_gets_the_trainers_weights_and_the_store_stays_flat(online_run, tiny_model_dir):
    """The pool keeps no weights ref after a sync: a replacement generator gets the trainer's current
    weights (gathered on request by the idle workers), and the object store holds at most the latest
    sync's state dict (when Ray frees it after every generator loaded it is Ray's timing)."""
    from safetensors.torch import load_file

    from raydpo.train.weights import max_difference

    result, seen, _ = online_run
    assert seen["replaced_pid"] != seen["initial_pids"]
    assert max_difference(seen["replacement"], seen["before_kill"]) == 0.0
    assert max_difference(seen["before_kill"], load_file(os.path.join(tiny_model_dir, "model.safetensors"))) > 1e-3
    rounds = [r for r in result.rounds if r["kind"] == "round"]
    assert [r["restarts"]["generator"] for r in rounds] == [0, 0, 1]
    state_bytes = sum(v.numel() * v.element_size() for v in seen["before_kill"].values())
    used = [s["bytes_used"] for s in seen["store"]]
    # Three synced rounds (and a weights request): a leak would add a state dict per sync, so the
    # store would hold three by the last round, two more than its lowest reading.
    assert max(used) < min(used) + 1.5 * state_bytes, (used, state_bytes)


def test_summary_counts_add_up_and_report_plots_rounds(online_run, tmp_path):
    from raydpo.observability.report import write_report

    result, _, _ = online_run
    s = result.summary
    assert s["finished"] and s["rounds"] == 3 and s["steps"] == 48
    assert s["samples"] == s["samples_judged"] + s["judge_failures"] == 3 * 64 * 8
    assert s["pairs"] == s["pairs_split"] + s["pairs_left_out"]
    p = s["prompts"]
    assert p["rows_read"] == p["rows_used"] + p["rows_quarantined"]
    assert p["distinct"] == p["train"] + p["eval"] + p["eval_unused"] + sum(p["filtered"].values())
    assert s["initial_eval_reward"] < s["final_eval_reward"]
    html = write_report([result.output_dir], str(tmp_path / "report"))
    assert os.path.exists(tmp_path / "report" / "online_rewards.png") and "online_rewards.png" in open(html).read()


def test_trackers_get_the_steps_and_the_rounds(online_run):
    """The driver feeds the trackers: every training step and every round's numbers, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, _ = online_run
    tb = EventAccumulator(os.path.join(result.output_dir, "tensorboard"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {"loss", "reward/mean", "reward/gap", "eval/reward_mean", "seconds/overhead", "pairs"} <= tags
    assert [e.step for e in tb.Scalars("loss")] == list(range(1, 49))
    assert [e.step for e in tb.Scalars("reward/mean")] == [16, 32, 48]
    held = tb.Scalars("eval/reward_mean")  # the weights' step: round starts, then the end
    assert [e.step for e in held] == [0, 16, 32, 48]
    assert [round(e.value, 4) for e in held] == [round(r["eval/reward_mean"], 4) for r in result.rounds]


def test_a_reward_model_directory_judges(ray_cluster, tiny_model_dir, synthetic_dir, tokenizer, tmp_path):
    from raydpo.online.run import run_online
    from raydpo.fixtures.tiny import write_tiny_reward_model

    rm = write_tiny_reward_model(tmp_path / "rm", tokenizer=tokenizer)
    cfg = online_config(tiny_model_dir, synthetic_dir, tmp_path, workers=1, rounds=1, prompts_per_round=16, steps_per_round=1,
                        eval_prompts=4, judge={"reward_fn": None, "reward_model": rm})
    result = run_online(cfg)
    row = result.rounds[0]
    # A random head gives distinct real-valued scores: every prompt makes its best-vs-worst pair.
    assert row["pairs"] == 16 and row["ties"] == 0 and row["judge_failures"] == 0 and row["steps"] == 1
    assert isinstance(row["reward/mean"], float) and row["reward/max"] > row["reward/min"]


def test_judge_failures_are_quarantined_and_a_round_without_pairs_goes_on(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    from raydpo.online.phases import JudgeFailures
    from raydpo.online.run import run_online

    cfg = online_config(tiny_model_dir, synthetic_dir, tmp_path, workers=1, rounds=2, prompts_per_round=16, steps_per_round=1,
                        eval_prompts=0, judge={"reward_fn": "online_rewards:flaky", "max_failed_fraction": 0.5})
    result = run_online(cfg)
    rounds = [r for r in result.rounds if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:  # every valid sample scores 0.0: all tie, no pair, no training, and the run goes on
        assert r["pairs"] == 0 and r["steps"] == 0 and r["ties"] == 16 and 0 < r["judge_failures"] < r["samples"]
    with open(os.path.join(result.output_dir, "quarantine.jsonl")) as f:
        bad = [json.loads(line) for line in f]
    assert len(bad) == sum(r["judge_failures"] for r in rounds)
    reasons = {b["reason"].split(":")[0] for b in bad}
    assert reasons == {"judge_error", "judge_not_a_number"}
    assert all(b["stage"] == "judge" and b["prompt"].startswith("Count on from") and "completion" in b for b in bad)

    strict = online_config(tiny_model_dir, synthetic_dir, tmp_path / "strict", workers=1, rounds=2, prompts_per_round=16,
                           steps_per_round=1, eval_prompts=0, judge={"reward_fn": "online_rewards:flaky", "max_failed_fraction": 0.05})
    with pytest.raises(JudgeFailures, match="max_failed_fraction"):
        run_online(strict)


@pytest.mark.parametrize("judge, expect", [
    ({"reward_fn": "no_such_module:score"}, "cannot be imported"),
    ({"reward_fn": "raydpo.fixtures.synthetic:no_such_function"}, "has no attribute"),
    ({"reward_fn": None, "reward_model": "TINY"}, "not a sequence classifier"),
    ({"reward_fn": None}, "set exactly one of reward_fn"),
])
def test_bad_judges_stop_before_any_stage(tiny_model_dir, synthetic_dir, tmp_path, capsys, judge, expect):
    from raydpo.cli import main

    judge = {k: (tiny_model_dir if v == "TINY" else v) for k, v in judge.items()}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(online_raw(tiny_model_dir, synthetic_dir, tmp_path, judge=judge)))
    assert main(["online", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not os.path.exists(tmp_path / "run" / "ray_train")  # nothing started


def test_killed_driver_resumes_at_the_next_round(ray_cluster, tiny_model_dir, synthetic_dir, tmp_path):
    """``raydpo online`` killed with SIGKILL between rounds; the same command resumes after the
    last checkpointed round with new trainer processes, and finishes every round once."""
    raw = online_raw(tiny_model_dir, synthetic_dir, tmp_path, workers=1, rounds=4, prompts_per_round=32, steps_per_round=2,
                     eval_prompts=4, judge={"reward_fn": "online_rewards:slow_count_on"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "raydpo", "online", str(path), f"ray.address={address}"]
    state = tmp_path / "run" / "online_state.json"
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            if state.exists() and json.loads(state.read_text())["rounds_done"] >= 1:
                break
            time.sleep(0.1)
        assert driver.poll() is None, "the run ended before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    killed_after = json.loads(state.read_text())["rounds_done"]
    assert killed_after < 4
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after round" in again.stdout
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    rounds = [r for r in rows if r.get("kind") == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    first, resumed = rounds[0]["trainer_pids"], rounds[-1]["trainer_pids"]
    assert set(first).isdisjoint(resumed)  # the second command's workers trained the later rounds
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 9))  # each step once: rows past the checkpoint were dropped and redone
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["rounds"] == 4 and summary["start"] == "resume"


def test_a_dead_generator_is_replaced_and_gets_the_current_weights(ray_cluster, tiny_model_dir, tokenizer):
    """A generator killed by its pid: the pool starts a new one, replays the latest weights into it
    and retries the batch there (Ray's own restart would bring back the initial weights)."""
    import ray

    from raydpo.online.generate import Generator
    from raydpo.online.pool import RestartingPool, actor_options
    from raydpo.train.weights import max_difference

    pool = RestartingPool(Generator, {"model_path": tiny_model_dir, "dtype": "float32", "trust_remote_code": False, "backend": "hf",
                                      "max_length": 32}, 1, actor_options(1, 0, {}, None), 2, "generator pool")
    try:
        changed = {k: v + 0.01 for k, v in ray.get(pool.actors[0].weights.remote()).items()}
        pool.set_state("load_weights", ray.put(changed))
        os.kill(ray.get(pool.actors[0].pid.remote()), signal.SIGKILL)
        params = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "greedy": False}
        prompt = tokenizer("Count on from apple:")["input_ids"]
        (out,) = pool.map("generate", [([prompt], 3, params, 0)])
        assert pool.restarts == 1 and len(out["ids"][0]) == 3 and all(1 <= len(c) <= 4 for c in out["ids"][0])
        assert max_difference(ray.get(pool.actors[0].weights.remote()), changed) == 0.0
    finally:
        pool.shutdown()
