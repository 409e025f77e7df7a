"""Peak memory of one DPO training step on long pairs with a 152k vocabulary: raydpo vs TRL.

Each measurement runs in a fresh process and reports its RSS high-water mark (``ru_maxrss``; on a GPU
``torch.cuda.max_memory_allocated``) and the step's wall time. The model is a random Qwen2 (hidden 64,
2 layers, vocabulary 151,646), so the vocabulary, not the weights, dominates, as the issue measured.
One pair of random tokens: prompt, chosen and rejected of T/2 tokens each, so each sequence has T.

- ``raydpo``: the trainer's step (``raydpo.DPO`` with cached reference log-probs, as the Ray trainer
  consumes them; chunked log-probs, automatic chunk), AdamW;
- ``raydpo-full``: the same with ``logits_chunk_tokens: 0`` (the full [T, V] logits, the old path);
- ``trl``: TRL's ``DPOTrainer`` (its default: the reference forward in the step), one step of
  ``trainer.train()``, the same model and pair (text of a word-level tokenizer with the same ids).

    python bench/long_context.py --tokens 1024 4096 16384 [--impls raydpo raydpo-full trl]

``--sp-budget-mib M``: the longest pair whose training step stays within M MiB per process, at
sequence-parallel sizes 1 and 2 (gloo ranks on this machine, DeepSpeed's Ulysses attention, raydpo's
chunked log-probs, gradients all-reduced over the group, AdamW), lengths growing by 1.25x from 4k.
The model is wider there (hidden 256) so that activations, which SP divides, are a real share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

VOCAB = 151_646


def build(out: str, hidden: int = 64) -> None:
    """The random Qwen2 (``hidden`` wide) and a word-level tokenizer whose ids are ``t<id>`` words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    vocab_size = int(os.environ.get("BENCH_VOCAB", VOCAB))  # the suite's smoke run uses a small one
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=65536, tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(out)
    vocab = {"<pad>": 0, "<eos>": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(out)


def pair(tokens: int):
    import torch

    g = torch.Generator().manual_seed(tokens)
    vocab = int(os.environ.get("BENCH_VOCAB", VOCAB))
    half = tokens // 2
    return [torch.randint(2, vocab, (half,), generator=g).tolist() for _ in range(3)]


def peak_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_raydpo(model_dir: str, tokens: int, chunk, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import raydpo

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    dpo = raydpo.DPO(model, beta=0.1, pad_id=0, ref_model=None, logits_chunk_tokens=chunk)
    opt = torch.optim.AdamW(dpo.parameters(), lr=1e-5)
    prompt, chosen, rejected = pair(tokens)
    c = torch.tensor([prompt + chosen], device=device)
    r = torch.tensor([prompt + rejected], device=device)
    ref = torch.tensor([-float(tokens)], device=device)
    before = peak_mib(device)
    start = time.perf_counter()
    out = dpo(c, r, prompt_lengths=[len(prompt)], ref_chosen_logps=ref, ref_rejected_logps=ref)
    out.loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"step_s": time.perf_counter() - start, "before_mib": before, "peak_mib": peak_mib(device)}


def run_trl(model_dir: str, tokens: int, device: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    prompt, chosen, rejected = pair(tokens)
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    # TRL appends EOS to each completion: the pair is one token longer there.
    rows = [{"prompt": words(prompt), "chosen": " " + words(chosen), "rejected": " " + words(rejected)}]
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=1, max_steps=1, learning_rate=1e-5, beta=0.1,
                           max_length=None, report_to=[], save_strategy="no", use_cpu=device != "cuda",
                           optim="adamw_torch", dataloader_num_workers=0, disable_tqdm=True, logging_steps=1)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             # The word-level pipeline as saved (AutoTokenizer would pick Qwen2's class for the model type).
                             processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir))
        example = trainer.train_dataset[0]
        assert len(example["prompt_ids"]) == len(prompt), "TRL must see the same tokens"
        before = peak_mib(device)
        start = time.perf_counter()
        trainer.train()
        return {"step_s": time.perf_counter() - start, "before_mib": before, "peak_mib": peak_mib(device)}


def run_sp(model_dir: str, tokens: int, size: int, rank: int, port: int) -> dict:
    """One rank's training step on one pair of ``tokens`` per sequence in an SP group of ``size``."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from raydpo.config import LossConfig
    from raydpo.data.collate import collate_pairs
    from raydpo.logprobs import forward_logps
    from raydpo.objectives import preference_loss
    from raydpo.train.sequence_parallel import setup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").train()
    _, group = setup(model, size, 0, 2) if size > 1 else (None, None)
    shard = group.shard() if group else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    prompt, chosen, rejected = pair(tokens)
    batch = collate_pairs([prompt], [chosen], [rejected], 0)
    before = peak_mib("cpu")
    start = time.perf_counter()
    logps = forward_logps(model, batch, None, shard)
    ref = (torch.full((1,), -float(tokens)), torch.full((1,), -float(tokens)))
    _, (losses, _, _), _ = preference_loss(logps, batch["completion_tokens"], ref, LossConfig())
    losses.mean().backward()
    for p in model.parameters():  # what the engine's reduction does: the group's partial gradients added
        if size > 1 and p.grad is not None:
            dist.all_reduce(p.grad)
    opt.step()
    dist.barrier()
    return {"step_s": time.perf_counter() - start, "before_mib": before, "peak_mib": peak_mib("cpu")}


def sp_search(budget: float, sizes=(1, 2)) -> list[dict]:
    """The longest pair (tokens per sequence) whose step fits ``budget`` MiB per process, per SP size."""
    import socket

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, hidden=256)
        for size in sizes:
            tokens, fits = 4096, None
            while True:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                procs = [subprocess.Popen([sys.executable, __file__, "--impl", "sp", "--model-dir", tmp, "--tokens", str(tokens),
                                           "--sp", str(size), "--rank", str(r), "--port", str(port)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(size)]
                runs = [p.communicate()[0] for p in procs]
                got = [json.loads(x[7:]) for o in runs for x in o.splitlines() if x.startswith("RESULT ")]
                peak = max(g["peak_mib"] for g in got) if len(got) == size else float("inf")
                row = {"sequence_parallel_size": size, "tokens": tokens, "peak_mib_per_process": peak,
                       "step_s": max(g["step_s"] for g in got) if got else None}
                print(json.dumps(row), flush=True)
                out.append(row)
                if peak > budget:
                    break
                fits = tokens
                tokens = int(tokens * 1.25) // 64 * 64
            out.append({"sequence_parallel_size": size, "longest_within_budget": fits, "budget_mib": budget})
            print(json.dumps(out[-1]), flush=True)
    return out


def child(args) -> None:
    device = "cuda" if args.device == "cuda" else "cpu"
    torch_threads = int(os.environ.get("BENCH_THREADS", "2"))
    import torch

    torch.set_num_threads(torch_threads)
    if args.impl == "sp":
        result = run_sp(args.model_dir, args.tokens[0], args.sp, args.rank, args.port)
    elif args.impl == "trl":
        result = run_trl(args.model_dir, args.tokens[0], device)
    else:
        result = run_raydpo(args.model_dir, args.tokens[0], 0 if args.impl == "raydpo-full" else None, device)
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--impls", nargs="+", default=["raydpo", "raydpo-full", "trl"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget-mib", type=float, default=20_000, help="skip a run whose full-logits estimate exceeds this")
    p.add_argument("--sp-budget-mib", type=float, help="search the longest pair within this per-process budget at SP 1 and 2")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return child(args)
    if args.sp_budget_mib:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                          "sp_search": sp_search(args.sp_budget_mib)}, indent=1))
        return
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.device}",
               "vocab": VOCAB, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        for tokens in args.tokens:
            for impl in args.impls:
                # The full [2T, V] float32 logits, their log-softmax and gradient: ~3 copies (TRL 1.16
                # scores through its own fused head, so it is always run).
                if impl == "raydpo-full" and 3 * 2 * tokens * VOCAB * 4 / 2**20 > args.budget_mib:
                    results["runs"].append({"impl": impl, "tokens": tokens, "skipped": "over the memory budget"})
                    continue
                proc = subprocess.run([sys.executable, __file__, "--impl", impl, "--model-dir", tmp, "--tokens", str(tokens),
                                       "--device", args.device], capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                run = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-500:]}
                results["runs"].append({"impl": impl, "tokens": tokens, **run})
                print(json.dumps(results["runs"][-1]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
