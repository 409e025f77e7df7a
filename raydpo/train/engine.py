"""DeepSpeed engine construction for one Ray Train worker (config, optimizer, schedule)."""

from __future__ import annotations

from raydpo.config import TrainConfig


def deepspeed_config(t: TrainConfig, dtype: str) -> dict:
    """The DeepSpeed JSON config for ``train.*`` and the policy dtype."""
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * t.num_workers,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        # A torch AdamW is passed in: DeepSpeed's fused Adam needs CUDA and its CPU Adam needs offload.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def warmup_constant(warmup_steps: int):
    """LR multiplier: linear from 1/(warmup+1) to 1 over ``warmup_steps``, then constant."""
    return lambda step: min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0


def build_engine(model, t: TrainConfig, dtype: str):
    """Wrap ``model`` in a DeepSpeed engine (joining the process group Ray Train already set up)."""
    import deepspeed
    import torch

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=t.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(t.warmup_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, dtype)
    )
    return engine, scheduler
