"""Create-if-absent on an object store: the one write two racing cache writers must not both win.

A filesystem has an atomic create (``os.link``, see :func:`raydpo.storage.uri.create_exclusive`).
S3 has one too since 2024: a PUT with ``If-None-Match: *`` fails with 412 when the key exists (AWS,
MinIO, Ceph RGW, moto). pyarrow's S3 filesystem cannot send that header, so this module sends it with
boto3, configured from the pyarrow filesystem the URI resolved to (endpoint, scheme, region,
anonymous) and the same standard credential chain. Where no conditional write is possible (no boto3,
a store that answers 501, a scheme other than ``s3``) :func:`put_if_absent` says so and the caller
falls back to check-then-PUT.
"""

from __future__ import annotations

import functools
import time

import pyarrow.fs as pafs

#: Attempts when S3 answers 409 ConditionalRequestConflict (another conditional write to the same
#: key is in flight: AWS asks the client to retry; the retry then sees the key or creates it).
CONFLICT_ATTEMPTS = 5


def put_if_absent(fs: pafs.FileSystem, path: str, data: bytes) -> bool | None:
    """PUT ``data`` at ``path`` ("bucket/key" inside ``fs``) only if no object is there.

    Returns True if this call created it, False if an object was already there (possibly this
    call's own, when a retried request's first attempt had landed: the caller reads it back), and
    None when this store or client offers no conditional write."""
    client = _client_for(fs)
    if client is None:
        return None
    import botocore.exceptions

    bucket, _, key = path.partition("/")
    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except botocore.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:
                return False
            if status == 409 and attempt < CONFLICT_ATTEMPTS - 1:
                time.sleep(0.1 * 2 ** attempt)
                continue
            if status == 501 or (status == 400 and "If-None-Match" in str(e)):
                return None  # a store without conditional writes
            raise OSError(f"conditional write of s3://{path}: {e}") from e
    raise AssertionError("unreachable")


def _client_for(fs: pafs.FileSystem):
    """A boto3 S3 client matching ``fs``, or None (not S3, or boto3 not installed)."""
    if not isinstance(fs, pafs.S3FileSystem):
        return None
    try:
        import boto3  # noqa: F401
    except ImportError:
        return None
    # pyarrow exposes a filesystem's settings only through its pickle form (the keyword arguments
    # it is rebuilt from): endpoint, scheme and region as resolved from the URI and environment.
    options = fs.__reduce__()[1][0]
    return _client(options.get("endpoint_override") or "", options.get("scheme") or "https",
                   options.get("region") or "", bool(options.get("anonymous")))


@functools.lru_cache(maxsize=16)
def _client(endpoint: str, scheme: str, region: str, anonymous: bool):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED) if anonymous else None
    url = None
    if endpoint:
        url = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    return boto3.session.Session().client("s3", endpoint_url=url, region_name=region or None, config=config)
