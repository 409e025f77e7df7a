"""The run configuration's sections: one typed dataclass per section of DESIGN.md's table, a
docstring per field (the config reference in docs/ is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from raydpo.config.online import OnlineConfig

Dtype = Literal["float32", "bfloat16", "float16"]
LossName = Literal["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo", "kto", "apo_zero_unpaired"]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
Scheduler = Literal["constant", "linear", "cosine"]
Optimizer = Literal["adamw", "cpu_adam"]
Quantization = Literal["8bit", "4bit"]
Backend = Literal["hf", "vllm"]
ReferenceMode = Literal["precompute", "streaming"]
ConsoleLevel = Literal["quiet", "normal", "verbose"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]
WandbMode = Literal["online", "offline", "disabled"]


@dataclass
class LoraConfig:
    r: int = 0
    """Adapter rank; 0 trains all weights (no LoRA)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter input (kept even with ``model.disable_dropout``: it is the adapter's own)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``all-linear`` for every linear layer but the head."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Policy initial weights: a local Hugging Face directory or a hub id."""
    dtype: Dtype = "float32"
    """Dtype of the policy weights during training."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory / hub repo to run (off unless set)."""
    attn_implementation: Optional[str] = None
    """transformers attention (``sdpa``, ``eager``, ``flash_attention_2`` where installed); default:
    transformers' choice."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for about a third more compute."""
    activation_offloading: bool = False
    """Keep the activations saved for backward in (pinned) CPU memory instead of on the GPU
    (``torch.autograd.graph.save_on_cpu``); with ``gradient_checkpointing`` only the layer inputs are
    saved, so this moves those too. No effect on CPU training."""
    logits_chunk_tokens: Optional[int] = None
    """Scored positions per ``lm_head`` chunk in the log-probs of the trainer, the ``hf`` reference
    actors and ``raydpo.DPO``: only completion positions go through the head, a chunk at a time,
    recomputed in backward, so no ``[T, vocab]`` logits tensor exists. None: automatic, as many
    positions as keep one chunk's float32 logits within 128 MiB (220 at a 152k vocabulary); 0: the
    model's full logits (the memory of TRL's path)."""
    disable_dropout: bool = True
    """Set every dropout probability to 0, as TRL does: DPO compares log-probs with the reference's,
    and dropout noise in the policy's would bias the loss."""
    quantization: Optional[Quantization] = None
    """bitsandbytes quantization of the frozen base weights (``4bit``: QLoRA); needs ``lora.r`` > 0."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())
    """LoRA adapters (peft); off unless ``lora.r`` > 0."""


@dataclass
class ReferenceConfig:
    name_or_path: Optional[str] = None
    """Frozen reference weights; defaults to ``model.name_or_path``."""
    dtype: Optional[Dtype] = None
    """Dtype of the reference weights; defaults to ``model.dtype``. Log-softmax is always float32."""
    trust_remote_code: Optional[bool] = None
    """Run the reference checkpoint's own code; defaults to ``model.trust_remote_code`` (off unless set)."""
    attn_implementation: Optional[str] = None
    """transformers attention for the ``hf`` backend (``sdpa``, ``eager``, ``flash_attention_2`` where
    installed); default: transformers' choice. One that ignores custom masks disables ``share_prompt``."""
    num_actors: Union[int, list[int]] = 1
    """Reference actors, each holding one copy of the reference: a fixed number, or ``[min, max]``
    to let Ray Data grow the pool with the backlog of unscored batches."""
    num_cpus_per_actor: float = 1.0
    """Logical CPUs each reference actor reserves."""
    num_gpus_per_actor: float = 0.0
    """GPUs each reference actor reserves (0 on CPU-only clusters; a fraction packs several per GPU)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each actor needs, e.g. ``{reference_node: 1}``, so the pool is placed on
    the nodes that declare them (another node type than the trainers)."""
    accelerator_type: Optional[str] = None
    """Ray accelerator type each actor needs (e.g. ``L4``, ``A10G``): the reference on cheaper GPUs."""
    max_restarts: Optional[int] = None
    """How often a dead reference actor is restarted (-1: always); its unfinished batches are
    retried. None: Ray Data's actor-pool default (always)."""
    max_task_retries: Optional[int] = None
    """How often a batch is retried after its actor died (-1: always). None: Ray Data's default (always)."""
    guard: bool = True
    """Exactness guard: on every worker's first micro-batch, before any update, the policy still is
    the reference, so its log-probs must match the cached ones; a gap above ``guard_tolerance`` stops
    the run. Applies when the reference is the policy's starting weights (the default)."""
    guard_tolerance: Optional[float] = None
    """Largest allowed gap per completion token; default by the looser dtype: float32 1e-4, bf16/fp16 5e-2."""
    batch_size: int = 8
    """Pairs per reference forward pass (chosen and rejected are scored together: 2x sequences).
    With ``max_tokens_per_batch`` set: pairs per length-sorted bucket instead (use a few hundred)."""
    shard_rows: int = 4096
    """Most pairs per cache shard (one parquet file): an actor is handed up to this many pairs at a
    time, scores them ``batch_size`` at a time and writes them as one shard, so a million pairs make a
    few hundred files, not one per batch. Fewer when a split is small (every actor gets a few
    shards); an actor that dies rescores at most one shard."""
    mode: ReferenceMode = "precompute"
    """``precompute``: every pair is scored (or read from the cache) before training starts.
    ``streaming``: on a cache miss training starts on the first scored batches while the pool keeps
    scoring and writing the cache (needs ``train.num_epochs`` 1: later epochs would score again)."""
    backend: Backend = "hf"
    """``hf``: transformers forward. ``vllm``: vLLM ``prompt_logprobs`` on the exact token ids (the
    optional extra: ``pip install 'raydpo[vllm]'``); ignores ``quantization`` and ``max_tokens_per_batch``."""
    vllm_gpu_memory_utilization: float = 0.9
    """vLLM's memory share for weights and KV cache; lower it on CPU and when actors share a GPU."""
    vllm_max_model_len: Optional[int] = None
    """vLLM's longest sequence; defaults to ``data.max_length``."""
    quantization: Optional[Quantization] = None
    """bitsandbytes quantization of the reference weights, ``8bit`` or ``4bit`` (NF4), to fit a big
    reference on small devices (runs on CPU too). Log-probs drift from the full-precision reference:
    see docs/performance.md for measured figures; part of the cache key."""
    share_prompt: bool = True
    """``hf`` backend: score each pair as one row (prompt, chosen, rejected) with a mask that keeps
    rejected tokens from seeing chosen ones, so the prompt is computed once; checked on a probe at
    actor start (a model whose attention ignores custom masks falls back to two rows per pair)."""
    max_tokens_per_batch: Optional[int] = None
    """Token budget per forward pass, padding included (pairs x longest row; two rows per pair
    without ``share_prompt``): each bucket of ``batch_size`` pairs is sorted by length and cut to
    fit, instead of fixed row counts."""
    cache_dir: str = "~/.cache/raydpo/reference"
    """Root of the content-addressed reference log-prob cache."""


DataFormat = Literal["auto", "standard", "conversational", "implicit"]
TruncationMode = Literal["keep_start", "keep_end"]


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training data: files (jsonl, json, parquet, csv; .gz allowed), globs, directories, ``datasets``
    ``save_to_disk`` directories, or hub data set ids (``org/name`` or ``org/name:split``)."""
    eval: list[str] = field(default_factory=list)
    """Evaluation data, as ``train``; empty means hold out ``eval_fraction`` of train."""
    format: DataFormat = "auto"
    """Row format: standard {prompt, chosen, rejected} strings, conversational message lists,
    implicit (only chosen/rejected, prompt = their common part); ``auto`` detects it per row."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for data sets that name fields differently, e.g. ``{prompt: question, chosen: response_j}``."""
    chat_template: Optional[str] = None
    """Jinja chat template (or a path to a .jinja file) replacing the tokenizer's for conversational rows."""
    prompt_marker: str = "\n\nAssistant:"
    """Implicit-prompt text rows: the prompt ends after the last marker inside the common prefix."""
    max_prompt_length: Optional[int] = None
    """Max prompt tokens; a longer prompt keeps its first tokens under keep_start, its last under keep_end."""
    truncation_mode: TruncationMode = "keep_start"
    """Which end of prompt + completion survives ``max_length``: keep_start cuts completions,
    keep_end cuts the shared prompt's start (and the completion's start if it alone is too long)."""
    deduplicate: bool = False
    """Drop exact duplicate pairs (same prompt, chosen and rejected) after the first, counted as filtered."""
    eval_fraction: float = 0.0
    """Fraction of train pairs held out for eval when ``eval`` is empty, chosen by pair content."""
    max_length: int = 512
    """Max tokens of prompt + completion (per sequence); longer sequences keep their start."""
    max_bad_fraction: float = 0.01
    """The run fails when more than this fraction of rows read is quarantined."""
    tokenize_batch_size: int = 256
    """Rows per Ray Data tokenization batch (one batched tokenizer call each)."""
    num_workers: int = 2
    """Tokenization actors (each loads the tokenizer once)."""
    unpair_pairs: bool = True
    """Unpaired losses (``loss.type: kto``): split each preference pair into a desirable row (its
    chosen completion) and an undesirable one (its rejected), as TRL's ``unpair_preference_dataset``
    does; false quarantines paired rows."""
    shared_prompt: bool = True
    """Tokenize each prompt's head once instead of three times where the tokenizer provably gives
    the same ids (byte-level BPE with GPT-2, Llama 3 or Qwen 2 splitting; see
    ``raydpo/data/prompt_cut.py``); other tokenizers take the plain path whatever this says."""
    cache: bool = True
    """Keep the data stage's result (kept pairs, quarantine, counts) in a content-addressed cache, so a
    later run on the same files, tokenizer and settings starts no tokenizer (:mod:`raydpo.data.cache`)."""
    cache_dir: Optional[str] = None
    """Root of the tokenized-data cache; default: ``tokenized`` beside ``reference.cache_dir``."""


@dataclass
class LossConfig:
    type: Union[LossName, list[LossName]] = "sigmoid"
    """Loss, named as in TRL's DPOTrainer (see :mod:`raydpo.objectives`), or a list of losses summed with
    ``weights`` (``[sigmoid, sft]`` is RPO). ``simpo``, ``orpo`` and ``sft`` alone need no reference:
    then no reference model is loaded and no cache is read or written. ``kto`` and
    ``apo_zero_unpaired`` (TRL's KTOTrainer) train on unpaired ``{prompt, completion, label}`` rows
    (paired rows are split, see ``data.unpair_pairs``) and cannot be mixed with pairwise losses."""
    weights: list[float] = field(default_factory=list)
    """One weight per loss in ``type``; default 1 each."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward ``beta * (policy - reference)`` (ORPO: the weight
    lambda of the odds-ratio term; SimPO: its reward scale)."""
    label_smoothing: float = 0.0
    """cDPO / robust / exo_pair / aot: assumed probability that a preference label is flipped."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature of the logistic/exponential blend."""
    f_divergence: FDivergence = "reverse_kl"
    """f-DPO's divergence (reverse_kl is plain DPO); for sigmoid, sigmoid_norm, hinge, ipo, exo_pair,
    robust, discopop and sft only, as in TRL."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of ``f_divergence: alpha_divergence``."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable examples' losses (TRL's ``desirable_weight``)."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable examples' losses (TRL's ``undesirable_weight``)."""
    sync_ref_model: bool = False
    """TR-DPO (TRL's ``sync_ref_model``): refused. raydpo scores the reference once into a cache before
    training; a reference that moves every few steps would need the rest re-scored each time (TRL
    also refuses it with ``precompute_ref_log_probs``). Instead, train in stages, each later one with
    ``reference.name_or_path`` the previous run's ``model/`` (a hard reference update per stage)."""
    ld_alpha: Optional[float] = None
    """LD-DPO (TRL's ``ld_alpha``, in [0, 1]): completion tokens past the pair's shorter completion count
    this much in the policy's and the reference's sums; None: all count fully."""
    use_weighting: bool = False
    """WPO (TRL's ``use_weighting``): each pair's loss times the chosen and rejected completions' weights,
    exp(mean over tokens of log p - log sum_v p_v^2) under the policy, without gradient."""
    router_aux_loss_coef: Optional[float] = None
    """MoE load-balancing loss weight added to the loss (TRL's ``router_aux_loss_coef``); None: the model
    config's own (0 where it has none), 0 turns it off; set on a non-MoE model it is an error. The loss
    counts the tokens TRL's padded two-row batch does in every layout (padding-free, shared prompt,
    sequence parallelism) for models with transformers' standard loss (Mixtral, Qwen2/3-MoE, OLMoE,
    GPT-OSS, ...); a model with a loss of its own trains on padded rows only."""


@dataclass
class TrainConfig:
    num_workers: int = 2
    """Ray Train workers, one DeepSpeed rank each."""
    use_gpu: bool = False
    """One GPU per worker and nccl; otherwise CPU and gloo."""
    cpus_per_worker: Optional[float] = None
    """Logical CPUs each train worker reserves (and its torch threads). None: on a one-node cluster
    without GPUs, the machine's cores divided among the workers (see :func:`raydpo.cluster.train_cpus`);
    elsewhere 1."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each train worker needs, e.g. ``{policy_node: 1}``, so the trainers are
    placed on the nodes that declare them (the policy's node group, apart from the reference pool's)."""
    accelerator_type: Optional[str] = None
    """Ray accelerator type each train worker needs (e.g. ``H100``, ``A100-80G``)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0 to 3."""
    micro_batch_size: int = 4
    """Pairs per worker per forward/backward."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps (transformers' schedules, as TRL)."""
    lr_scheduler: Scheduler = "constant"
    """Learning rate after warm-up: ``constant``, ``linear`` decay to 0 or ``cosine`` decay to 0 at the last step."""
    optimizer: Optimizer = "adamw"
    """``adamw`` (torch) or ``cpu_adam`` (DeepSpeed's vectorized CPU Adam; needs ``offload_optimizer``)."""
    offload_optimizer: bool = False
    """ZeRO offload of optimizer states (and the update) to CPU memory; stage 1 to 3."""
    offload_params: bool = False
    """ZeRO-3 offload of the parameters themselves to CPU memory."""
    zero3_live_parameters: int = 0
    """ZeRO-3: gathered parameters a rank keeps at most (and reuse distance); 0 = 10 x hidden_size^2."""
    sequence_parallel_size: int = 1
    """Ranks that share each micro-batch's sequences (DeepSpeed Ulysses): each computes 1/N of the
    tokens, attention exchanges heads for sequence (all-to-all). Must divide ``num_workers``; data
    parallelism is ``num_workers / sequence_parallel_size``. Needs ``sdpa`` or flash attention."""
    padding_free: bool = False
    """Pack each micro-batch's sequences into rows as wide as its longest sequence (first-fit
    decreasing; position ids restart per sequence, attention kept within it), so the linear layers
    spend almost nothing on padding and attention stays N x longest. With a flash_attention
    ``model.attn_implementation`` all sequences go into one row (varlen skips the masked blocks)."""
    share_prompt: Optional[bool] = None
    """Each pair as one row ``[prompt | chosen | rejected]``, its prompt computed once: rejected tokens
    see the prompt and themselves, never the chosen ones, with positions restarting after the prompt,
    so log-probs and gradients equal two rows per pair for ``p + c + r`` tokens instead of
    ``2p + c + r`` (padded, or several pairs a row with ``padding_free``). None: on wherever it is
    exact and needs no dense mask on a GPU, off with the reason on the console elsewhere (sequence
    parallelism, flash-attention, an MoE model's own router loss, unpaired losses; on GPUs it needs
    ``model.attn_implementation: flex_attention``); true: required (an error where it is off);
    false: two rows per pair."""
    peak_tflops_per_device: Optional[float] = None
    """Peak dense TFLOP/s of one training device, for the ``mfu`` metric; None: the table of common
    GPUs (:data:`raydpo.train.flops.PEAK_TFLOPS`, bf16 tensor-core figures) by the CUDA device name;
    on a CPU, or a GPU not in it, MFU is omitted."""
    pad_to_multiple_of: Optional[int] = None
    """Pad padded batches (trainer and reference; not padding-free rows) to a width that is a multiple
    of this, as TRL's ``pad_to_multiple_of``; the log-probs do not change (masks)."""
    group_by_length: bool = False
    """Order each worker's pairs so micro-batches hold similar lengths (less padding); shuffles
    within windows of ``100 x micro_batch_size`` pairs by a seed, then sorts each window by length."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means ``num_epochs`` full passes."""
    num_epochs: int = 1
    """Passes over the training pairs (ignored when ``max_steps`` > 0)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (and always before the first and after the last); 0 = only those two."""
    log_every: int = 1
    """Write a metrics.jsonl row every N optimizer steps."""
    seed: int = 42
    """Seed for weights-independent randomness (shuffling, dropout)."""
    checkpoint_every: int = 0
    """Checkpoint every N optimizer steps (DeepSpeed shards, optimizer, schedule, RNG, data position);
    0: none. A restarted or re-run training resumes from the latest one at the exact next batch."""
    keep_checkpoints: int = 2
    """Checkpoints kept (the oldest are deleted)."""
    max_failures: int = 0
    """Worker-group failures Ray Train recovers from (restart from the latest checkpoint); -1: no limit."""
    storage_path: Optional[str] = None
    """Where Ray Train keeps checkpoints: a local path or any URI Ray supports (s3://, gs://, ...);
    default ``<output.dir>/ray_train``."""


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, quarantine.jsonl, summary.json, model/."""
    save_adapter_only: bool = False
    """With LoRA: write only the adapter (peft format) to model/, instead of the merged full model."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray cluster to join (``host:port``, ``auto``, ``ray://...``) or ``local`` (always an embedded
    cluster). None: ``RAY_ADDRESS`` if set, else the live local cluster ``ray start`` recorded in
    Ray's ``ray_current_cluster`` file, else an embedded local cluster."""
    num_cpus: Optional[int] = None
    """Logical CPUs of an embedded local cluster (may exceed physical cores so all stages get placed)."""


@dataclass
class LoggingConfig:
    console: ConsoleLevel = "normal"
    """Console progress: ``quiet`` (errors and the final result only), ``normal`` (each stage's
    progress), ``verbose`` (every logged step with all its metrics, and Ray's own logs).
    ``--quiet`` / ``--verbose`` on the command line set it."""
    progress_every_s: float = 10.0
    """Off a terminal (a file, a pipe, ``ray job logs``): at most one progress line per stage this
    often, each a whole line (no carriage returns); stage ends and evaluations are always printed."""
    backends: list[Tracker] = field(default_factory=list)
    """Experiment trackers fed the same rows as metrics.jsonl plus the resolved config, by rank 0:
    ``tensorboard``, ``mlflow``, ``wandb`` (each an optional extra: ``pip install 'raydpo[wandb]'``)."""
    project: str = "raydpo"
    """The mlflow experiment and the wandb project."""
    run_name: Optional[str] = None
    """The trackers' run name; default: the last component of ``output.dir``."""
    tensorboard_dir: Optional[str] = None
    """A TensorBoard log directory shared by runs (each writes to ``<it>/<run name>``); default
    ``<output.dir>/tensorboard``."""
    mlflow_tracking_uri: Optional[str] = None
    """mlflow server or store (a relative path is made absolute); default ``MLFLOW_TRACKING_URI``,
    else a local file store at ``<output.dir>/mlruns`` (no server, no network)."""
    wandb_mode: Optional[WandbMode] = None
    """``online``, ``offline`` (files under ``<output.dir>/wandb`` for a later ``wandb sync``) or
    ``disabled``; default ``WANDB_MODE``, else online when logged in (``WANDB_API_KEY`` or
    ``~/.netrc``), else offline."""
    wandb_entity: Optional[str] = None
    """The wandb team or user; default: the API key's default entity."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The frozen reference and its actor pool."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data and tokenization."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The preference loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Ray Train + DeepSpeed settings."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the run writes."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Which Ray cluster to use."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console progress and experiment trackers."""
    online: OnlineConfig = field(default_factory=OnlineConfig)
    """Online / iterative DPO rounds (``raydpo online``); unused by ``raydpo train``."""
