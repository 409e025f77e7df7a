"""One rank of a 2-rank gloo group (run as a script by tests/test_zero3.py): the policy built
partitioned under ZeRO-3 (raydpo.train.policy.build_policy with the engine's DeepSpeed config), a
DeepSpeed engine around it, then the streaming export. Rank 0 writes what the test compares:

- ``loaded``: the gathered weights right after loading (base names, LoRA adapters left out);
- ``logits``: the engine's logits on a fixed batch (LoRA B set away from zero first, so a merge
  that dropped the adapters would show);
- ``exported``: the export's file names.

    python tests/zero3_worker.py RANK WORLD MODEL_DIR OUT_DIR LORA SHARD_BYTES
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(rank: int, world: int, model_dir: str, out_dir: str, lora: int, shard_bytes: int) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    import raydpo.train.export as export
    from raydpo.config import LoraConfig, ModelConfig, TrainConfig
    from raydpo.train.engine import deepspeed_config
    from raydpo.train.policy import build_policy

    m = ModelConfig(name_or_path=model_dir, lora=LoraConfig(r=lora, target_modules=["all-linear"]))
    t = TrainConfig(num_workers=world, zero_stage=3, micro_batch_size=1)
    config = deepspeed_config(t, "float32")
    torch.manual_seed(0)
    model = build_policy(m, model_dir, "cpu", ds_config=config)
    partitioned = all(hasattr(p, "ds_id") for n, p in model.named_parameters() if "lora_" not in n)
    loaded = {export._plain(k): v for k, v in export.gathered_state_dict(model, rank == 0).items() if "lora_" not in k}
    with torch.no_grad():  # every rank the same adapters, away from zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21]])
    with torch.no_grad():
        logits = engine(input_ids=ids).logits
    export.SHARD_BYTES = shard_bytes
    export.export_model(engine.module, os.path.join(out_dir, "model"), rank == 0, m, model_dir)
    if rank == 0:
        torch.save({"loaded": loaded, "logits": logits, "ids": ids, "partitioned": partitioned}, os.path.join(out_dir, "rank0.pt"))
        with open(os.path.join(out_dir, "files.json"), "w") as f:
            json.dump(sorted(os.listdir(os.path.join(out_dir, "model"))), f)
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: no rank tears its sockets down under another


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), a[2], a[3], int(a[4]), int(a[5]))
