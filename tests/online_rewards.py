"""Reward functions for the online tests, imported by the judge actors as ``online_rewards:<name>``
(conftest puts tests/ on the Ray workers' PYTHONPATH)."""

import time
import zlib

from raydpo.fixtures.synthetic import count_on_reward


def flaky(prompt: str, completion: str):
    """Fails on about one sample in ten, returns a non-number on another tenth, else 0.0 for all (every
    valid sample ties: no pairs)."""
    bucket = zlib.crc32(completion.encode()) % 10
    if bucket == 0:
        raise RuntimeError("the grader fell over")
    if bucket == 1:
        return "not a number"
    return 0.0


def slow_count_on(prompt: str, completion: str) -> float:
    """The task's reward, a little slowly (so a test can kill a run between rounds)."""
    time.sleep(0.003)
    return count_on_reward(prompt, completion)
