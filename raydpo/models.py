"""Loading policies, references and tokenizers from local directories or hub ids."""

from __future__ import annotations

import functools
import os

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


#: Separates a hub id from the commit it was pinned to (``org/name@<40 hex>``): what the driver
#: ships to the workers, so every node loads the very files the driver fingerprinted.
REVISION_SEP = "@"


def split_revision(name_or_path: str) -> tuple[str, str | None]:
    """(hub id or path, pinned revision or None)."""
    head, sep, tail = name_or_path.rpartition(REVISION_SEP)
    if sep and head and "/" not in tail and not os.path.exists(os.path.expanduser(name_or_path)):
        return head, tail
    return name_or_path, None


def resolve_local(name_or_path: str) -> str:
    """A local directory for ``name_or_path`` on this node: itself if it is one, else the hub
    snapshot of that id (at its pinned revision ``id@commit`` if given), from this node's Hugging Face
    cache or downloaded into it.

    Resolving hub ids to a snapshot directory lets the cache fingerprint the exact files used.
    """
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name_or_path!r} is not a Hugging Face model directory")
    repo, revision = split_revision(name_or_path)
    return _snapshot(repo, revision)


@functools.lru_cache(maxsize=16)
def _snapshot(repo: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:  # this node's cache first: no network call for a revision it already holds
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached here (or partly): download it
        pass
    try:
        return snapshot_download(repo, revision=revision)
    except Exception as e:  # offline machines, private repos, typos: say which id and why
        at = f" at revision {revision}" if revision else ""
        raise FileNotFoundError(f"cannot resolve model {repo!r}{at} locally or on the hub: {e} "
                                "(gated or private models need HF_TOKEN on every node)") from e


def pin(name_or_path: str) -> str:
    """What the driver ships to the workers for a model setting: a local directory as an absolute
    path; a hub id as ``id@<commit>``, the revision the driver resolved (and fingerprinted), which
    each node then loads into its own Hugging Face cache (or finds in a shared one)."""
    local = resolve_local(name_or_path)
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return local
    repo, revision = split_revision(name_or_path)
    # A hub snapshot directory is named after its commit: .../models--org--name/snapshots/<commit>.
    return f"{repo}{REVISION_SEP}{revision or os.path.basename(local)}"


def hidden_size(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """The model's hidden size from its config (a multimodal config's text part), or None."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_local(name_or_path), trust_remote_code=trust_remote_code)
    return getattr(config.get_text_config(), "hidden_size", None)


def weights_bytes(name_or_path: str) -> int:
    """Bytes of the model's weight files on this node's disk (0 where none are found)."""
    from raydpo.reference.cache import WEIGHT_FILES

    root = resolve_local(name_or_path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(root) for f in names if f.endswith(WEIGHT_FILES))


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` of the model directory (the class transformers picks, whose
    ids raydpo's data actors reproduce: :mod:`raydpo.data.tokenizer`), with a pad token (EOS if it
    has none, as TRL does). Cached per directory and file times: the driver asks for it in several
    stages, and some classes rebuild a large vocabulary's pipeline on every load."""
    path = resolve_local(name_or_path)
    return _load_tokenizer(path, trust_remote_code, files_stamp(path))


def files_stamp(path: str) -> tuple:
    """(name, size, mtime) of every file in a model directory but its weights: what ``AutoTokenizer``
    may read (the tokenizer files, ``config.json`` whose ``model_type`` picks the class, remote code),
    so a memo keyed on it never outlives an edit of any of them."""
    from raydpo.reference.cache import WEIGHT_FILES

    found = []
    for f in sorted(os.listdir(path)):
        full = os.path.join(path, f)
        if not f.endswith(WEIGHT_FILES) and os.path.isfile(full):
            st = os.stat(full)
            found.append((f, st.st_size, st.st_mtime_ns))
    return tuple(found)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, trust_remote_code: bool, _stamp: tuple):
    from raydpo.data.tokenizer import auto_tokenizer

    return ensure_pad_token(auto_tokenizer(path, trust_remote_code), path)


def ensure_pad_token(tok, name: str):
    """``tok`` with a pad token: its own, else EOS; neither is an error (batches need one to pad with)."""
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an EOS token: batches need one to pad "
                             "with; add a pad token to the tokenizer (tokenizer.add_special_tokens({'pad_token': ...}))")
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(quantization: str | None, dtype: str):
    """A bitsandbytes config for ``8bit`` / ``4bit`` (NF4, computing in ``dtype``), or None."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(dtype))


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, frozen: bool = False,
                   quantization: str | None = None, device: str | None = None, attn_implementation: str | None = None,
                   disable_dropout: bool = True):
    """``AutoModelForCausalLM`` in ``dtype``, dropout off unless ``disable_dropout`` is False (DPO
    compares log-probs of two passes; TRL disables it too).

    ``device``: where the weights are read to, tensor by tensor (``device_map``: no whole copy in
    host memory first; None and ``cpu``: host memory). ``quantization``: ``8bit`` / ``4bit`` loads
    bitsandbytes-quantized weights onto ``device`` (bitsandbytes 0.50 runs both on CPU too); such a
    model cannot be moved afterwards.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Per-tensor load/save bars animate with carriage returns; from a Ray worker they land in the
    # driver's log (and a job's) as clutter. raydpo's console says what each stage is doing.
    hf_logging.disable_progress_bar()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantization is not None:
        extra["quantization_config"] = quantization_config(quantization, dtype)
    if quantization is not None or (device is not None and str(device) != "cpu"):
        extra["device_map"] = {"": str(device or "cpu")}
    model = AutoModelForCausalLM.from_pretrained(
        resolve_local(name_or_path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **extra
    )
    if disable_dropout or frozen:
        zero_dropout(model)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def zero_dropout(model) -> None:
    """Every dropout probability to 0: ``nn.Dropout`` modules, and the float attributes layers read
    as probabilities for ``nn.functional.dropout`` or layer drop (``dropout``, ``attention_dropout``,
    ``activation_dropout``, ``layerdrop``...: OPT's decoder layers keep ``dropout`` as a float)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and (name == "dropout" or name.endswith("_dropout") or name == "layerdrop"):
                setattr(module, name, 0.0)
