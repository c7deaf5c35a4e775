"""Read an S3 prefix as image records, through boto3.

Endpoint, region and credentials come from the standard settings (``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID`` ..., ``~/.aws``); nothing here logs or stores them.
Listing is paginated, downloads run concurrently, and botocore retries throttling and transient
errors ("standard" retry mode).
"""

from __future__ import annotations

import collections

import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from diffusion.prepare import IMAGE_SUFFIXES, BadFile, DataError, KeyOrdered, Record

RETRIES = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=64)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise DataError(f"data.path = {uri!r}: expected s3://bucket/prefix")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix


def s3_client():
    return boto3.session.Session().client("s3", config=RETRIES)


def _explain(exc: Exception, where: str) -> BadFile:
    """The S3 failure at ``where`` (a bucket or an object URI) as an error that names it; raised
    when listing fails, yielded as a reject row when one object cannot be read."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return BadFile(where, "bucket does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return BadFile(where, f"access denied ({code}); check the credentials and the "
                                  "bucket policy")
        if code in ("NoSuchKey",):
            return BadFile(where, "object disappeared while reading")
        return BadFile(where, f"S3 error {code or type(exc).__name__}")
    if isinstance(exc, NoCredentialsError):
        return BadFile(where, "no AWS credentials found (environment, profile or ~/.aws)")
    if isinstance(exc, EndpointConnectionError):
        return BadFile(where, f"cannot reach the S3 endpoint ({exc.kwargs.get('endpoint_url')})")
    return BadFile(where, type(exc).__name__)


def safe_relative_key(key: str, prefix: str) -> str | None:
    """The key relative to the prefix, or None if it would escape a target directory."""
    if not key.startswith(prefix):
        return None
    rel = key[len(prefix):]
    if prefix and not prefix.endswith("/"):
        if not rel.startswith("/"):
            return None                        # "p" must not match "pq/x.png" as "q/x.png"
        rel = rel[1:]                          # exactly one separator; "p//x" stays absolute
    if not rel or rel.startswith("/") or "\\" in rel:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(rel) != rel:
        return None
    return rel


def list_keys(uri: str, client=None, page_size: int = 1000) -> list[str]:
    """Every image key under the prefix (paginated), sorted."""
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client()
    keys: list[str] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
        for page in pages:
            keys += [o["Key"] for o in page.get("Contents", [])
                     if o["Key"].lower().endswith(IMAGE_SUFFIXES)]
    except Exception as exc:
        raise _explain(exc, uri) from None
    if not keys:
        raise DataError(f"data.path = {uri!r}: no PNG or JPEG objects under this prefix")
    return sorted(keys)


def fetch_record(client, bucket: str, prefix: str, key: str) -> Record | BadFile:
    """One object as a record (class: the first folder below the prefix), or why it cannot be
    used: a key that would escape the target directory is refused without being read."""
    rel = safe_relative_key(key, prefix)
    where = f"s3://{bucket}/{key}"
    if rel is None:
        return BadFile(where, "key would escape the target directory; refused")
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        return _explain(exc, where)
    parts = rel.split("/")
    return Record(where, body, parts[0] if len(parts) > 1 else None)


def s3_records(uri: str, workers: int = 16, client=None, page_size: int = 1000) -> KeyOrdered:
    """Records for every image under ``uri`` in key order, read as they are reached; the class
    is the first folder below the prefix."""
    return KeyOrdered(_s3_records(uri, workers, client, page_size))


def _s3_records(uri: str, workers: int, client, page_size: int) -> Iterator[Record | BadFile]:
    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client()
    keys = list_keys(uri, client, page_size)

    def fetch(key: str) -> Record | BadFile:
        return fetch_record(client, bucket, prefix, key)

    # in key order with at most 2 x workers objects in flight or waiting: memory stays bounded
    # whatever the prefix holds (pool.map would submit every key at once and keep the bodies)
    window = 2 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque(pool.submit(fetch, k) for k in keys[:window])
        ahead = iter(keys[window:])
        try:
            while pending:
                record = pending.popleft().result()
                nxt = next(ahead, None)
                if nxt is not None:
                    pending.append(pool.submit(fetch, nxt))
                yield record
        finally:                          # stopped early (an error, Ctrl-C): drop what has not started
            for future in pending:
                future.cancel()
