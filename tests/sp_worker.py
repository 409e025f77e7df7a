"""One rank of a real DeepSpeed engine (raydpo's config, SGD) with or without Ulysses sequence parallelism (run as a script
by tests/test_long_context.py): a few optimizer steps on fixed micro-batches, then the per-step
losses and the final weights, written by rank 0.

    python tests/sp_worker.py RANK WORLD SP MODEL_DIR OUT ZERO_STAGE LAYOUT LORA
"""

from __future__ import annotations

import os
import sys

import torch


def batches(n: int = 3):
    """Fixed micro-batches of 2 pairs, prompts and completions of mixed lengths, ids of the tiny vocab."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        cols = [[torch.randint(5, 200, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(2)] for lo, hi in ((3, 40), (1, 30), (1, 30))]
        out.append(cols)
    return out


def main(rank: int, world: int, sp: int, model_dir: str, out: str, zero: int, layout: str, lora: int) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    from raydpo.config import LoraConfig, LossConfig, ModelConfig, TrainConfig
    from raydpo.data.collate import collate_packed, collate_pairs
    import deepspeed

    from raydpo.train.engine import deepspeed_config
    from raydpo.train.export import gathered_state_dict
    from raydpo.train.step import step_metrics
    from raydpo.train.policy import build_policy
    from raydpo.train.sequence_parallel import setup

    m = ModelConfig(name_or_path=model_dir, gradient_checkpointing=True, lora=LoraConfig(r=lora, target_modules=["all-linear"]))
    t = TrainConfig(num_workers=world, sequence_parallel_size=sp, zero_stage=zero, micro_batch_size=2,
                    max_grad_norm=0.0)
    model = build_policy(m, model_dir, "cpu", sequence_parallel=sp > 1, ds_config=deepspeed_config(t, "float32"))
    if lora:  # start the adapters away from zero so their gradients are not all zero-shaped
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    mpu, group = setup(model, sp, zero, 1 if layout == "padding_free" else 4)
    # Plain SGD, no clipping: a gradient off by any factor moves the weights by as much (Adam would
    # normalise a scale error away and turn rounding noise on near-zero gradients into full steps).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(t, "float32"), mpu=mpu)
    engine.train()
    shard = group.shard() if group else None
    initial = gathered_state_dict(engine.module, rank == 0, trainable_only=bool(lora))
    losses = []
    # An MoE model's router loss weighted up, so a shard's tokens counted wrong would move the weights.
    loss_cfg = LossConfig(router_aux_loss_coef=1.0 if hasattr(engine.module.config, "output_router_logits") else None)
    for cols in batches():
        batch = collate_packed(*cols, 0) if layout == "padding_free" else collate_pairs(*cols, 0)
        batch["ref_chosen_logps"] = torch.full((2,), -60.0)
        batch["ref_rejected_logps"] = torch.full((2,), -55.0)
        loss, _, _ = step_metrics(engine, batch, loss_cfg, 5, shard)  # chunks of 5: recomputed in backward
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    state = gathered_state_dict(engine.module, rank == 0, trainable_only=bool(lora))
    if rank == 0:
        torch.save({"losses": losses, "state": state, "initial": initial}, out)
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: no rank tears its sockets down under another


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4], int(a[5]), a[6], int(a[7]))
