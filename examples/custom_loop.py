# Run: .venv/bin/python examples/custom_loop.py [--pretrain-steps 40] [--dpo-steps 60]
"""DPO in your own training loop: no Ray, no DeepSpeed, no config file.

1. Build a tiny Llama and its tokenizer in-process and pretrain it for a few steps on the synthetic
   task's text (prompts followed by good and bad completions alike, so it learns the format but not
   which completion is preferred).
2. Wrap it in ``raydpo.DPO``: a frozen copy becomes the reference; ``dpo.parameters()`` is the policy's.
3. Train on the synthetic preference pairs in a plain PyTorch loop, and watch the reward accuracy on
   held-out pairs rise from 0 (every reward is 0 before the first update) towards 1.
"""

from __future__ import annotations

import argparse
import random

import torch

import raydpo
from raydpo.fixtures.synthetic import make_pairs
from raydpo.fixtures.tiny import TinyModelSpec, build_model, build_tokenizer


def encode(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows of {prompt, chosen, rejected} -> right-padded chosen [B, Tc] and rejected [B, Tr]
    sequences (BOS + prompt + completion + EOS) and the prompt lengths [B]."""
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]  # starts with BOS
    eos = [tokenizer.eos_token_id]

    def padded(key: str) -> torch.Tensor:
        seqs = [p + tokenizer(r[key], add_special_tokens=False)["input_ids"] + eos for p, r in zip(prompts, rows)]
        width = max(map(len, seqs))
        return torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])

    return {"chosen_ids": padded("chosen"), "rejected_ids": padded("rejected"),
            "prompt_lengths": torch.tensor([len(p) for p in prompts])}


def pretrain(model, tokenizer, rows: list[dict], steps: int, batch_size: int, lr: float) -> float:
    """Next-token training on prompt + completion texts (both completions); returns the last loss."""
    texts = [r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        enc = tokenizer(rng.sample(texts, batch_size), return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


@torch.no_grad()
def evaluate(dpo: raydpo.DPO, batch: dict) -> dict[str, float]:
    dpo.eval()
    out = dpo(batch["chosen_ids"], batch["rejected_ids"], prompt_lengths=batch["prompt_lengths"])
    dpo.train()
    return {k: float(v) for k, v in out.metrics.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=10)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    tokenizer = build_tokenizer()
    model = build_model(TinyModelSpec(), tokenizer)
    train_rows = make_pairs(2000, seed=0)
    seen = {tuple(r.values()) for r in train_rows}
    eval_rows = [r for r in make_pairs(400, seed=1) if tuple(r.values()) not in seen][:128]  # held out
    lm_loss = pretrain(model, tokenizer, train_rows, args.pretrain_steps, args.batch_size, lr=3e-3)
    print(f"pretrained {args.pretrain_steps} steps: LM loss {lm_loss:.3f}")

    dpo = raydpo.DPO(model, beta=args.beta, pad_id=tokenizer.pad_token_id)  # reference: a frozen copy, now
    opt = torch.optim.AdamW(dpo.parameters(), lr=args.lr)  # the policy's parameters only
    eval_batch = encode(tokenizer, eval_rows)
    history = []
    rng = random.Random(0)
    for step in range(args.dpo_steps + 1):
        if step % args.eval_every == 0 or step == args.dpo_steps:
            m = evaluate(dpo, eval_batch) | {"step": step}
            history.append(m)
            print(f"step {step:>4}  eval loss {m['loss']:.4f}  reward accuracy {m['rewards/accuracies']:.3f}  "
                  f"margin {m['rewards/margins']:+.3f}")
        if step == args.dpo_steps:
            break
        batch = encode(tokenizer, rng.sample(train_rows, args.batch_size))
        out = dpo(batch["chosen_ids"], batch["rejected_ids"], prompt_lengths=batch["prompt_lengths"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return history


if __name__ == "__main__":
    main()
