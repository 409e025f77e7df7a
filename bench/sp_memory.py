"""Peak memory per rank of one sequence-parallel (SP=2) training step on a padding-free row of T tokens:
raydpo's document-wise attention (``new``) against the dense [B, 1, T, T] mask it replaced (``old``).

Two gloo ranks (torch.distributed, world 2, one SP group, DeepSpeed's Ulysses attention patched in by
raydpo's ``setup``) run one forward + backward of a random tiny Llama (hidden 64, 2 layers, 4 heads on
2 key/value heads, vocabulary 512, sdpa) through ``raydpo.train.step.step_metrics`` (chunked log-probs,
DPO loss) on 2 pairs packed padding-free: 4 sequences of T/4 tokens (prompt and completion T/8 each)
end to end in one row of T, where positions restart and plain causal attention is not exact.

- ``new``: raydpo's ``setup`` as it is: ``document_sdpa`` (causal sdpa per sequence, no [T, T] mask)
  and ``skip_local_masks`` (transformers builds no mask for the rank's T/P columns while training);
- ``old``: raydpo up to issue 36: the wrapper building ``sequence_mask``'s dense boolean [B, 1, T, T]
  mask for sdpa (which turns it into a float mask, kept for the backward), and transformers' own
  [B, 1, T/P, T/P] packed-sequence mask per rank, built and then dropped by Ulysses.

Each (variant, T) runs in 2 fresh processes. Per rank: the peak RSS growth (VmHWM after the step
minus VmRSS before it, the high-water mark reset through /proc/self/clear_refs after a warm-up step
at 256 tokens) and the step's wall seconds. Each rank's address space is capped at its size before
the step plus ``--cap-mb`` (default 4096: 8 GB for the pair), so a variant that needs more fails its
allocation and is reported "over" instead of taking the machine down.

    python bench/sp_memory.py [--tokens 16384 32768 65536] [--impls old new] [--cap-mb 4096]

Prints a table and one JSON line (``{"bench": "sp_memory", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time

VOCAB = 512


def dense_sdpa(sdpa):
    """The wrapper as raydpo had it before issue 36: the dense mask of ``sequence_mask`` into sdpa."""
    from raydpo.train.sequence_parallel import sequence_mask

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        pos = kwargs.get("position_ids")
        if attention_mask is None and pos is not None and query.shape[2] > 1:
            attention_mask = sequence_mask(pos.to(query.device), getattr(module, "sliding_window", None))
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def batch(tokens: int):
    """2 pairs, 4 sequences of tokens / 4 (prompt and completion tokens / 8 each), padding-free."""
    import torch

    from raydpo.data.collate import collate_packed

    g = torch.Generator().manual_seed(tokens)
    part = tokens // 8
    cols = [[torch.randint(2, VOCAB, (part,), generator=g).tolist() for _ in range(2)] for _ in range(3)]
    b = collate_packed(*cols, 0)
    b["ref_chosen_logps"] = torch.full((2,), -float(tokens))
    b["ref_rejected_logps"] = torch.full((2,), -float(tokens))
    return b


def rank_main(args) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import raydpo.train.sequence_parallel as sp
    from raydpo.config import LossConfig
    from raydpo.train.step import step_metrics

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(args.rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(args.rank))
    dist.init_process_group("gloo", rank=args.rank, world_size=2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=max(args.tokens, 1024), tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.impl == "old":
        sp.document_sdpa = dense_sdpa  # setup() wraps transformers' sdpa with it
        sp.skip_local_masks = lambda model: None  # and transformers builds each rank's [T/P, T/P] mask
    _, group = sp.setup(model, 2, 0, 1)
    shard = group.shard()

    def step(b):
        model.zero_grad(set_to_none=True)
        loss, _, _ = step_metrics(model, b, LossConfig(), None, shard, across_ranks=False)
        loss.backward()
        return float(loss)

    step(batch(256))  # warm-up: threads, allocator, lazy imports
    b = batch(args.tokens)
    import gc

    gc.collect()
    dist.barrier()
    before = status_mib("VmRSS")
    reset = reset_peak()
    base_hwm = status_mib("VmHWM") if reset else before
    cap = int((status_mib("VmSize") + args.cap_mb) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    start = time.perf_counter()
    out = {"rank": args.rank, "impl": args.impl, "tokens": args.tokens, "hwm_reset": reset}
    try:
        loss = step(b)
        seconds = time.perf_counter() - start
        peak = status_mib("VmHWM")
        out |= {"over": False, "loss": loss, "seconds": round(seconds, 2), "rss_before_mib": round(before, 1),
                "peak_mib": round(peak, 1), "growth_mib": round(peak - (before if reset else base_hwm), 1)}
    except (MemoryError, RuntimeError) as e:
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        out |= {"over": True, "seconds": round(time.perf_counter() - start, 2), "error": str(e).splitlines()[0][:160]}
        print("RESULT " + json.dumps(out), flush=True)
        os._exit(3)  # the other rank waits in a collective: the parent ends it
    print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(impl: str, tokens: int, args) -> list[dict]:
    """Both ranks of one (variant, T): their RESULT lines (a rank still waiting after the other ran
    out of memory is ended and counted over too)."""
    port = free_port()
    cmd = [sys.executable, __file__, "--rank-of", impl, "--tokens", str(tokens), "--port", str(port), "--cap-mb",
           str(args.cap_mb), "--threads", str(args.threads)] + (["--checkpointing"] if args.checkpointing else [])
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    deadline = time.time() + args.timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.time() > deadline:
            time.sleep(2 if failed else 0)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    results = []
    for r, p in enumerate(procs):
        out, err = p.communicate()
        got = [json.loads(x[7:]) for x in out.splitlines() if x.startswith("RESULT ")]
        if got:
            results.append(got[0])
        else:
            timed_out = time.time() > deadline
            results.append({"rank": r, "impl": impl, "tokens": tokens, "over": not timed_out, "timed_out": timed_out,
                            "error": "ended: the other rank failed" if p.returncode and not timed_out else err[-300:]})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--impls", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--cap-mb", type=int, default=4096, help="per-rank address-space growth allowed for the step")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per (variant, T)")
    p.add_argument("--rank-of", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_of:
        args.impl, args.tokens = args.rank_of, args.tokens[0]
        rank_main(args)
        return
    rows = []
    print(f"{'T':>7} {'impl':>4} {'rank0 MB':>9} {'rank1 MB':>9} {'seconds':>8} {'loss':>10}", flush=True)
    for tokens in args.tokens:
        for impl in args.impls:
            ranks = sorted(measure(impl, tokens, args), key=lambda r: r["rank"])
            over = any(r.get("over") for r in ranks)
            timed_out = any(r.get("timed_out") for r in ranks)
            cell = lambda r: (f"> {args.cap_mb}" if r.get("over") else "timeout" if r.get("timed_out")  # noqa: E731
                              else f"{r['growth_mib']:.0f}")
            seconds = None if over or timed_out else max(r["seconds"] for r in ranks)
            print(f"{tokens:>7} {impl:>4} {cell(ranks[0]):>9} {cell(ranks[1]):>9} "
                  f"{seconds if seconds is not None else '-':>8} {ranks[0].get('loss') or float('nan'):>10.6f}", flush=True)
            rows.append({"tokens": tokens, "impl": impl, "over_cap": over, "timed_out": timed_out, "seconds": seconds,
                         "growth_mib_per_rank": [r.get("growth_mib") for r in ranks],
                         "loss": ranks[0].get("loss"), "ranks": ranks})
    print(json.dumps({"bench": "sp_memory", "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "sp": 2,
                      "cap_mib_per_rank": args.cap_mb, "threads_per_rank": args.threads,
                      "checkpointing": args.checkpointing, "rows": rows}))


if __name__ == "__main__":
    main()
