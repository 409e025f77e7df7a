"""Console progress: levels, terminal vs pipe behaviour, and the trainer watcher over metrics.jsonl."""

import io
import re
import time

import pytest

from raydpo.observability import console
from raydpo.observability.watch import MetricsWatcher
from raydpo.train.relay import RunRelay

CONTROL = re.compile(r"[\r\x1b\x07\x08]")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_pipe_gets_whole_lines_throttled_per_stage_and_finals_always():
    out = io.StringIO()
    c = console.Console("normal", every_s=60, stream=out)
    for i in range(5):
        c.update("data", f"data: {i} rows")
    c.update("ref", "reference: 1 pair")
    c.update("data", "data: done", final=True)
    c.say("eval @ step 0")
    assert out.getvalue().splitlines() == ["[raydpo] data: 0 rows", "[raydpo] reference: 1 pair", "[raydpo] data: done",
                                           "[raydpo] eval @ step 0"]
    assert not CONTROL.search(out.getvalue())


def test_terminal_rewrites_one_status_line_and_ends_it_before_other_lines():
    out = Terminal()
    c = console.Console("normal", every_s=60, stream=out)
    c.update("train", "train: step 1/3")
    c.say("eval @ step 1")
    time.sleep(0.25)
    c.update("train", "train: step 3/3", final=True)
    text = out.getvalue()
    assert text == ("\r[raydpo] train: step 1/3\x1b[K" "\n[raydpo] eval @ step 1\n" "\r[raydpo] train: step 3/3\x1b[K\n")


def test_quiet_prints_nothing_and_verbose_prints_every_update():
    quiet, verbose = io.StringIO(), io.StringIO()
    for level, out in (("quiet", quiet), ("verbose", verbose)):
        c = console.Console(level, every_s=60, stream=out)
        for i in range(3):
            c.update("data", f"data: {i}")
        c.say("detail", level="verbose")
    assert quiet.getvalue() == ""
    assert verbose.getvalue().splitlines() == ["[raydpo] data: 0", "[raydpo] data: 1", "[raydpo] data: 2", "[raydpo] detail"]


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (12.4, "12s"), (185, "3m05s"), (7384, "2h03m")])
def test_duration(seconds, text):
    assert console.duration(seconds) == text


def test_eta_at_the_average_rate():
    assert console.eta(10, 100, 20.0) == "ETA 3m00s"  # 90 left at 0.5/s
    assert console.eta(0, 100, 5.0) == "ETA ?"


def _row(step, t, **extra):
    return {"step": step, "epoch": 0, "loss": 0.69 - step / 100, "rewards/accuracies": 0.5, "rewards/margins": 0.01,
            "rewards/chosen": 0.02, "rewards/rejected": 0.01, "logps/chosen": -10.0, "logps/rejected": -11.0,
            "learning_rate": 1e-3, "grad_norm": 1.5, "pairs_per_s": 8.0, "tokens_per_s": 900.0, "step_time_s": 2.0,
            "time": t, **extra}


def _watching(total: int, level: str = "normal"):
    """A relay (rank 0's side, as a plain object) and a watcher following it (the driver's side)."""
    relay, out = RunRelay(), io.StringIO()
    return relay, out, MetricsWatcher(relay.since, total_steps=total, out=console.Console(level, every_s=0, stream=out))


def test_watcher_shows_new_rows_with_eta_and_a_resumed_runs_rows_once():
    now = time.time()
    relay, out, w = _watching(10)
    relay.start([_row(1, now - 100)], step=1)  # a resumed run: step 1 is in the file already, not shown again
    relay.log(_row(2, now + 2))
    relay.log({"step": 2, "eval/loss": 0.6, "eval/rewards/accuracies": 0.75, "eval/rewards/margins": 0.1,
               "eval/pairs": 64, "time": now + 3})
    w.poll()
    lines = out.getvalue().splitlines()
    # Step 2 took 2 s (step_time_s): 8 steps left -> 16 s.
    assert lines == ["[raydpo] train: step 2/10 loss 0.6700 acc 0.500 8.0 pairs/s ETA 16s",
                     "[raydpo] eval @ step 2: loss 0.6000 acc 0.750 margin +0.1000 (64 pairs)"]
    relay.log(_row(4, now + 6))
    w.poll()
    w.poll()  # nothing new: nothing printed twice
    # Steps 2-4 from step 2's start (now) to now + 6: 2 s per step, 6 left -> 12 s.
    assert out.getvalue().splitlines()[2:] == ["[raydpo] train: step 4/10 loss 0.6500 acc 0.500 8.0 pairs/s ETA 12s"]
    assert [r["step"] for r in relay.outcome()["rows"]] == [1, 2, 2, 4]  # the file's rows, for the run's result


def test_watcher_verbose_line_has_every_metric():
    relay, out, w = _watching(1, "verbose")
    relay.log(_row(1, time.time()))
    w.poll()
    line = out.getvalue()
    for part in ("step 1/1", "margin +0.0100", "chosen +0.0200", "rejected +0.0100", "logps -10.00/-11.00", "lr 1.00e-03",
                 "grad_norm 1.500", "900 tokens/s", "ETA 0s"):
        assert part in line, part


def test_watcher_shows_the_steps_a_restarted_worker_group_logs_again():
    relay, out, w = _watching(4)
    t0 = time.time()
    relay.start([], step=0)
    for s in (1, 2, 3):
        relay.log(_row(s, t0 + s / 10))
    w.poll()
    # The attempt dies; Ray Train restarts the group from the checkpoint at step 2.
    relay.start([_row(s, t0 + s / 10) for s in (1, 2)], step=2)
    for s in (3, 4):
        relay.log(_row(s, t0 + 1 + s / 10))
    w.poll()
    steps = [int(re.search(r"step (\d)/4", line).group(1)) for line in out.getvalue().splitlines()]
    assert steps == [1, 2, 3, 3, 4]
    assert [r["step"] for r in relay.outcome()["rows"]] == [1, 2, 3, 4]


def test_rate_counts_from_the_first_update():
    rate = console.Rate("pairs", total=100)
    assert rate.suffix(10, now=50.0) == ""  # the first batch only marks the start (model loading left out)
    assert rate.suffix(30, now=52.0) == ", 10.0 pairs/s, ETA 7s"  # 20 pairs in 2 s; 70 left
    assert console.Rate("rows").suffix(5, now=1.0) == ""


def test_lines_ray_forwards_from_workers_end_a_status_line_first():
    import ray._private.worker as ray_worker

    out = Terminal()
    console.configure("normal", 10, stream=out)
    try:
        assert ray_worker.print_worker_logs.raydpo_guarded
        console.get().update("train", "train: step 1/9")
        ray_worker.print_worker_logs({"pid": 7, "ip": "a", "localhost": "a", "lines": ["deepspeed says hi"]}, out)
    finally:
        console.configure()
    assert out.getvalue().startswith("\r[raydpo] train: step 1/9\x1b[K\n")
    assert "(pid=7)" in out.getvalue() and out.getvalue().endswith(" deepspeed says hi\n")
