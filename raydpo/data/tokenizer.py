"""The tokenizer the data actors use: exactly ``AutoTokenizer.from_pretrained(path)``, shipped to them.

Why: transformers picks a tokenizer *class* per directory (``tokenizer_class``, ``model_type``, remote
code) and many classes rebuild the Rust pipeline in ``__init__`` from the vocabulary (Qwen2's splits
digits one by one, Llama's and Gemma's are SentencePiece-style), so loading ``tokenizer.json`` as a
generic fast tokenizer can give other ids than the class users, TRL and vLLM get. raydpo therefore
never guesses the class: the driver runs ``AutoTokenizer`` once (:func:`tokenizer_spec`) and ships

- the pipeline of the tokenizer it returned, serialized (``backend_tokenizer.to_str()``: normalizer,
  pre-tokenizer, model, added tokens, post-processor as that class built them), with the one encoding
  switch kept outside it (``split_special_tokens``);
- its special tokens and its chat template, rendered by transformers' own ``apply_chat_template``;
- probe texts with the ids ``AutoTokenizer`` gave, which every actor re-encodes before its first row.

An actor rebuilds the pipeline in milliseconds with no torch import (:class:`ShippedTokenizer`).
Where ``tokenizer(text)`` is more than that pipeline (a class overriding encoding, a slow Python
tokenizer, remote code) the spec carries no pipeline and each actor loads ``AutoTokenizer`` itself:
slower to start, the same by construction. Either way :mod:`raydpo.data.prompt_cut` analyses the
pipeline actually used.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass

#: Encoding entry points of TokenizersBackend: a class overriding any of them encodes differently
#: from its Rust pipeline alone, and is loaded whole in each actor instead.
ENCODING_METHODS = ("__call__", "_call_one", "_encode_plus", "encode", "encode_plus", "batch_encode_plus", "tokenize",
                    "apply_chat_template", "get_chat_template")
#: Probe texts every actor must tokenize as AutoTokenizer did: digits, accents, whitespace runs,
#: CJK, emoji, a chat marker and the special tokens' own strings (added below).
PROBES = ("in 1999 there were 12345 cases, 3.14 of them", "Human: héllo  wörld\n\n\tAssistant: ok",
          "日本語のテキスト and emoji 🙂", "   leading spaces", "x" * 40 + " 1234567890")


NAMED_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


class TokenizerMismatch(RuntimeError):
    """A tokenizer actor's ids differ from AutoTokenizer's on the driver."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a data actor needs to tokenize exactly as ``AutoTokenizer.from_pretrained(path)`` does."""

    path: str
    """Local directory of the tokenizer."""
    trust_remote_code: bool
    """Passed to AutoTokenizer (remote-code tokenizers are always loaded whole in each actor)."""
    class_name: str
    """The class AutoTokenizer picked (for messages and the summary)."""
    backend_json: str | None
    """That tokenizer's serialized Rust pipeline, or None: actors load AutoTokenizer themselves."""
    split_special_tokens: bool
    """transformers' switch that encodes special-token strings as plain text (kept outside the pipeline)."""
    special_tokens: dict
    """``special_tokens_map`` (bos_token, eos_token, ...), which chat templates read."""
    chat_template: str | dict | None
    """The tokenizer's chat template(s), as transformers holds them."""
    probes: tuple
    """((text, ids with special tokens), ...) from AutoTokenizer, re-checked by every actor."""


def auto_tokenizer(path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(path)``: the class and pipeline transformers picks for ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def encodes_by_pipeline(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` is its Rust pipeline's ``encode`` (no Python-side override)."""
    try:
        from transformers import TokenizersBackend
    except ImportError:  # pragma: no cover - older transformers
        from transformers import PreTrainedTokenizerFast as TokenizersBackend
    if not isinstance(tokenizer, TokenizersBackend) or type(tokenizer).__module__.startswith("transformers_modules"):
        return False
    return all(getattr(type(tokenizer), m, None) is getattr(TokenizersBackend, m, None) for m in ENCODING_METHODS)


def tokenizer_spec(path: str, trust_remote_code: bool = False, tokenizer=None) -> TokenizerSpec:
    """The spec of ``AutoTokenizer.from_pretrained(path)`` (``tokenizer``: that object, if already loaded)."""
    tok = tokenizer if tokenizer is not None else auto_tokenizer(path, trust_remote_code)
    texts = PROBES + tuple(str(t) for t in tok.special_tokens_map.values())
    probes = tuple((t, tuple(tok(t, add_special_tokens=True)["input_ids"])) for t in texts)
    shipped = encodes_by_pipeline(tok)
    return TokenizerSpec(
        path=path, trust_remote_code=trust_remote_code, class_name=type(tok).__name__,
        backend_json=tok.backend_tokenizer.to_str() if shipped else None,
        split_special_tokens=bool(getattr(tok, "split_special_tokens", False)),
        special_tokens=dict(tok.special_tokens_map), chat_template=tok.chat_template, probes=probes,
    )


def tokenizer_identity(spec: TokenizerSpec, files: str) -> dict:
    """What a cache keyed on "the tokenizer" must key on: everything that decides the ids.

    The files alone are not it: ``AutoTokenizer`` picks the class from ``tokenizer_config.json`` and
    ``config.json`` (``model_type``), and many classes rebuild the pipeline from the vocabulary, so the
    same tokenizer files under a ``qwen2`` and a ``qwen3`` config give other ids. Hence the spec the
    driver built (its class, serialized pipeline, ``split_special_tokens``, special tokens, chat
    template, ``trust_remote_code`` and the probes' ids) as a digest, its class spelled out for the
    manifest, plus ``files`` (:func:`raydpo.reference.cache.fingerprint_tokenizer`: what a class loaded
    whole in each actor reads). The spec's ``path`` is left out: the same files elsewhere hit."""
    fields = {k: v for k, v in asdict(spec).items() if k != "path"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()
    return {"class": spec.class_name, "spec": digest, "files": files}


def tokenizer_key(name_or_path: str, trust_remote_code: bool, memo=None) -> dict:
    """:func:`tokenizer_identity` of the driver's tokenizer for a model setting (``memo``: the
    :class:`raydpo.storage.fingerprint.StatMemo` the files are hashed through)."""
    from raydpo.models import resolve_local
    from raydpo.reference.cache import fingerprint_tokenizer

    files = fingerprint_tokenizer(resolve_local(name_or_path), memo, trust_remote_code)
    return tokenizer_identity(driver_tokenizer_spec(name_or_path, trust_remote_code), files)


def driver_tokenizer_spec(name_or_path: str, trust_remote_code: bool = False) -> TokenizerSpec:
    """What the tokenizer actors load: the driver's ``AutoTokenizer`` of ``name_or_path`` (a hub id
    pinned to the revision resolved here). Built once per directory and file times in a process:
    both caches' keys and the data stage ask for it."""
    from raydpo.models import files_stamp, pin, resolve_local

    path = pin(name_or_path)
    return _driver_spec(path, trust_remote_code, files_stamp(resolve_local(path)))


@functools.lru_cache(maxsize=8)
def _driver_spec(path: str, trust_remote_code: bool, _stamp: tuple) -> TokenizerSpec:
    from raydpo.models import load_tokenizer

    return tokenizer_spec(path, trust_remote_code, load_tokenizer(path, trust_remote_code))


class ShippedTokenizer:
    """AutoTokenizer's pipeline rebuilt from a :class:`TokenizerSpec`: the parts raydpo uses
    (``backend_tokenizer``, special tokens, ``apply_chat_template``), with transformers' own chat
    template code run on it."""

    is_fast = True

    def __init__(self, spec: TokenizerSpec):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(spec.backend_json)
        self.backend_tokenizer.encode_special_tokens = spec.split_special_tokens
        self.special_tokens_map = dict(spec.special_tokens)
        self.chat_template = spec.chat_template
        self.name_or_path = spec.path
        for name in NAMED_TOKENS:  # bos_token / bos_token_id ... as transformers exposes them
            token = self.special_tokens_map.get(name)
            setattr(self, name, token)
            setattr(self, name + "_id", None if token is None else self.backend_tokenizer.token_to_id(token))

    def __call__(self, texts, add_special_tokens: bool = True) -> dict:
        """``{"input_ids": ...}`` for a text or a list of texts (as ``tokenizer(texts)``)."""
        one = isinstance(texts, str)
        out = [e.ids for e in self.backend_tokenizer.encode_batch([texts] if one else list(texts),
                                                                  add_special_tokens=add_special_tokens)]
        return {"input_ids": out[0] if one else out}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def get_chat_template(self, chat_template=None, tools=None) -> str:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        return PreTrainedTokenizerBase.get_chat_template(self, chat_template, tools)

    def apply_chat_template(self, conversation, **kwargs):
        """transformers' ``apply_chat_template`` (rendering only: ``tokenize=False``)."""
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        if kwargs.get("tokenize", True):
            raise ValueError("ShippedTokenizer renders chat templates only (tokenize=False)")
        return PreTrainedTokenizerBase.apply_chat_template(self, conversation, **kwargs)


def load_spec(spec: TokenizerSpec):
    """The tokenizer for ``spec`` in an actor, checked against the driver's probes.

    Raises :class:`TokenizerMismatch` (naming the text and both id lists) if it disagrees.
    """
    from raydpo.models import ensure_pad_token, resolve_local

    if spec.backend_json is not None:
        tok = ShippedTokenizer(spec)  # the driver's tokenizer already had its pad token set
    else:  # spec.path may be a hub id pinned to the driver's revision: this node's copy of it
        tok = ensure_pad_token(auto_tokenizer(resolve_local(spec.path), spec.trust_remote_code), spec.path)
    for text, want in spec.probes:
        got = tok(text, add_special_tokens=True)["input_ids"]
        if tuple(got) != tuple(want):
            raise TokenizerMismatch(
                f"tokenizer actor disagrees with AutoTokenizer ({spec.class_name}) of {spec.path} on {text!r}: "
                f"{list(got)[:16]} vs {list(want)[:16]}. Please report this with the tokenizer directory.")
    return tok
