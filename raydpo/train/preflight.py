"""Checks before any worker starts: the run directory, disk space and memory, each with a clear message.

A run that cannot work should stop in seconds on the driver with what to change, not minutes later
with a stack trace from inside a Ray Train worker.
"""

from __future__ import annotations

import json
import os
import uuid

from raydpo import storage
from raydpo.config import Config

GB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_writable(where: str, key: str = "output.dir") -> None:
    """The directory ``where`` (a local path or URI; config key ``key``) exists or can be made, and
    takes a file: a missing bucket, denied access or a read-only disk stops here, naming both."""
    probe = storage.join(where, f".raydpo-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_text(probe, "ok")
        storage.delete_file(probe)
    except OSError as e:
        raise OSError(f"{key} {where!r} is not writable: {e.strerror or e}") from None


def check_storage(cfg: Config) -> None:
    """Every directory the run writes is writable (output, caches, Ray Train's storage), and every
    URI names a filesystem this machine can open, before any stage starts."""
    from raydpo.storage.probe import written_dirs

    for key, where in written_dirs(cfg).items():
        check_writable(where, key)


def count_params(model_path: str, trust_remote_code: bool = False) -> int:
    """Parameters of the model at ``model_path`` from its config alone (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def worker_bytes(n_params: int, cfg: Config) -> dict[str, float]:
    """Estimated bytes per worker of weights, gradients and AdamW states under the ZeRO stage
    (activations excluded): ``device`` (GPU or, on CPU, host memory) and ``host`` (offloaded)."""
    t, m = cfg.train, cfg.model
    w = t.num_workers
    weight = {None: BYTES[m.dtype], "8bit": 1.0, "4bit": 0.5}[m.quantization]
    trainable = n_params if m.lora.r == 0 else 0.02 * n_params  # LoRA adapters: a few percent at most
    # fp32 Adam moments (8 bytes) plus, in bf16/fp16, an fp32 master copy (4 bytes).
    optim = trainable * (8 + (4 if m.dtype != "float32" else 0))
    grads = trainable * BYTES[m.dtype]
    params = n_params * weight
    shard = lambda x, stage: x / w if t.zero_stage >= stage else x  # noqa: E731
    optim, grads, params = shard(optim, 1), shard(grads, 2), shard(params, 3)
    host = (optim if t.offload_optimizer else 0) + (params if t.offload_params else 0)
    device = optim + grads + params - host
    return {"device": device, "host": host}


def check_memory(n_params: int, cfg: Config, device_budget: float, host_budget: float) -> None:
    """Stop when the training state alone exceeds what the workers have.

    ``device_budget``: bytes one worker's device has (GPU memory; on CPU the node's memory divided
    among the workers placed on it). ``host_budget``: host bytes per worker for offloaded state."""
    need = worker_bytes(n_params, cfg)
    if need["device"] <= device_budget and need["host"] <= host_budget:
        return
    t = cfg.train
    hint = ("train.zero_stage=3 with train.offload_optimizer=true and train.offload_params=true" if t.zero_stage < 3 or not t.offload_params
            else "more workers (train.num_workers), LoRA (model.lora.r) or a smaller model.dtype")
    raise ValueError(
        f"the policy does not fit: {n_params / 1e9:.2f}B parameters in {cfg.model.dtype} under ZeRO-{t.zero_stage} over "
        f"{t.num_workers} worker(s) need about {need['device'] / GB:.1f} GiB per worker for weights, gradients and "
        f"optimizer states before activations ({need['host'] / GB:.1f} GiB offloaded), and a worker has "
        f"{device_budget / GB:.1f} GiB; try {hint}"
    )


def budgets(cfg: Config) -> tuple[float, float]:
    """(device, host) bytes per worker on this cluster: Ray's memory resource shared by the workers
    on CPU, a GPU's memory where the driver can see one (otherwise no GPU limit is checked)."""
    import ray

    total_memory = ray.cluster_resources().get("memory", 0.0) or float("inf")
    host = total_memory / cfg.train.num_workers
    if not cfg.train.use_gpu:
        return host, host
    import torch

    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else float("inf")
    return gpu, host


def disk_need(n_params: int, cfg: Config) -> float:
    """Bytes the run writes under ``output.dir``: the exported model and the kept checkpoints."""
    export = n_params * (BYTES[cfg.model.dtype] if cfg.model.lora.r == 0 or not cfg.output.save_adapter_only else 0.02)
    per_ckpt = sum(worker_bytes(n_params, cfg).values()) * cfg.train.num_workers if cfg.train.checkpoint_every else 0.0
    local_ckpt = cfg.train.storage_path is None or "://" not in cfg.train.storage_path
    return export + (per_ckpt * (cfg.train.keep_checkpoints + 1) if local_ckpt else 0.0)


def check_disk(need: float, free: float, where: str) -> None:
    if need > free:
        raise OSError(f"not enough disk space under {where}: the model export and checkpoints need about "
                      f"{need / GB:.1f} GiB and {free / GB:.1f} GiB are free; free space, lower "
                      "train.keep_checkpoints, or point train.storage_path elsewhere")


def model_type(model_path: str) -> str | None:
    """``model_type`` from the directory's ``config.json`` (None when it has none)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def check_router_aux(cfg: Config, model_path: str) -> None:
    """``loss.router_aux_loss_coef`` against the policy's config, as TRL's DPOTrainer checks it at start
    (a coefficient for a non-MoE model is an error). raydpo computes transformers' standard router
    loss over the padded batch's tokens in every layout (:mod:`raydpo.logprobs.router`); a model with
    its own loss has only its own, right on padded batches alone, so padding-free rows and sequence
    parallelism are refused with it."""
    from transformers import AutoConfig

    from raydpo.config.rules import router_aux_coef
    from raydpo.logprobs.router import router_loss_issue

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    issue = router_aux_coef(cfg.loss, config) and router_loss_issue(config)
    t = cfg.train
    if issue and (t.sequence_parallel_size > 1 or t.padding_free):
        raise ValueError(f"the MoE router loss (loss.router_aux_loss_coef, by default the model config's) is computed "
                         f"by the model over every token it is given ({issue}); padding-free rows and sequence parallelism "
                         "would count filler tokens or one shard's: set loss.router_aux_loss_coef=0, or "
                         "train.padding_free=false and train.sequence_parallel_size=1")


def check_family(cfg: Config, model_path: str) -> None:
    """Settings a model family cannot serve exactly (:mod:`raydpo.families.rules`), refused up front."""
    from raydpo.families.rules import padding_free_issue
    from raydpo.config.rules import sequence_parallel_issue

    issue = padding_free_issue(model_type(model_path)) if cfg.train.padding_free else None
    if issue is None and cfg.train.sequence_parallel_size > 1:
        from transformers import AutoConfig

        t = cfg.train
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
        issue = sequence_parallel_issue(t.sequence_parallel_size, t.num_workers, cfg.model.attn_implementation,
                         cfg.reference.mode == "streaming", config)
    if issue:
        raise ValueError(issue)
    check_share_prompt(cfg, model_path)


def check_share_prompt(cfg: Config, model_path: str) -> None:
    """``train.share_prompt`` against the policy (:func:`raydpo.config.rules.share_prompt_issue`):
    required where it cannot be exact is an error; left to raydpo, where it is off is said once."""
    from transformers import AutoConfig

    from raydpo.config.rules import share_prompt_issue
    from raydpo.observability import console

    if cfg.train.share_prompt is False:
        return
    issue = share_prompt_issue(cfg, AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code))
    if issue and cfg.train.share_prompt:
        raise ValueError(f"train.share_prompt is true, but {issue}: set train.share_prompt to null (automatic) or false")
    if issue:
        console.get().say(f"train: two rows per pair (the prompt computed for each), not one: {issue}")


def preflight(cfg: Config, model_path: str) -> None:
    """All the checks, in the order a user would fix them."""
    from raydpo.models import load_tokenizer, resolve_local

    model_path = resolve_local(model_path)  # a pinned hub id: the driver's snapshot of it
    out = storage.normalize(cfg.output.dir)
    check_writable(out)
    load_tokenizer(model_path, cfg.model.trust_remote_code)  # a missing pad and EOS token fails here, not in an actor
    check_family(cfg, model_path)
    check_router_aux(cfg, model_path)
    n = count_params(model_path, cfg.model.trust_remote_code)
    check_memory(n, cfg, *budgets(cfg))
    check_disk(disk_need(n, cfg), storage.free_bytes(out), out)
