"""Tiny random models of every family users train, each with the tokenizer style its checkpoints ship.

``raydpo tiny-model OUT --family qwen2`` writes one as a normal Hugging Face directory: a random
config of that architecture (2 layers, width 64, sliding windows and soft-capping where the family
has them, experts for MoE families) and a BPE tokenizer trained in-process, saved with the
``tokenizer_class`` real checkpoints of the family name, so ``AutoTokenizer`` rebuilds the
family's own pre-tokenizer and normalizer from it (Qwen2 splits digits, Llama and Gemma are
SentencePiece-style with byte fallback). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from raydpo.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, UNK, corpus

#: Digits and numbers, so multi-digit BPE merges exist and a digit-splitting family differs visibly.
_NUMBERS = ["in 1999 there were 12345 cases, 42 of them in 2024; call 555 0100 at 10:30 or 7 pm",
            "The years 1984, 2001 and 2010 had 365 days; 366 in 2000 and 2020. Pi is 3.14159."]


@dataclass(frozen=True)
class Family:
    """One architecture of the matrix."""

    model_type: str
    """``config.json``'s ``model_type`` (the key ``AutoConfig`` maps to a config class)."""
    config: dict = field(default_factory=dict)
    """Config fields beside the shared sizes (windows, soft-capping, experts, names of the sizes)."""
    tokenizer_class: str = "TokenizersBackend"
    """``tokenizer_class`` written to ``tokenizer_config.json``, as the family's checkpoints do."""
    tokenizer_style: str = "byte_level"
    """``byte_level`` (GPT-2 style BPE) or ``metaspace`` (SentencePiece-style BPE with byte fallback)."""
    note: str = ""
    """What this family exercises that the others do not."""


_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "tie_word_embeddings": False}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _DECODER, "LlamaTokenizer", "metaspace", "rotary, grouped-query attention"),
    "qwen2": Family("qwen2", _DECODER, "TokenizersBackend", "byte_level",
                    "AutoTokenizer swaps in Qwen2Tokenizer (digits split one by one) for a generic tokenizer_class"),
    "qwen3": Family("qwen3", _DECODER, "Qwen2Tokenizer", "byte_level", "q/k norms"),
    "mistral": Family("mistral", _DECODER | {"sliding_window": 24}, "LlamaTokenizer", "metaspace",
                      "a sliding window on every layer (one mask for all layers)"),
    "gemma2": Family("gemma2", _DECODER | {"sliding_window": 24, "final_logit_softcapping": 30.0,
                                           "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16},
                     "GemmaTokenizer", "metaspace", "final-logit and attention soft-capping, alternating sliding layers"),
    "gemma3_text": Family("gemma3_text", _DECODER | {"sliding_window": 24, "query_pre_attn_scalar": 16,
                                                     "layer_types": ["sliding_attention", "full_attention"]},
                          "GemmaTokenizer", "metaspace", "sliding and full layers with their own rotary bases"),
    "phi3": Family("phi3", _DECODER | {"pad_token_id": None}, "LlamaTokenizer", "metaspace", "fused qkv and gate_up projections"),
    "gpt2": Family("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}, "GPT2Tokenizer", "byte_level",
                   "learned absolute positions, Conv1D layers, tied head"),
    "gpt_neox": Family("gpt_neox", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "max_position_embeddings": 1024, "rotary_pct": 0.25},
                       "GPTNeoXTokenizer", "byte_level", "partial rotary, parallel residual"),
    "opt": Family("opt", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "word_embed_proj_dim": 64, "max_position_embeddings": 1024}, "GPT2Tokenizer", "byte_level",
                  "learned positions computed from the attention mask"),
    "mixtral": Family("mixtral", _DECODER | {"num_local_experts": 4, "num_experts_per_tok": 2}, "LlamaTokenizer",
                      "metaspace", "mixture of experts (top-2 of 4), router per token"),
    "qwen2_moe": Family("qwen2_moe", _DECODER | {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                                 "shared_expert_intermediate_size": 64}, "Qwen2Tokenizer", "byte_level",
                        "mixture of experts with a shared expert"),
}


def family_corpus() -> list[str]:
    """The tiny corpus plus numbers (multi-digit merges)."""
    return corpus() + _NUMBERS * 8


def train_tokenizer(style: str, vocab_size: int = 1024, texts: list[str] | None = None):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (default :func:`family_corpus`): ``byte_level``
    is :func:`raydpo.tiny.build_tokenizer`; ``metaspace`` a SentencePiece-style BPE (``▁`` for spaces,
    byte-fallback tokens ``<0x00>``..``<0xFF>``), as Llama, Mistral and Gemma checkpoints ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from raydpo.tiny import build_tokenizer

    texts = texts if texts is not None else family_corpus()
    if style == "byte_level":
        return build_tokenizer(vocab_size, texts)
    if style != "metaspace":
        raise ValueError(f"tokenizer style {style!r}: byte_level or metaspace")
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK] + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024)


def family_config(name: str, tokenizer):
    """A random-initialisable config of family ``name`` sized for ``tokenizer``."""
    from transformers import AutoConfig

    fam = FAMILIES[name]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    return AutoConfig.for_model(fam.model_type, vocab_size=len(tokenizer), **(ids | fam.config))


def write_family_model(out_dir: str | os.PathLike, name: str = "llama", seed: int = 0, vocab_size: int = 1024,
                       texts: list[str] | None = None) -> str:
    """Write a tiny random model of family ``name`` and its tokenizer as a Hugging Face directory.

    The tokenizer is saved, then its ``tokenizer_config.json`` names the family's tokenizer class, so
    what ``AutoTokenizer.from_pretrained(out_dir)`` returns is what a real checkpoint of it gives.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    fam = FAMILIES[name]
    tokenizer = train_tokenizer(fam.tokenizer_style, vocab_size, texts)
    config = family_config(name, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tok_config = json.load(f)
    tok_config["tokenizer_class"] = fam.tokenizer_class
    with open(path, "w") as f:
        json.dump(tok_config, f, indent=1)
    with open(os.path.join(out_dir, "raydpo_tiny.json"), "w") as f:
        json.dump({"family": name, "seed": seed, "vocab_size": vocab_size}, f, indent=1)
    return str(out_dir)
