"""``online.keep: best``: the best round's weights written as the run's model, in Ray tasks.

The synced weights are object refs put by the trainer's rank 0, which owns them: they are lost
when the Ray Train workers exit. :func:`adopt_checked` copies them into an object the driver owns before
the workers stop; :func:`write_model` then replaces ``output.dir/model`` (the trainer's export of
the last weights) with them. Both run as Ray tasks: the driver never imports torch.
"""

from __future__ import annotations

import contextlib
import os


def adopt_checked(state: dict) -> tuple[dict, bool]:
    """The state dict itself, returned by a task (``num_returns=2``) so that the caller owns the new
    object, and True: the caller learns from the small second result whether the copy was made,
    without fetching the weights (an argument lost with its owner fails both)."""
    return state, True


def _no_init():
    """transformers' context that skips weight initialization (every weight is loaded after)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def write_model(state: dict | None, model_path: str, dtype: str, trust_remote_code: bool, out_dir: str) -> None:
    """Replace ``out_dir`` (a local directory or URI) with a Hugging Face model of the policy's
    architecture (``model_path``: the pinned policy) holding ``state`` (a full state dict, LoRA
    merged, as the generators load it); ``state`` None: the initial model's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    from raydpo import storage
    from raydpo.models import load_causal_lm, resolve_local, torch_dtype

    hf_logging.disable_progress_bar()
    local_model = resolve_local(model_path)
    if state is None:
        model = load_causal_lm(model_path, dtype, trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(local_model, trust_remote_code=trust_remote_code)
        with _no_init():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
        model.load_state_dict(state, strict=True)
        if os.path.exists(os.path.join(local_model, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(local_model)
    # Nothing of the trainer's export stays (an adapter's files beside full weights would be read as both).
    storage.delete_dir(out_dir)
    with storage.local_dir_for_writing(out_dir) as local:
        model.save_pretrained(local, safe_serialization=True)
