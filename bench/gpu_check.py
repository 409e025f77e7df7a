"""The GPU checks of raydpo's first GPU run, in one script that runs raydpo's own code on a bare GPU
machine: torch and transformers installed, raydpo imported from its source tree (this script puts
it on the path), DeepSpeed (and peft, for the LoRA check) on PYTHONPATH; no Ray, pyarrow or vLLM.

Checks (on CUDA: a few minutes on one GPU; each a row of the table, a mismatch exits 1):

1. bf16 chunked vs full log-probs (``raydpo.logprobs.forward_logps``), per token, and the drift of
   both against float32 on the same weights (reported);
2. padded vs padding-free rows on sdpa, float32, per token;
3. a DeepSpeed ZeRO-3 engine over NCCL (world size 1; gloo with ``--smoke``) built as a Ray Train
   worker builds it: ``raydpo.train.devices.worker_device``, ``raydpo.train.policy.build_policy``
   (given the DeepSpeed config where it takes one: sharded loading), ``raydpo.train.engine.build_engine``;
   a CPU tensor through ``raydpo.train.devices.all_reduce`` and the head-chunk count's collective
   (``raydpo.logprobs.chunked.chunk_count``: NCCL has no CPU tensors); then training steps on one
   fixed batch through the worker's ``raydpo.train.step.step_metrics`` + ``engine.backward`` +
   ``engine.step``, the cached reference log-probs being the policy's own (computed first, no grad):
   the step-0 loss is ln 2, the exactness guard (``raydpo.train.guard.check``) passes, the metric
   sums' all-reduce (``_global_sums``) keeps them, the loss is finite and goes down. Full
   fine-tuning, then LoRA (``model.lora.r=8``; skipped without peft);
4. the reference scorer (``raydpo.reference.scorer.ReferenceScorer``, the reference pool's actor
   class, built directly) on the GPU: its float32 log-probs equal ``forward_logps`` of the same
   weights (per token, the guard's float32 tolerance), its bf16 ones within the guard's bf16 one;
5. with ``flash_attn`` installed: padded vs padding-free (one row, varlen) log-probs on
   ``flash_attention_2`` in bf16; otherwise reported as skipped;
6. peak ``torch.cuda.max_memory_allocated`` of one training step (raydpo.DPO, cached reference
   log-probs, AdamW) at 16k tokens per sequence with a 152k vocabulary, chunked vs full logits
   (reported; the full logits may run out of memory, which is reported, not a failure).

Prints the table (name, value, tolerance, ok), then one JSON object (``checks`` holds the rows).
``--smoke`` runs it all on CPU at tiny sizes over gloo (the suite does, so the script keeps working).
The table (``Checks``) and checks 1, 2 and 4-6 (torch and transformers alone) are in ``gpu_checks.py``
beside this script, which imports it from its own directory; the ZeRO-3 checks (3) are here.

On a GPU machine with torch and transformers only, DeepSpeed needs no build of its ops (none of these
checks uses a compiled op: torch's AdamW, no offload); install it and its pure-Python dependencies
into a directory, without touching the environment, and name it with ``--deepspeed-dir``::

    pip install --target /tmp/ds --no-deps deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack einops psutil \\
        pydantic pydantic-core annotated-types typing-inspection peft==0.21.2 accelerate==1.16.0
    python bench/gpu_check.py --deepspeed-dir /tmp/ds            # on a GPU machine
    python bench/gpu_check.py --smoke                             # anywhere

(numpy, packaging, tqdm, pyyaml, safetensors, huggingface_hub come with transformers; the pydantic
packages usually do too: ``--no-deps`` then installs the same versions again, harmlessly. peft and
accelerate only for the LoRA check.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_checks import GUARD_BF16, GUARD_FP32, Checks, flash, memory, on, random_pairs  # noqa: E402
from gpu_checks import drift, padding_free, per_token, reference, saved_model  # noqa: E402


def init_process_group(cuda: bool):
    """World size 1, as a Ray Train worker sees it: NCCL on CUDA (the device made current first), gloo on CPU."""
    import socket

    import torch.distributed as dist

    from raydpo.train.devices import worker_device

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    device = worker_device(cuda)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def collectives(checks: Checks) -> dict:
    """CPU tensors through raydpo's collectives (what NCCL alone refuses)."""
    import torch
    import torch.distributed as dist

    from raydpo.logprobs.chunked import chunk_count
    from raydpo.train.devices import all_reduce

    value = all_reduce(torch.tensor([2.5]), dist.ReduceOp.MAX)
    ok = value.device.type == "cpu" and value.item() == 2.5
    checks.add(f"devices.all_reduce cpu tensor ({dist.get_backend()})", value.item(), "== 2.5 on cpu", ok)
    count = chunk_count(10, 3, collective=True)
    checks.add(f"chunk_count collective ({dist.get_backend()})", count, "== 4", count == 4)
    return {"backend": str(dist.get_backend()), "all_reduce": value.item(), "chunk_count": count}


def zero3_rows(vocab: int, length: int) -> dict:
    """The ZeRO-3 checks' one micro-batch: 2 pairs as the worker's columns."""
    return dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), random_pairs(2, length, vocab, seed=5)))


def plain_logps(checks: Checks, path: str, vocab: int, length: int, device, chunk):
    """``forward_logps`` of the ZeRO-3 batch by the checkpoint loaded whole in float32 (before any
    engine: the partitioned loader keeps transformers' ZeRO-3 setting alive while its model lives)."""
    import torch

    from raydpo.data.collate import collate_rows
    from raydpo.logprobs import forward_logps
    from raydpo.models import load_causal_lm

    with torch.inference_mode():
        m = load_causal_lm(path, "float32", frozen=True).to(device)
        return forward_logps(m, on(collate_rows(zero3_rows(vocab, length), 0), device), chunk).cpu()


def zero3_engine(checks: Checks, label: str, m, t, path: str, device, dtype: str, steps: int):
    """``build_policy`` (given the DeepSpeed config where it takes one: sharded loading, checked) and
    ``build_engine``, as a worker calls them. Returns (engine, model, whether the load was sharded)."""
    import inspect

    import torch

    from raydpo.train.engine import build_engine, deepspeed_config
    from raydpo.train.policy import build_policy

    torch.manual_seed(0)
    sharded = "ds_config" in inspect.signature(build_policy).parameters
    model = build_policy(m, path, str(device), **({"ds_config": deepspeed_config(t, dtype)} if sharded else {}))
    if sharded:
        loaded = any(hasattr(p, "ds_id") for p in model.parameters())
        checks.add(f"{label} build_policy(ds_config) sharded", loaded, "== True", loaded)
    engine, _ = build_engine(model, t, dtype, steps)
    return engine, model, sharded


def cached_reference(checks: Checks, label: str, engine, rows: dict, chunk, tol: float, expected, out: dict) -> dict:
    """The cached reference log-probs: the policy's own before any update (no grad), compared with
    ``expected`` (the partitioned load holds the checkpoint's weights) where given; added to ``rows``.
    Returns the training batch on the engine's device."""
    import torch

    from raydpo.data.collate import collate_rows
    from raydpo.logprobs import forward_logps, split_pairs
    from raydpo.train.step import to_device

    engine.eval()
    with torch.no_grad():
        ref = forward_logps(engine, to_device(collate_rows(rows, 0), engine.device), chunk)
    engine.train()
    if expected is not None:
        out["vs_plain_per_token"] = per_token(ref.cpu(), expected, collate_rows(rows, 0)["completion_tokens"])
        checks.le(f"{label} policy vs whole fp32 load /token", out["vs_plain_per_token"], tol)
    rows["ref_chosen_logps"], rows["ref_rejected_logps"] = (x.float().cpu().numpy() for x in split_pairs(ref))
    return to_device(collate_rows(rows, 0), engine.device)


def step0_checks(checks: Checks, label: str, batch: dict, logps, sums: dict, tol: float) -> None:
    """At step 0: the exactness guard passes (the policy is its reference), and the metric sums'
    all-reduce (``_global_sums``, world size 1) keeps them."""
    import torch

    from raydpo.train.guard import GuardError, check, token_drift
    from raydpo.train.metrics import global_sums as _global_sums

    drift = token_drift(logps, torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]),
                        batch["completion_tokens"])
    try:
        value = check(drift, tol, None, True, "gpu_check")
    except GuardError:
        value = float(drift)
    checks.le(f"{label} step-0 guard drift /token", value, tol)
    local = {k: float(v) for k, v in sums.items()}
    totals = _global_sums({k: v.detach() for k, v in sums.items()})
    gap = max(abs(totals[k] - local[k]) / max(1.0, abs(local[k])) for k in local)
    checks.le(f"{label} metric sums all-reduced (rel)", gap, 1e-6)


def zero3(checks: Checks, label: str, path: str, vocab: int, length: int, device, dtype: str, chunk, lora: int,
          steps: int, lr: float, expected) -> dict:
    """A ZeRO-3 engine as a worker builds it, and ``steps`` training steps on one fixed batch.
    ``expected``: :func:`plain_logps` (the policy's log-probs before any step), or None."""
    import torch

    from raydpo.config import LoraConfig, LossConfig, ModelConfig, TrainConfig
    from raydpo.logprobs.chunked import output_head, partitioned
    from raydpo.train.step import step_metrics
    from raydpo.train.policy import activations

    cuda = device.type == "cuda"
    m = ModelConfig(name_or_path=path, dtype=dtype, gradient_checkpointing=True, logits_chunk_tokens=chunk,
                    lora=LoraConfig(r=lora))
    t = TrainConfig(num_workers=1, use_gpu=cuda, zero_stage=3, micro_batch_size=2, learning_rate=lr, max_grad_norm=1.0)
    engine, model, sharded = zero3_engine(checks, label, m, t, path, device, dtype, steps)
    out: dict = {"sharded_load": sharded}
    try:
        head = partitioned(output_head(engine))
        checks.add(f"{label} lm_head ZeRO-3 partitioned", head, "== True", head)
        tol = GUARD_FP32 if dtype == "float32" else GUARD_BF16
        batch = cached_reference(checks, label, engine, zero3_rows(vocab, length), chunk, tol, expected, out)
        losses = []
        for step in range(steps):
            with activations(m, engine.device):
                loss, sums, logps = step_metrics(engine, batch, LossConfig(), chunk)
            if step == 0:
                step0_checks(checks, label, batch, logps, sums, tol)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        norm = engine.get_global_grad_norm()
        out |= {"losses": losses, "grad_norm": None if norm is None else float(norm)}
        checks.le(f"{label} |step-0 loss - ln 2|", abs(losses[0] - math.log(2)), 1e-5 if dtype == "float32" else 1e-2)
        finite = all(math.isfinite(x) for x in losses)
        checks.add(f"{label} losses finite", finite, "== True", finite)
        checks.add(f"{label} loss decrease over {steps} steps", losses[0] - losses[-1], "> 0", losses[-1] < losses[0])
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, model
        if cuda:
            torch.cuda.empty_cache()
    return out


def zero3_checks(checks: Checks, result: dict, path: str, vocab: int, length: int, cuda: bool, chunk,
                 steps: int) -> None:
    """Check 3 (the ZeRO-3 engine: full fine-tuning, then LoRA where peft is installed) in a process
    group of world size 1, into ``result``; a missing DeepSpeed is a failed row."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        checks.add("deepspeed importable", f"error: {e}", "see docstring", False)
        result["zero3"] = {"error": str(e)}
        return
    import torch.distributed as dist

    try:
        device = init_process_group(cuda)
        result["worker_device"] = str(device)
        result["collectives"] = checks.run("collectives", collectives)
        expected = checks.run("whole fp32 load", plain_logps, path, vocab, length, device, chunk)
        expected = None if isinstance(expected, dict) else expected
        dtype = "bfloat16" if cuda else "float32"
        result["zero3"] = checks.run("zero3 full", zero3, "zero3 full", path, vocab, length, device, dtype, chunk, 0,
                                     steps, 1e-3, expected)
        try:
            import peft  # noqa: F401
        except ImportError:
            checks.skip("zero3 lora", "peft not installed")
        else:
            result["zero3_lora"] = checks.run("zero3 lora", zero3, "zero3 lora", path, vocab, length, device, dtype,
                                              chunk, 8, steps, 1e-3, expected)
    except Exception as e:  # noqa: BLE001 - the process group itself
        checks.error("process group", e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, gloo (what the suite runs)")
    p.add_argument("--deepspeed-dir", help="a directory holding DeepSpeed and its dependencies (pip install --target; "
                   "see the module docstring), put first on the import path")
    p.add_argument("--steps", type=int, default=5, help="training steps of the ZeRO-3 checks")
    args = p.parse_args()
    if args.deepspeed_dir:
        sys.path.insert(0, os.path.abspath(args.deepspeed_dir))
    import torch

    cuda = not args.smoke and torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    vocab, hidden, length, tokens = (512, 32, 48, 256) if args.smoke else (151_646, 256, 2048, 16_384)
    # ZeRO-3 / scorer / flash: a short batch; several head chunks (8 positions, or the automatic 220 at 152k).
    z_length, chunk = (48, 8) if args.smoke else (512, None)
    checks = Checks()
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "vocab": vocab, "tokens_per_sequence": tokens}
    result |= checks.run("bf16 chunked vs full", drift, vocab, hidden, length, dev)
    result |= checks.run("padded vs padding-free", padding_free, vocab, hidden, length, dev)
    memory(checks, result, vocab, hidden, tokens, dev)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        path = saved_model(tmp, vocab, hidden, 4 * max(z_length, 1024))
        device = torch.device(dev)
        # Before any DeepSpeed engine: no ZeRO-3 setting can reach these loads.
        result["reference_scorer"] = checks.run("reference scorer", reference, path, vocab, z_length, device)
        result["flash_attention"] = checks.run("flash-attn padded vs padding-free", flash, path, vocab, 2 * z_length,
                                               device)
        zero3_checks(checks, result, path, vocab, z_length, cuda, chunk, args.steps)
    result["seconds"] = checks.seconds
    result["checks"] = checks.rows
    result["failed"] = checks.failed
    print(checks.table())
    print(json.dumps(result, indent=1, default=str))
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
