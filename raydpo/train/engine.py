"""DeepSpeed engine construction for one Ray Train worker (config, optimizer, schedule)."""

from __future__ import annotations

from raydpo.config import TrainConfig

#: ``train.lr_scheduler`` -> transformers scheduler name (TRL's schedules, warm-up from 0 included).
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def zero3_sizes(t: TrainConfig, hidden_size: int) -> dict:
    """ZeRO-3's bucket and residency sizes (elements) from the model's hidden size h, as
    transformers' Trainer fills DeepSpeed's ``auto`` values (reduce bucket h^2, prefetch 0.9 h^2,
    parameters under 10 h kept whole), and at most ``train.zero3_live_parameters`` (default 10 h^2:
    about ten layers' matrices) gathered at once and kept for reuse. DeepSpeed's own defaults (5e8
    reduce bucket, 1e9 live) hold a 1.3 GB model's every weight gathered through a step (measured:
    bench/zero3_memory.py), which defeats partitioning where memory is the limit."""
    live = t.zero3_live_parameters or 10 * hidden_size * hidden_size
    return {"reduce_bucket_size": hidden_size * hidden_size, "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size, "stage3_max_live_parameters": live,
            "stage3_max_reuse_distance": live}


def deepspeed_config(t: TrainConfig, dtype: str, hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON config for ``train.*`` and the policy dtype (``hidden_size``: the policy's,
    which sizes ZeRO-3's buckets, :func:`zero3_sizes`; None: DeepSpeed's defaults)."""
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3 and hidden_size:
        zero |= zero3_sizes(t, hidden_size)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # Ranks of a sequence-parallel group share each micro-batch.
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * (t.num_workers // t.sequence_parallel_size),
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        # A torch AdamW may be passed in: DeepSpeed's fused Adam needs CUDA and its CPU Adam offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_optimizer(params, t: TrainConfig):
    """torch AdamW, or DeepSpeed's CPU Adam (AdamW mode, the same update) for offloaded states."""
    import torch

    if t.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.learning_rate, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def build_scheduler(optimizer, t: TrainConfig, total_steps: int):
    """transformers' schedule ``train.lr_scheduler`` with ``warmup_steps`` over ``total_steps``."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULERS[t.lr_scheduler], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)


def build_engine(model, t: TrainConfig, dtype: str, total_steps: int, mpu=None, ds_config: dict | None = None):
    """Wrap ``model`` in a DeepSpeed engine (joining the process group Ray Train already set up).

    Only parameters that require grad (all, or the LoRA adapters) are optimized. ``mpu``: the
    sequence-parallel groups (:func:`raydpo.train.sequence_parallel.setup`); DeepSpeed then reduces
    gradients over data and sequence ranks and averages over the data-parallel ones. ``ds_config``:
    the one the policy was built with (default: :func:`deepspeed_config`)."""
    from raydpo.observability.quiet import deepspeed_quietly

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    with deepspeed_quietly():
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config or deepspeed_config(t, dtype), mpu=mpu
        )
    if t.zero_stage == 0 and engine.seq_dp_world_size == 1:
        # A lone data-parallel rank has nothing to all-reduce, but DeepSpeed would still flatten every
        # gradient into buckets, all-reduce them over the process group and copy them back each step.
        engine.enable_backward_allreduce = False
    return engine, scheduler
