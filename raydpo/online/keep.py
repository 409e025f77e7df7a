"""``online.keep: best``: the best round's weights written as the run's model, in Ray tasks.

The synced weights are object refs put by the trainer's rank 0, which owns them: they are lost
when the Ray Train workers exit. :func:`adopt_checked` copies them into an object the driver owns before
the workers stop; :func:`write_model` then replaces ``output.dir/model`` (the trainer's export of
the last weights) with them. Both run as Ray tasks: the driver never imports torch.
"""

from __future__ import annotations

import contextlib
import os

from raydpo import storage
from raydpo.observability import console
from raydpo.online import progress


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


def adopt_best(best, last_round: int):
    """``online.keep: best``, before the trainer's workers stop: the best weights as a
    :class:`progress.Kept` whose handle is an object ref the driver owns (the synced refs die with
    the rank-0 worker that put them), or :data:`progress.INITIAL`; None when the last weights are
    the best (the trainer's export stays)."""
    import ray

    from raydpo.storage.remote import on_cluster

    if best is None or best.round == last_round:
        console.get().say(progress.describe_kept(best, last_round, None))
        return None
    if best.handle is progress.INITIAL:
        return best
    if best.handle is None:  # not expected: every synced or restored round has its ref
        return None
    state, ok = on_cluster(adopt_checked, best.handle, num_returns=2)
    try:
        ray.get(ok)
    except ray.exceptions.RayError as e:  # e.g. their owner, a trainer worker restarted since, is gone
        console.get().say(f"online: warning: online.keep: best could not keep the weights after round {best.round} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the model is the last round's", level="quiet")
        return None
    return progress.Kept(best.round, best.reward, state)


def write_kept(cfg, model_path: str, model_dir: str, kept, last_reward) -> tuple[int, float]:
    """Replace the trainer's export in ``model_dir`` with ``kept``'s weights (in a Ray task); returns
    the kept round and reward for summary.json."""
    from raydpo.storage.remote import on_cluster

    state = None if kept.handle is progress.INITIAL else kept.handle
    on_cluster(write_model, state, model_path, cfg.model.dtype, cfg.model.trust_remote_code, model_dir,
               on_driver_node=not storage.is_uri(model_dir))
    console.get().say(progress.describe_kept(kept, cfg.online.rounds, last_reward) + f": {model_dir}")
    return kept.round, kept.reward
