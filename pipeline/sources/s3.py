"""An S3 bucket prefix (AWS, or any S3-compatible store: MinIO, SeaweedFS, Ceph RGW).

Listing streams one ``ListObjectsV2`` page at a time, so a bucket of millions of scans never sits
in memory. Each page request is retried on its own (tenacity, on top of botocore's own retries)
and the listing resumes from the continuation token it had reached: a page already yielded is
never yielded again, which matters because the producer is inserting items as they arrive.

Credentials come from boto3's standard chain (environment, shared profile, instance/task role);
nothing here stores or prints them.

Choices:

* ``s3://bucket/prefix`` is read as a folder: ``prefix`` gets a trailing ``/`` so that
  ``s3://b/scans`` does not also pick up ``scans-old/…``. Keys are reported relative to it.
* Directory markers (keys ending in ``/``, and Hadoop's ``…_$folder$`` placeholders) are skipped:
  they are not files.
* As in the folder source, keys with a path segment starting with ``.`` (``.DS_Store``,
  ``._IMG_1.jpg``, ``.Trash/…``) are skipped; everything else, images or not, is yielded and the
  pipeline rejects non-images with a reason.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import botocore.exceptions as bexc

from pipeline.s3 import (
    SCHEME,
    S3Retry,
    describe_error,
    error_code,
    http_status,
    make_s3_client,
    parse_s3_uri,
)
from pipeline.sources.base import SourceError, SourceRef

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# SigV4 presigned URLs cannot outlive 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


class ObjectNotFound(SourceError):
    """The key does not exist (any more) in the bucket."""


class ObjectTooLarge(SourceError):
    """The object is bigger than the source's ``max_bytes``; it was not downloaded."""


class S3Source:
    """Objects under ``s3://bucket/prefix``; ``key`` is always relative to the prefix."""

    #: parsing listings is CPU-heavy: the producer runs it in a process of its own
    list_in_subprocess = True

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        page_size: int = 1000,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        skip_hidden: bool = True,
        retry_attempts: int = 5,
        retry_wait: float = 0.5,
        retry_max_wait: float = 20.0,
        retry_deadline: float = 120.0,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        # Normalised, so s3://b/scans and s3://b/scans/ are one source.
        self.uri = f"{SCHEME}{self.bucket}/{self.prefix}"
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000 (the S3 maximum)")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be positive (or None for no limit)")
        self._retry = S3Retry(retry_attempts, retry_wait, retry_max_wait, retry_deadline)
        self.endpoint_url = endpoint_url
        self.region = region
        self.page_size = page_size
        self.max_bytes = max_bytes
        self.skip_hidden = skip_hidden
        self._given_client = client
        self._client: Any = None
        self._client_pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Source({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    # -- client -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client, created on first use and again in a forked child.

        A client built before a fork (Celery's prefork pool) would share its pooled sockets
        with the parent; so a process only ever uses a client it created itself.
        """
        if self._given_client is not None:
            return self._given_client
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            with self._lock:
                if self._client is None or self._client_pid != pid:
                    self._client = make_s3_client(
                        endpoint_url=self.endpoint_url, region=self.region
                    )
                    self._client_pid = pid
        return self._client

    def close(self) -> None:
        """Close the connection pool of a client this source created (a given one is left be)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._client_pid == os.getpid():
            client.close()

    # -- keys ---------------------------------------------------------------------------------

    def full_key(self, key: str) -> str:
        if not key or key.endswith("/"):
            raise SourceError(f"not an object key: {key!r}")
        return self.prefix + key

    def object_uri(self, key: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.full_key(key)}"

    def _wanted(self, rel: str) -> bool:
        if not rel or rel.endswith(("/", "_$folder$")):
            return False  # directory markers, console-created or Hadoop-style
        return not (self.skip_hidden and any(part.startswith(".") for part in rel.split("/")))

    # -- retries ------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self._retry.call(what, fn)

    # -- listing ------------------------------------------------------------------------------

    def iter_refs(self, *, start_after: str | None = None) -> Iterator[SourceRef]:
        """Yield every object under the prefix, one ``ListObjectsV2`` page at a time.

        ``start_after`` (a relative key) resumes an interrupted listing: S3 lists keys in
        UTF-8 binary order, so everything after it is what remains.

        The pages are requested with an explicit continuation-token loop rather than botocore's
        paginator: a paginator that raised mid-way cannot be resumed without re-encoding its
        token, while here each request is retried on its own and the loop carries on from the
        token it had, so no page is ever listed (and yielded) twice.
        """
        where = f"s3://{self.bucket}/{self.prefix}"
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix,
            "MaxKeys": self.page_size,
        }
        if start_after:
            params["StartAfter"] = self.prefix + start_after
        token: str | None = None
        seen_tokens: set[str] = set()
        page_no = 0
        while True:
            request = dict(params)
            if token is not None:
                request["ContinuationToken"] = token
            page_no += 1
            try:
                page = self._call(
                    f"list {where} (page {page_no})",
                    functools.partial(self.client.list_objects_v2, **request),
                )
            except Exception as exc:  # every failure becomes a SourceError
                raise SourceError(
                    f"cannot list bucket {self.bucket!r} prefix {self.prefix!r} "
                    f"(page {page_no}): {describe_error(exc)}"
                ) from exc
            for obj in page.get("Contents") or ():
                full = obj["Key"]
                rel = full.removeprefix(self.prefix)
                if not self._wanted(rel):
                    continue
                etag = obj.get("ETag")
                yield SourceRef(
                    key=rel,
                    uri=f"{SCHEME}{self.bucket}/{full}",
                    size=obj.get("Size"),
                    etag=etag.strip('"') if etag else None,
                )
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            # A store that says "more" without a new token would loop forever: stop loudly.
            if not token or token in seen_tokens:
                raise SourceError(
                    f"cannot list bucket {self.bucket!r} prefix {self.prefix!r}: the store "
                    f"returned a truncated page {page_no} without a new continuation token"
                )
            seen_tokens.add(token)

    # -- reading ------------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; refuses objects over ``max_bytes`` before downloading them."""
        full = self.full_key(key)
        where = f"s3://{self.bucket}/{full}"
        return self._read(where, lambda: self._get(full, where))

    def read_head(self, key: str, n: int = 1024) -> bytes:
        """The object's first ``n`` bytes (a ranged GET): enough to tell its type."""
        full = self.full_key(key)
        where = f"s3://{self.bucket}/{full}"

        def get() -> bytes:
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes=0-{n - 1}"
                )
            except bexc.ClientError as exc:
                if error_code(exc) == "InvalidRange":  # an empty object has no byte 0
                    return b""
                raise
            body = response["Body"]
            try:
                return body.read(n)
            finally:
                body.close()

        return self._read(where, get)

    def _read(self, where: str, fn: Callable[[], bytes]) -> bytes:
        try:
            return self._call(f"get {where}", fn)
        except SourceError:
            raise
        except bexc.ClientError as exc:
            code = error_code(exc)
            if code in ("NoSuchKey", "404") or (http_status(exc) == 404 and code != "NoSuchBucket"):
                raise ObjectNotFound(f"object not found: {where}") from exc
            raise SourceError(f"cannot read {where}: {describe_error(exc)}") from exc
        except Exception as exc:
            raise SourceError(f"cannot read {where}: {describe_error(exc)}") from exc

    def _get(self, full: str, where: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=full)
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            limit = self.max_bytes
            if limit is not None and length is not None and length > limit:
                # Headers are in, the body is not: closing now downloads nothing more.
                raise ObjectTooLarge(
                    f"object too large: {where} is {length} bytes, the limit is {limit}"
                )
            if limit is None:
                return body.read()
            # No Content-Length (a chunked response): read one byte past the limit to tell.
            data = body.read(limit + 1) if length is None else body.read()
            if len(data) > limit:
                raise ObjectTooLarge(f"object too large: {where} exceeds the limit of {limit}")
            return data
        finally:
            body.close()

    # -- URLs ---------------------------------------------------------------------------------

    def presign(self, key: str, expires: int = 900) -> str:
        """A presigned GET URL for providers that fetch the image themselves.

        Signed locally (no request is made), so it is produced even for a missing key.
        """
        if not 1 <= expires <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires must be between 1 and {MAX_PRESIGN_SECONDS} seconds")
        full = self.full_key(key)
        try:
            url: str = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": full},
                ExpiresIn=expires,
            )
        except Exception as exc:
            raise SourceError(
                f"cannot presign s3://{self.bucket}/{full}: {describe_error(exc)}"
            ) from exc
        return url


_readers: dict[tuple[str, str | None], S3Source] = {}
_readers_lock = threading.Lock()


def open_location(location: str, *, endpoint_url: str | None = None, **_: object) -> S3Source:
    """The S3 source of the scheme registry (:mod:`pipeline.locations`)."""
    return S3Source(location, endpoint_url=endpoint_url)


def _object(uri: str, endpoint_url: str | None) -> tuple[S3Source, str]:
    """The per-bucket source (shared by a worker's threads) and key of ``s3://bucket/key``."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise SourceError("not an s3://bucket/key URI")
    bucket, key = uri[5:].split("/", 1)
    with _readers_lock:
        source = _readers.get((bucket, endpoint_url))
        if source is None:
            source = _readers[(bucket, endpoint_url)] = S3Source(
                f"s3://{bucket}", endpoint_url=endpoint_url
            )
    return source, key


def read_s3_uri(uri: str, *, endpoint_url: str | None = None) -> bytes:
    """The bytes of ``s3://bucket/key`` (what items store)."""
    source, key = _object(uri, endpoint_url)
    return source.read_bytes(key)


def head_s3_uri(uri: str, n: int = 1024, *, endpoint_url: str | None = None) -> bytes:
    source, key = _object(uri, endpoint_url)
    return source.read_head(key, n)


def presign_s3_uri(uri: str, expires: int = 900, *, endpoint_url: str | None = None) -> str:
    source, key = _object(uri, endpoint_url)
    return source.presign(key, expires)
