"""A tiny Llama-architecture model with a real BPE tokenizer, built in-process.

For demos, tests and cluster smoke tests: nothing is downloaded. The tokenizer is a byte-level
BPE trained on a built-in corpus (English prose, chat markers, and the synthetic task's words),
with BOS/EOS/PAD special tokens, a BOS-adding post-processor and a chat template, so the data
pipeline exercises the same code paths as with a real checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from raydpo.synthetic import WORDS

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)

_PROSE = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Direct preference optimization trains a policy to prefer the chosen answer over the rejected one.
The reference model stays frozen; its log probabilities are computed once and cached.
Human: Can you help me with my homework? Assistant: Of course, what is the question?
Human: What is the capital of France? Assistant: The capital of France is Paris.
Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.
Please answer politely and honestly. I am sorry, but I cannot help with that request.
Thank you very much for your question. Here is a short list of ideas you might like.
One two three four five six seven eight nine ten. Monday Tuesday Wednesday Thursday Friday.
system user assistant <|system|> <|user|> <|assistant|> Count on from apple: tiger river
"""


@dataclass
class TinyModelSpec:
    """Sizes of the tiny model. Defaults give about 0.6M parameters with head_dim 64 (vLLM needs >= 32)."""

    vocab_size: int = 1024
    """Target BPE vocabulary size (the trained vocabulary may be slightly smaller)."""
    hidden_size: int = 128
    """Model width."""
    intermediate_size: int = 256
    """MLP width."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 2
    """Attention heads (head_dim = hidden_size / num_heads)."""
    max_position_embeddings: int = 1024
    """Longest sequence the rotary embedding is configured for."""
    seed: int = 0
    """Seed of the random weights."""


def corpus() -> list[str]:
    """The built-in tokenizer training corpus: prose plus every synthetic-task word in context."""
    lines = _PROSE.splitlines()
    lines += [" ".join(WORDS)] + [f"Count on from {w}: " + " ".join(WORDS) for w in WORDS[:4]]
    return lines * 4


def build_tokenizer(vocab_size: int = 1024, texts: list[str] | None = None):
    """Train a byte-level BPE on ``texts`` (default :func:`corpus`) as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: every tokenizer call with add_special_tokens=True starts with BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model(spec: TinyModelSpec, tokenizer):
    """A randomly initialised ``LlamaForCausalLM`` sized by ``spec`` for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def write_tiny_model(out_dir: str | os.PathLike, spec: TinyModelSpec | None = None, tokenizer=None) -> str:
    """Write the tiny model and tokenizer (built from ``spec`` unless given) as a Hugging Face directory."""
    spec = spec or TinyModelSpec()
    tokenizer = tokenizer or build_tokenizer(spec.vocab_size)
    model = build_model(spec, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "raydpo_tiny.json"), "w") as f:
        json.dump(spec.__dict__, f, indent=1)
    return str(out_dir)


def write_tiny_reward_model(out_dir: str | os.PathLike, spec: TinyModelSpec | None = None, tokenizer=None) -> str:
    """A random ``LlamaForSequenceClassification`` with one score (a reward model's shape) and the
    tiny tokenizer, as a Hugging Face directory: the judge of online-DPO tests and demos."""
    import torch
    from transformers import LlamaForSequenceClassification

    spec = spec or TinyModelSpec()
    tokenizer = tokenizer or build_tokenizer(spec.vocab_size)
    config = build_model(spec, tokenizer).config
    config.num_labels = 1
    torch.manual_seed(spec.seed + 1)
    model = LlamaForSequenceClassification(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
