"""A ZeRO-3 policy built already partitioned: no rank holds the whole model, in host or device memory.

transformers' DeepSpeed integration (``HfDeepSpeedConfig`` alive before loading) builds the model
inside ``deepspeed.zero.Init``, so each parameter is partitioned as it is created, but then reads
every checkpoint file into one state dict **on every rank** before copying it in
(``modeling_utils``: ``merged_state_dict`` of all files): a 70B bf16 model is 140 GB of host memory
per rank, eight ranks per node. Here the model is built the same way (``from_config`` under
``HfDeepSpeedConfig``, weight init skipped), then filled module by module: the module's parameters
are gathered (``GatheredParameters(modifier_rank=0)``), rank 0 copies each from its safetensors file
(``safe_open``: only that tensor is read), and leaving the block broadcasts and re-partitions them.
A rank's peak is its partition plus one module's full parameters.

Checkpoints whose names are not the model's (transformers 5 converts some on load: fused MoE
experts, renamed keys) or that are not safetensors go through transformers' own loader.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def zero3_enabled(ds_config: Optional[dict]) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3


def checkpoint_index(model_dir: str) -> Optional[dict[str, str]]:
    """Checkpoint key -> the safetensors file holding it, or None when the weights are not (only)
    safetensors (``pytorch_model.bin``: transformers' loader converts those)."""
    index, single = os.path.join(model_dir, INDEX), os.path.join(model_dir, SINGLE)
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return None


def sources(model, index: dict[str, str]) -> Optional[dict[str, str]]:
    """Each parameter and persistent buffer of ``model`` (tied ones once) -> its checkpoint key,
    allowing the checkpoint to have or lack the ``base_model_prefix`` (``model.``); None when any
    has no key (its checkpoint needs transformers' conversions)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [n for n, _ in model.named_parameters()] + list(model.state_dict(keep_vars=True).keys())
    params = {n for n, _ in model.named_parameters()}
    out: dict[str, str] = {}
    for name in dict.fromkeys(names):
        bare = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        key = next((k for k in (name, bare, f"{prefix}.{name}" if prefix else None) if k and k in index), None)
        if key is not None:
            out[name] = key
        elif name in params:
            return None
    return out


def read_tensor(index: dict[str, str], key: str):
    """One tensor of the checkpoint, as a new tensor in host memory. The file is mapped for this
    read only: pages of a mapping that stays open count in the process's RSS once touched, so
    keeping one open would grow it to the whole file by the end of the load."""
    from safetensors import safe_open

    with safe_open(index[key], framework="pt") as f:
        return f.get_tensor(key)


def fill(model, index: dict[str, str], keys: dict[str, str]) -> None:
    """Copy the checkpoint into ``model`` (ZeRO-3 partitioned), one module's parameters at a time.

    Every rank walks the modules in the same order (the gathers are collective); rank 0 alone reads
    parameters. Persistent buffers (not partitioned) are read by every rank."""
    import deepspeed
    import torch
    import torch.distributed as dist

    seen: set[int] = set()
    is_reader = dist.get_rank() == 0
    with torch.no_grad():
        for prefix, module in model.named_modules():
            named = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)
                     if id(p) not in seen]
            seen.update(id(p) for _, p in named)
            if named:
                with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
                    if is_reader:
                        for name, p in named:
                            p.data.copy_(read_tensor(index, keys[name]))
            for n, buf in module.named_buffers(recurse=False):
                name = f"{prefix}.{n}" if prefix else n
                if buf is not None and name in keys:
                    buf.copy_(read_tensor(index, keys[name]))


@contextlib.contextmanager
def zero3_paused():
    """transformers' ZeRO-3 switch off inside the block (``unset_hf_deepspeed_config``), then back to
    what it was: a skeleton on the meta device must not enter zero.Init, and another model of this
    process (the GPU check builds two) may still hold the switch on."""
    from transformers.integrations import deepspeed as hf_deepspeed

    held = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def built_partitioned(config, ds_config: dict, dtype, trust_remote_code: bool, extra: dict):
    """``config``'s model created inside ``deepspeed.zero.Init`` (each parameter partitioned as it is
    made), its weights not initialized: every one is read from the checkpoint next."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        # transformers' flag that zero.Init is already active: from_config then adds no zero.Init of
        # its own and skips its pass gathering and broadcasting every module to initialize it
        # (initialize_weights_zero3), a transfer of the whole model that the fill makes again.
        from transformers.modeling_utils import set_zero3_state
    except ImportError:  # another transformers: its from_config makes that pass
        with no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config), set_zero3_state():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    model.tie_weights()  # post_init's init_weights, which ties them, was skipped
    return model


def load_partitioned(model_dir: str, ds_config: dict, dtype, trust_remote_code: bool = False,
                     attn_implementation: Optional[str] = None):
    """``AutoModelForCausalLM`` of ``model_dir`` partitioned by ZeRO-3 under ``ds_config`` (the
    config ``deepspeed.initialize`` gets next), in ``dtype``, holding only this rank's partition.

    The returned model keeps transformers' ``HfDeepSpeedConfig`` alive (transformers holds a weak
    reference; while it lives, its ZeRO-3 aware paths stay on). Call on every rank together."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.integrations import HfDeepSpeedConfig

    from raydpo.observability.quiet import deepspeed_quietly

    import torch
    import torch.distributed as dist

    with deepspeed_quietly():
        import deepspeed

        # zero.Init sizes its partitions by DeepSpeed's view of the process group Ray Train made.
        deepspeed.init_distributed(dist_backend=dist.get_backend())

    # zero.Init reads the partitioning settings; the batch sizes it would check against the world
    # size assume no sequence parallelism (the engine checks them with the groups).
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    index = checkpoint_index(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    keys = None
    if index is not None:  # the model's names, from a skeleton on the meta device (no memory)
        with torch.device("meta"), zero3_paused():
            keys = sources(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), index)
    init_config = {k: v for k, v in ds_config.items() if k != "train_batch_size"}
    hf_ds = HfDeepSpeedConfig(init_config)  # from here on, transformers' ZeRO-3 paths are on
    if keys is None:  # transformers converts this checkpoint's names: its loader, whole state dict per rank
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    else:
        model = built_partitioned(config, init_config, dtype, trust_remote_code, extra)
        fill(model, index, keys)
        try:
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json: the one from_config derived stays
            pass
    model._raydpo_hf_deepspeed_config = hf_ds
    return model
