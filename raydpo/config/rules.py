"""Rules over a whole config: cross-field validation and the settings derived from several keys.

Torch-free, so that loading and checking a config stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from raydpo.config.schema import ConfigError

if TYPE_CHECKING:
    from raydpo.config import Config, LossConfig

REFERENCE_FREE = frozenset({"simpo", "orpo", "sft"})
"""Losses that read no reference log-probs."""
UNPAIRED = frozenset({"kto", "apo_zero_unpaired"})
"""Losses on unpaired, labelled completions (TRL's KTOTrainer); they cannot be mixed with pairwise ones."""
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
"""Losses with an f-divergence generalization (TRL's list); the others need reverse_kl."""
SYNC_REF_REFUSAL = (
    "loss.sync_ref_model (TR-DPO) is not supported: raydpo scores the reference once, before training, into a "
    "content-addressed cache, and a reference that moves every few steps would need all remaining pairs re-scored at "
    "each update (TRL refuses sync_ref_model with precompute_ref_log_probs for the same reason). Train in stages "
    "instead: a first raydpo train, then a second with reference.name_or_path set to the first run's model/ directory "
    "(a hard reference update at the stage boundary; each stage's scores stay cached)")
NOT_DPO_TRAINER = frozenset({"simpo", "orpo"}) | UNPAIRED
"""Losses of other TRL trainers (CPO, ORPO, KTO), which have no ``ld_alpha`` or ``use_weighting``."""


def pool_size(num_actors: int | list[int]) -> tuple[int, int]:
    """(min, max) actors of a pool size given as a number or ``[min, max]``."""
    return (num_actors, num_actors) if isinstance(num_actors, int) else (num_actors[0], num_actors[-1])


def _pool_ok(num_actors: int | list[int]) -> bool:
    if isinstance(num_actors, list) and len(num_actors) != 2:
        return False
    low, high = pool_size(num_actors)
    return 1 <= low <= high


def loss_checks(loss: LossConfig) -> list[tuple[bool, str]]:
    """(ok, message) for each rule on the ``loss`` section (shared by the pipeline and :class:`raydpo.DPO`)."""
    return [
        (loss.beta > 0, "loss.beta must be > 0"),
        (0.0 <= loss.label_smoothing < 0.5, "loss.label_smoothing must be in [0, 0.5)"),
        (not loss.weights or len(loss.weights) == len(loss_names(loss)),
         "loss.weights needs one weight per loss in loss.type"),
        ("exo_pair" not in loss_names(loss) or loss.label_smoothing > 0, "loss exo_pair needs loss.label_smoothing > 0"),
        (loss.f_divergence == "reverse_kl" or set(loss_names(loss)) <= F_DIVERGENCE_LOSSES,
         f"loss.f_divergence other than reverse_kl works with {', '.join(sorted(F_DIVERGENCE_LOSSES))} only"),
        (not set(loss_names(loss)) & UNPAIRED or len(loss_names(loss)) == 1,
         f"loss.type {loss_names(loss)} mixes an unpaired loss ({', '.join(sorted(UNPAIRED))}: one labelled completion "
         "per row) with others; unpaired losses train alone"),
        (loss.desirable_weight > 0 and loss.undesirable_weight > 0, "loss.desirable_weight and loss.undesirable_weight must be > 0"),
        (not loss.sync_ref_model, SYNC_REF_REFUSAL),
        (loss.ld_alpha is None or 0.0 <= loss.ld_alpha <= 1.0, "loss.ld_alpha must be in [0, 1] (or unset: no LD-DPO)"),
        (not (loss.ld_alpha is not None or loss.use_weighting) or not set(loss_names(loss)) & NOT_DPO_TRAINER,
         f"loss.ld_alpha and loss.use_weighting are TRL DPOTrainer options: not for {', '.join(sorted(NOT_DPO_TRAINER))}"),
        # As TRL: the sorting losses pair each margin with another pair's, so per-pair weights would misalign.
        (not loss.use_weighting or not {"aot", "aot_unpaired"} & set(loss_names(loss)),
         "loss.use_weighting (WPO) cannot weight aot or aot_unpaired: they sort the pairs of a batch"),
    ]


def unpaired(loss: LossConfig) -> bool:
    """Whether ``loss.type`` trains on unpaired examples (KTO) rather than pairs."""
    return bool(set(loss_names(loss)) & UNPAIRED)


def unpaired_checks(cfg: "Config") -> list[tuple[bool, str]]:
    """What an unpaired loss needs from the rest of the config (torch-free, before any stage)."""
    if not unpaired(cfg.loss):
        return []
    kto = "kto" in loss_names(cfg.loss)
    return [
        (not kto or cfg.train.micro_batch_size > 1,
         "loss.type kto estimates its KL term from the other examples of a micro-batch: train.micro_batch_size must be "
         "> 1 (TRL's KTOTrainer requires the same)"),
    ]


def validate_loss(loss: LossConfig) -> None:
    """Raise ConfigError on the first broken rule of the ``loss`` section."""
    _raise_first(loss_checks(loss))


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def validate(cfg: "Config") -> None:
    """Cross-field and range checks that the type annotations cannot express."""
    checks = [
        (cfg.model.name_or_path != "", "model.name_or_path is required"),
        (_pool_ok(cfg.reference.num_actors), "reference.num_actors must be a number >= 1 or [min, max] with 1 <= min <= max"),
        (all(v is None or v >= -1 for v in (cfg.reference.max_restarts, cfg.reference.max_task_retries)),
         "reference.max_restarts and reference.max_task_retries must be >= -1 (-1: no limit)"),
        (cfg.reference.batch_size >= 1, "reference.batch_size must be >= 1"),
        (cfg.reference.shard_rows >= cfg.reference.batch_size, "reference.shard_rows must be >= reference.batch_size"),
        (cfg.reference.mode != "streaming" or cfg.train.num_epochs == 1,
         "reference.mode=streaming scores pairs while the first epoch reads them; with train.num_epochs > 1 "
         "use reference.mode=precompute (every epoch then reads the cache)"),
        (cfg.reference.max_tokens_per_batch is None or cfg.reference.max_tokens_per_batch >= 2,
         "reference.max_tokens_per_batch must be >= 2 (or unset for fixed batches of reference.batch_size)"),
        (cfg.data.max_length >= 2, "data.max_length must be >= 2"),
        (cfg.data.max_prompt_length is None or 1 <= cfg.data.max_prompt_length < cfg.data.max_length,
         "data.max_prompt_length must be >= 1 and < data.max_length"),
        (set(cfg.data.columns) <= {"prompt", "chosen", "rejected", "completion", "label"},
         "data.columns maps prompt / chosen / rejected (or completion / label) to your column names, e.g. {chosen: response_j}"),
        (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        *loss_checks(cfg.loss),
        (cfg.model.lora.r >= 0, "model.lora.r must be >= 0 (0: no LoRA)"),
        (cfg.model.quantization is None or cfg.model.lora.r > 0,
         "model.quantization trains adapters on frozen quantized weights: set model.lora.r > 0 (QLoRA)"),
        (not cfg.output.save_adapter_only or cfg.model.lora.r > 0, "output.save_adapter_only needs model.lora.r > 0"),
        (cfg.train.optimizer != "cpu_adam" or cfg.train.offload_optimizer,
         "train.optimizer=cpu_adam runs the update on CPU: set train.offload_optimizer=true"),
        (not cfg.train.offload_optimizer or cfg.train.zero_stage >= 1, "train.offload_optimizer needs train.zero_stage >= 1"),
        (not cfg.train.offload_params or cfg.train.zero_stage == 3, "train.offload_params needs train.zero_stage=3"),
        (cfg.train.num_workers >= 1, "train.num_workers must be >= 1"),
        (cfg.train.zero_stage in (0, 1, 2, 3), "train.zero_stage must be one of 0, 1, 2, 3"),
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (cfg.train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
        (cfg.train.learning_rate > 0, "train.learning_rate must be > 0"),
        (cfg.train.max_steps >= 0, "train.max_steps must be >= 0"),
        (cfg.train.num_epochs >= 1, "train.num_epochs must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.eval_every >= 0, "train.eval_every must be >= 0"),
        (cfg.train.checkpoint_every >= 0 and cfg.train.keep_checkpoints >= 1 and cfg.train.max_failures >= -1,
         "train.checkpoint_every must be >= 0, train.keep_checkpoints >= 1 and train.max_failures >= -1"),
        (cfg.reference.mode != "streaming" or (cfg.train.checkpoint_every == 0 and cfg.train.max_failures == 0),
         "reference.mode=streaming trains on pairs in the order the pool scores them, which a restart cannot "
         "replay: checkpoints and recovery (train.checkpoint_every, train.max_failures) need reference.mode=precompute"),
        (cfg.logging.progress_every_s >= 0, "logging.progress_every_s must be >= 0"),
        (cfg.model.logits_chunk_tokens is None or cfg.model.logits_chunk_tokens >= 0,
         "model.logits_chunk_tokens must be >= 0 (0: full logits) or unset (automatic)"),
        (cfg.train.pad_to_multiple_of is None or cfg.train.pad_to_multiple_of >= 1, "train.pad_to_multiple_of must be >= 1"),
        (cfg.loss.ld_alpha is None or cfg.reference.backend == "hf",
         "loss.ld_alpha weights the reference's tokens too, which reference.backend vllm cannot: use reference.backend hf"),
        *sequence_parallel_checks(cfg),
        *unpaired_checks(cfg),
        (len(set(cfg.logging.backends)) == len(cfg.logging.backends), "logging.backends lists a tracker twice"),
    ]
    _raise_first(checks)


#: Core attention implementations the Ulysses wrapper can patch (DeepSpeed 0.19 refuses eager).
SP_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def sequence_parallel_issue(sp: int, num_workers: int, attn_implementation: Optional[str], streaming: bool,
                            config=None) -> Optional[str]:
    """Why ``train.sequence_parallel_size`` = ``sp`` cannot run with these settings, or None."""
    if sp < 1:
        return f"train.sequence_parallel_size must be 1 or more, got {sp}"
    if sp == 1:
        return None
    if num_workers % sp:
        divisors = [d for d in range(1, num_workers + 1) if num_workers % d == 0]
        return (f"train.sequence_parallel_size {sp} does not divide train.num_workers {num_workers}; allowed: "
                f"{', '.join(map(str, divisors))}")
    if attn_implementation is not None and attn_implementation not in SP_ATTENTION:
        return (f"model.attn_implementation {attn_implementation!r} cannot be patched for sequence parallelism; "
                f"allowed: {', '.join(SP_ATTENTION)} (or unset: sdpa)")
    if streaming:
        return "train.sequence_parallel_size > 1 needs reference.mode precompute (every rank of a group reads the same split)"
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(text, "num_attention_heads", None)
        kv = getattr(text, "num_key_value_heads", None) or heads
        if heads is None:
            return f"model_type {getattr(text, 'model_type', '?')!r} has no num_attention_heads for Ulysses to split"
        if heads % sp or not (kv % sp == 0 or sp % kv == 0):
            return (f"train.sequence_parallel_size {sp} must divide the model's {heads} attention heads, and divide or "
                    f"be a multiple of its {kv} key/value heads")
    return None


def sequence_parallel_checks(cfg: "Config") -> list[tuple[bool, str]]:
    """``train.sequence_parallel_size`` against the other settings (the model's heads: preflight)."""
    t = cfg.train
    issue = sequence_parallel_issue(t.sequence_parallel_size, t.num_workers, cfg.model.attn_implementation,
                                    cfg.reference.mode == "streaming")
    return [(issue is None, issue or "")]


def router_aux_coef(loss: LossConfig, model_config) -> float:
    """The weight of the MoE load-balancing loss for this model (0: off), as TRL's DPOTrainer reads
    ``router_aux_loss_coef``: unset, the model config's own (0.0 where it declares none); on only for
    a config with ``output_router_logits`` (an MoE model), and a non-zero value on another is an error.

    ``model_config``: the policy's transformers config (its text config for a multimodal one)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    moe = hasattr(text, "output_router_logits")
    coef = loss.router_aux_loss_coef
    if coef and not moe:
        raise ConfigError(f"loss.router_aux_loss_coef is {coef} but model_type {getattr(text, 'model_type', '?')!r} is "
                          "not a Mixture-of-Experts model that returns router logits: there is no auxiliary loss to weight")
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    return float(coef or 0.0) if moe else 0.0


def share_prompt_issue(cfg: "Config", model_config) -> Optional[str]:
    """Why the trainer cannot compute each pair's prompt once (``train.share_prompt``) exactly and
    cheaply with these settings and this policy config, or None (:mod:`raydpo.data.shared`)."""
    from raydpo.families.rules import packed_mask_issue

    t, attn = cfg.train, cfg.model.attn_implementation
    if unpaired(cfg.loss):
        return "unpaired losses (KTO) score each example and its KL sequence apart"
    if t.sequence_parallel_size > 1:
        return "sequence parallelism's all-to-all attention is causal only and takes no custom mask"
    if (attn or "").startswith("flash_attention"):
        return f"model.attn_implementation {attn} takes no custom attention mask"
    if router_aux_coef(cfg.loss, model_config):
        from raydpo.logprobs.router import router_loss_issue

        issue = router_loss_issue(model_config)
        if issue:
            return f"the MoE router loss (loss.router_aux_loss_coef) is the model's own there: {issue}"
    if t.use_gpu and attn != "flex_attention":
        return ("on GPUs it runs with model.attn_implementation flex_attention (a block mask; sdpa and eager would "
                "need a dense [T, T] mask per row)")
    return packed_mask_issue(model_config)


def loss_names(loss: LossConfig) -> list[str]:
    """``loss.type`` as a list."""
    return [loss.type] if isinstance(loss.type, str) else list(loss.type)


def loss_weights(loss: LossConfig) -> list[float]:
    """``loss.weights``, 1 per loss by default."""
    return loss.weights or [1.0] * len(loss_names(loss))


def uses_reference(cfg: Config) -> bool:
    """False when every loss is reference-free: then no reference stage runs."""
    return any(n not in REFERENCE_FREE for n in loss_names(cfg.loss))


def reference_path(cfg: Config) -> str:
    return cfg.reference.name_or_path or cfg.model.name_or_path


def reference_dtype(cfg: Config) -> str:
    return cfg.reference.dtype or cfg.model.dtype


def reference_trusts_code(cfg: Config) -> bool:
    r = cfg.reference.trust_remote_code
    return cfg.model.trust_remote_code if r is None else r
