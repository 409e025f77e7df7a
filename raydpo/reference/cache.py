"""Content-addressed cache of reference log-probs.

An entry is a directory ``<cache_dir>/<key>/`` holding ``manifest.json`` (every key input spelled
out) and ``data/*.parquet`` (the scored pairs: token ids plus ``ref_chosen_logps`` /
``ref_rejected_logps``). The key is a hash of the manifest's inputs: reference weights, tokenizer
files (chat template included), tokenization settings, the exact token ids scored, dtype and
backend. Entries are written to a temporary directory and renamed into place, so a reader sees a
complete entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid

FORMAT_VERSION = 2
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _hash_files(paths: list[str], root: str) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def fingerprint_model(model_dir: str) -> str:
    """sha256 of the weight and config files' names and bytes."""
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(model_dir)
        for f in names
        # .py: a trust_remote_code model's code decides its outputs as much as its weights.
        if f.endswith(WEIGHT_FILES + (".py",)) or f in CONFIG_FILES
    ]
    if not any(f.endswith(WEIGHT_FILES) for f in files):
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_FILES)}) under {model_dir}")
    return _hash_files(files, model_dir)


def fingerprint_tokenizer(model_dir: str) -> str:
    """sha256 of the tokenizer files, chat template included."""
    files = [os.path.join(model_dir, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(model_dir, f))]
    return _hash_files(files, model_dir)


def data_digest(digests) -> str:
    """Order-independent hash of the per-pair token digests (a multiset: duplicates count)."""
    h = hashlib.sha256()
    n = 0
    for d in sorted(digests):
        h.update(d)
        n += 1
    return f"{n}:{h.hexdigest()}"


def cache_key(inputs: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def entry_dir(cache_dir: str, key: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), key)


def lookup(cache_dir: str, key: str) -> str | None:
    """The entry directory if a complete entry for ``key`` exists."""
    path = entry_dir(cache_dir, key)
    return path if os.path.exists(os.path.join(path, "manifest.json")) else None


def write_entry(cache_dir: str, key: str, inputs: dict, write_data, paths: dict | None = None) -> str:
    """Create the entry atomically: ``write_data(tmp_data_dir)`` writes the parquet shards.

    Returns the entry directory. If another run finished the same entry first, its copy wins.
    """
    final = entry_dir(cache_dir, key)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        write_data(os.path.join(tmp, "data"))
        manifest = {"key": key, "format": FORMAT_VERSION, "created": time.time(), "inputs": inputs, "paths": paths or {}}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if lookup(cache_dir, key) is None:
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(entry: str) -> dict:
    with open(os.path.join(entry, "manifest.json")) as f:
        return json.load(f)
