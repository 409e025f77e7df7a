"""Keys of the content-addressed cache of reference log-probs (what an entry depends on).

An entry ``<cache_dir>/<key>/`` (a local directory or a URI) holds ``manifest.json`` (every key input
spelled out) and its writers' ``w-<time>-<id>/shard-*.parquet`` (the scored pairs: token ids plus
``ref_chosen_logps`` / ``ref_rejected_logps``). The key is a hash of the manifest's inputs: reference
weights, the tokenizer (:func:`raydpo.data.tokenizer.tokenizer_key`: the class ``AutoTokenizer``
picked and its pipeline, and its files), tokenization settings, the exact token ids
scored, dtype and backend. How entries are written, resumed, shared by concurrent writers and
verified: :mod:`raydpo.reference.store` and :mod:`raydpo.storage.entries`.
"""

from __future__ import annotations

import hashlib
import json
import os

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


def _hash_files(paths: list[str], root: str, memo=None) -> str:
    """sha256 over each file's name (relative to ``root``) and digest; the digests from ``memo``
    (:class:`raydpo.storage.fingerprint.StatMemo`: a file whose stat is unchanged is not read
    again; None: every file read)."""
    from raydpo.storage.fingerprint import StatMemo, digests

    found = digests(sorted(paths), memo if memo is not None else StatMemo(None))
    h = hashlib.sha256()
    for path, digest in found.items():
        h.update(os.path.relpath(path, root).encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def fingerprint_model(model_dir: str, memo=None) -> str:
    """sha256 of the weight and config files' names and digests (``memo``: see :func:`_hash_files`)."""
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(model_dir)
        for f in names
        # .py: a trust_remote_code model's code decides its outputs as much as its weights.
        if f.endswith(WEIGHT_FILES + (".py",)) or f in CONFIG_FILES
    ]
    if not any(f.endswith(WEIGHT_FILES) for f in files):
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_FILES)}) under {model_dir}")
    return _hash_files(files, model_dir, memo)


def fingerprint_tokenizer(model_dir: str, memo=None, remote_code: bool = False) -> str:
    """sha256 of the tokenizer files' names and digests, chat template included, and with
    ``remote_code`` (``trust_remote_code``) the directory's ``.py`` files, a remote tokenizer class's
    code. Not the class ``AutoTokenizer`` picks from them: :func:`raydpo.data.tokenizer.tokenizer_key`."""
    names = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(model_dir, f))]
    if remote_code:
        names += sorted(f for f in os.listdir(model_dir) if f.endswith(".py"))
    return _hash_files([os.path.join(model_dir, f) for f in names], model_dir, memo)


def data_digest(digests) -> str:
    """Order-independent hash of the per-pair token digests (a multiset: duplicates count): sha256 of
    the digests' bytes in sorted order. ``digests``: a list of bytes, or a
    :class:`raydpo.data.blocks.Column` (sorted and hashed as arrow arrays, no Python object per pair)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = [c.cast(pa.binary()) for c in digests.arrays()] if hasattr(digests, "arrays") else [pa.chunked_array([list(digests)], pa.binary())]
    chunks = [chunk for part in parts for chunk in part.chunks]
    values = pa.concat_arrays(chunks) if chunks else pa.array([], pa.binary())
    values = values.take(pc.sort_indices(values))
    h = hashlib.sha256()
    if len(values):  # the values' bytes back to back are what hashing each digest in turn feeds in
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
        h.update(memoryview(values.buffers()[2])[offsets[0] : offsets[-1]])
    return f"{len(values)}:{h.hexdigest()}"


def cache_key(inputs: dict) -> str:
    from raydpo.reference.store import FORMAT_VERSION

    blob = json.dumps({"format": FORMAT_VERSION, **inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
