"""The ``online`` config section: rounds, the generator pool, the judge (typed dataclasses).

``Config.online``; its own module of the config package, beside the sections ``raydpo train``
reads, with its checks (:func:`online_checks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

GeneratorBackend = Literal["auto", "hf", "vllm"]
Pairing = Literal["best_worst", "margin"]
Keep = Literal["best", "last"]


@dataclass
class GeneratorConfig:
    backend: GeneratorBackend = "auto"
    """``vllm`` where installed (``auto``), else transformers ``generate`` (``hf``)."""
    num_actors: int = 1
    """Generator actors; each holds a full copy of the policy's weights."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per generator actor (torch threads on CPU)."""
    num_gpus_per_actor: float = 0.0
    """GPUs reserved per generator actor (fractions share a GPU)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per actor, to pin the pool to a node group (as ``reference.resources``)."""
    accelerator_type: Optional[str] = None
    """Ray accelerator type per actor (e.g. ``A10G``)."""
    max_restarts: int = 3
    """Times a dead generator actor is replaced (its batch retried) before the run stops."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt (K); pairs are made among them."""
    max_new_tokens: int = 32
    """Completion length limit in tokens (also capped by ``data.max_length`` minus the prompt)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    batch_size: int = 16
    """Prompts per generate call."""
    vllm_gpu_memory_utilization: float = 0.3
    """vLLM backend: share of the GPU its engine may take (the trainer may share the node)."""


@dataclass
class JudgeConfig:
    reward_fn: Optional[str] = None
    """A Python reward ``module:function`` called as ``f(prompt, completion) -> float`` (prompt as in
    the data: a string or a message list; completion: the decoded text)."""
    reward_model: Optional[str] = None
    """A Hugging Face sequence-classification directory (or hub id) scoring prompt + completion
    (logit 0). Exactly one of ``reward_fn`` and ``reward_model`` is set."""
    num_actors: int = 1
    """Judge actors."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per judge actor."""
    num_gpus_per_actor: float = 0.0
    """GPUs reserved per judge actor (reward models)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per judge actor."""
    accelerator_type: Optional[str] = None
    """Ray accelerator type per judge actor."""
    max_restarts: int = 3
    """Times a dead judge actor is replaced (its batch retried) before the run stops."""
    batch_size: int = 64
    """Samples per judge call."""
    pairing: Pairing = "best_worst"
    """``best_worst``: one pair per prompt, its best and worst sample; ``margin``: every pair of
    samples whose reward gap exceeds ``margin``."""
    margin: float = 0.0
    """Minimum reward gap of a pair (a gap at or below it is a tie: no pair, counted)."""
    max_failed_fraction: float = 0.05
    """The run stops when a round's share of samples the judge failed on (quarantined) exceeds this."""


@dataclass
class OnlineConfig:
    rounds: int = 3
    """Rounds of generate -> judge -> reference -> train -> sync."""
    prompts_per_round: int = 64
    """Prompts drawn (seeded, without replacement within a round) from the training prompts per round."""
    steps_per_round: int = 0
    """Optimizer steps per round over the round's pairs (cycling through them); 0: use ``epochs_per_round``."""
    epochs_per_round: int = 1
    """Passes over the round's pairs when ``steps_per_round`` is 0."""
    sync_every: int = 1
    """Push the policy's weights to the generators every this many rounds (and always after the last)."""
    checkpoint_every: int = 1
    """Checkpoint the trainer (DeepSpeed state, through Ray Train) every this many rounds; a re-run
    of the command resumes after the latest checkpointed round."""
    eval_prompts: int = 16
    """Held-out prompts (from ``data.eval``, else set aside from the training prompts) whose mean
    reward is each round's progress number; 0: none."""
    eval_greedy: bool = True
    """Held-out samples greedy (true) or sampled with a fixed seed (false)."""
    keep: Keep = "last"
    """The weights ``output.dir/model`` holds: ``last``, the trainer's after the last round; ``best``,
    those whose held-out reward was the highest (the initial model's included: each round's
    held-out reward is of the weights synced at the end of the round before, the run's final one of
    the last weights), so it needs ``eval_prompts`` > 0. ``best`` keeps the best weights' state dict
    in Ray's object store (beside the latest synced one, until its reward is measured) and, when
    they are not the last, writes them over the trainer's export at the end, as a full model: with
    LoRA and ``output.save_adapter_only`` that is the merged weights, not an adapter. After a resume
    the rounds before it compete only through the initial model (their weights are gone).
    ``summary.json`` says which weights were kept (``kept_round``, 0: the initial model)."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """The generator actor pool."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The reward: a Python function or a reward model, and how pairs are made."""


def online_checks(o: OnlineConfig, lr_scheduler: str) -> list[tuple[bool, str]]:
    """(ok, message) rules of the ``online`` section (checked by ``raydpo online`` before any stage)."""
    g, j = o.generator, o.judge
    return [
        (o.rounds >= 1, "online.rounds must be >= 1"),
        (o.prompts_per_round >= 1, "online.prompts_per_round must be >= 1"),
        (o.steps_per_round >= 0 and o.epochs_per_round >= 1, "online.steps_per_round must be >= 0 and online.epochs_per_round >= 1"),
        (o.sync_every >= 1 and o.checkpoint_every >= 1, "online.sync_every and online.checkpoint_every must be >= 1"),
        (o.eval_prompts >= 0, "online.eval_prompts must be >= 0"),
        (o.keep == "last" or o.eval_prompts > 0, "online.keep: best picks the weights by their held-out reward: "
                                                 "online.eval_prompts must be > 0"),
        (g.num_actors >= 1 and j.num_actors >= 1, "online.generator.num_actors and online.judge.num_actors must be >= 1"),
        (g.samples_per_prompt >= 2, "online.generator.samples_per_prompt must be >= 2: pairs are made among a prompt's samples"),
        (g.max_new_tokens >= 1 and g.batch_size >= 1 and j.batch_size >= 1,
         "online.generator.max_new_tokens, online.generator.batch_size and online.judge.batch_size must be >= 1"),
        (g.temperature > 0 and 0 < g.top_p <= 1 and g.top_k >= 0,
         "online.generator: temperature must be > 0, top_p in (0, 1], top_k >= 0"),
        ((j.reward_fn is None) != (j.reward_model is None),
         "online.judge: set exactly one of reward_fn (module:function) and reward_model (a sequence-classification directory)"),
        (j.reward_fn is None or j.reward_fn.count(":") == 1, "online.judge.reward_fn must be module:function, e.g. raydpo.fixtures.synthetic:count_on_reward"),
        (j.margin >= 0 and 0 <= j.max_failed_fraction <= 1, "online.judge: margin must be >= 0 and max_failed_fraction in [0, 1]"),
        # A round's step count follows the pairs it made; a decaying schedule needs the total in advance.
        (o.steps_per_round > 0 or lr_scheduler == "constant",
         "online.epochs_per_round gives each round as many steps as its pairs fill, unknown in advance: with "
         f"train.lr_scheduler={lr_scheduler} set online.steps_per_round (the schedule then spans rounds x steps_per_round)"),
    ]
