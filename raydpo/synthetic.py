"""A learnable synthetic preference task, generated deterministically from a seed.

The words of ``WORDS`` stand in a fixed cyclic order. Each prompt names a start word and asks to
count on from it; the chosen completion gives the next 3-5 words in that order, the rejected one
breaks the order once (one word replaced by a wrong one, or two neighbours swapped). A tiny
model picks up the successor rule within a few dozen DPO steps, so the eval reward accuracy
climbs from chance to above 0.9 while the loss falls from ln 2.
"""

from __future__ import annotations

import json
import os
import random

WORDS = (
    "apple tiger river cloud stone piano garden rocket lemon forest candle silver "
    "window dragon orange meadow castle pencil thunder velvet island copper falcon maple"
).split()


def make_pair(rng: random.Random, min_words: int = 3, max_words: int = 5) -> dict[str, str]:
    """One ``{prompt, chosen, rejected}`` row; chosen follows the rule, rejected breaks it."""
    start = rng.randrange(len(WORDS))
    good = [WORDS[(start + 1 + i) % len(WORDS)] for i in range(rng.randint(min_words, max_words))]
    bad = list(good)
    i = rng.randrange(len(bad) - 1)
    if rng.random() < 0.5:
        bad[i] = rng.choice([w for w in WORDS if w != good[i]])  # a wrong word
    else:
        bad[i], bad[i + 1] = bad[i + 1], bad[i]  # right words, wrong order
    return {"prompt": f"Count on from {WORDS[start]}:", "chosen": " " + " ".join(good), "rejected": " " + " ".join(bad)}


def count_on_reward(prompt: str, completion: str) -> float:
    """The task's reward for online DPO (``online.judge.reward_fn: raydpo.synthetic:count_on_reward``):
    10 per word that continues the count from the prompt's start word (up to the first mistake),
    1 per other task word, minus a little per character. Graded, so even an untrained policy's
    samples rank."""
    start = WORDS.index(prompt.split()[-1].rstrip(":"))
    words = completion.split()
    correct = 0
    for i, word in enumerate(words):
        if word != WORDS[(start + 1 + i) % len(WORDS)]:
            break
        correct += 1
    return 10 * correct + sum(w in WORDS for w in words[correct:]) - 0.01 * len(completion)


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` pairs from a seeded generator: the same seed gives the same rows on every machine."""
    rng = random.Random(seed)
    return [make_pair(rng) for _ in range(n)]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_task(out_dir: str | os.PathLike, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[str, str]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; no eval pair also appears in train."""
    train_rows = make_pairs(n_train, seed)
    seen = {json.dumps(r, sort_keys=True) for r in train_rows}
    rng = random.Random(seed + 1_000_003)
    eval_rows: list[dict] = []
    while len(eval_rows) < n_eval:
        row = make_pair(rng)
        if json.dumps(row, sort_keys=True) not in seen:
            eval_rows.append(row)
    train = write_jsonl(train_rows, os.path.join(out_dir, "train.jsonl"))
    return train, write_jsonl(eval_rows, os.path.join(out_dir, "eval.jsonl"))
