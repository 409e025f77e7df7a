"""Local paths and URIs (:mod:`raydpo.storage.uri`), concurrent-writer cache entries
(:mod:`raydpo.storage.entries`), and the check that every node sees a run's local paths
(:mod:`raydpo.storage.probe`): the one package that opens run and cache files."""

from raydpo.storage.uri import (  # noqa: F401  (the API other modules use)
    MissingFilesystem, append_text, basename, create_exclusive, delete_dir, delete_file, download_dir, exists,
    free_bytes, is_uri, join, kind, listing, local_copy, local_dir_for_writing, makedirs, normalize, parent,
    read_bytes, read_json, read_text, resolve, retried, scheme, sha256_of, upload_dir, write_bytes, write_json, write_text,
)

__all__ = ["MissingFilesystem", "append_text", "basename", "create_exclusive", "delete_dir", "delete_file", "download_dir",
           "exists", "free_bytes", "is_uri", "join", "kind", "listing", "local_copy", "local_dir_for_writing", "makedirs",
           "normalize", "parent", "read_bytes", "read_json", "read_text", "resolve", "retried", "scheme", "sha256_of", "upload_dir",
           "write_bytes", "write_json", "write_text"]
