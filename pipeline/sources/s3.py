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

import boto3
import botocore.exceptions as bexc
from botocore.config import Config
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from pipeline.sources.base import SourceError, SourceRef

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEME = "s3://"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# SigV4 presigned URLs cannot outlive 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600

# Error codes S3 and compatible stores use for "slow down" and "try again"; HTTP 429 and 5xx
# are transient whatever their code says.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
# Whatever status they come with, these are never worth another attempt.
_FATAL_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "NoSuchBucket",
        "NoSuchKey",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "InvalidBucketName",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
    }
)


class ObjectNotFound(SourceError):
    """The key does not exist (any more) in the bucket."""


class ObjectTooLarge(SourceError):
    """The object is bigger than the source's ``max_bytes``; it was not downloaded."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix/")``.

    The prefix is returned as a folder (with a trailing ``/``), or ``""`` for the whole bucket.
    Plain string handling rather than ``urllib.parse``: keys may legitimately contain ``%``,
    ``?`` or ``#``, which URL parsing would decode or cut off.
    """
    if not isinstance(uri, str) or uri[: len(SCHEME)].lower() != SCHEME:
        scheme = uri.split("://", 1)[0] + "://" if isinstance(uri, str) and "://" in uri else uri
        raise ValueError(f"not an S3 URI (expected s3://bucket/prefix): {scheme!r}")
    rest = uri[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError("S3 URI has no bucket name (expected s3://bucket/prefix)")
    if any(ch.isspace() for ch in bucket) or any(ch in bucket for ch in "?#%"):
        raise ValueError(f"invalid S3 bucket name: {bucket!r}")
    prefix = prefix.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_attempts: int = 5,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 10,
) -> Any:
    """A boto3 S3 client on the standard credential chain.

    With an ``endpoint_url`` (MinIO, SeaweedFS, Ceph…) path-style addressing is used: those
    stores rarely have the wildcard DNS that virtual-hosted buckets need. SigV4 everywhere,
    including presigned URLs (botocore would otherwise presign some with the retired SigV2).
    """
    s3_options: dict[str, Any] = {"addressing_style": "path"} if endpoint_url else {}
    config = Config(
        # botocore's max_attempts counts retries, not requests: 5 means up to 6 requests.
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        signature_version="s3v4",
        s3=s3_options,
    )
    # A session of our own: boto3's default session is shared module state, not thread-safe.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _error_code(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def _http_status(exc: bexc.ClientError) -> int:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if isinstance(status, int) else 0


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt: throttling, 5xx, timeouts, dropped connections, short reads."""
    if isinstance(exc, bexc.ClientError):
        code = _error_code(exc)
        if code in _FATAL_CODES:
            return False
        if code in _TRANSIENT_CODES:
            return True
        status = _http_status(exc)
        return status == 429 or status >= 500
    if isinstance(exc, bexc.SSLError):
        return False  # a certificate problem does not fix itself
    return isinstance(
        exc,
        bexc.ConnectionError  # refused, connect timeout, endpoint unreachable
        | bexc.HTTPClientError  # read timeout, connection closed, body stream broken
        | bexc.IncompleteReadError,  # body shorter than Content-Length
    )


def describe_error(exc: BaseException) -> str:
    """A short, credential-free description: the error code and the server's message.

    ``str(ClientError)`` is already credential-free, but some stores echo request details in
    extra fields (``StringToSign``, ``AWSAccessKeyId``); only ``Code`` and ``Message`` are used.
    """
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or f"HTTP {_http_status(exc)}"
        message = error.get("Message") or ""
        return f"{code}: {message}" if message else str(code)
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return "no usable AWS credentials (environment, profile or instance role)"
    if isinstance(exc, bexc.BotoCoreError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


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
        if retry_attempts < 1:
            raise ValueError("retry_attempts must be at least 1")
        self.endpoint_url = endpoint_url
        self.region = region
        self.page_size = page_size
        self.max_bytes = max_bytes
        self.skip_hidden = skip_hidden
        self._retry_attempts = retry_attempts
        self._retry_wait = retry_wait
        self._retry_max_wait = retry_max_wait
        self._retry_deadline = retry_deadline
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
        """Run ``fn`` with bounded, jittered exponential backoff on transient errors only.

        botocore already retries each request (standard mode); this outer layer rides out
        longer outages (a store restarting, sustained throttling) with longer waits, and is
        where the stop condition is bounded by both attempts and elapsed time.
        """
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_random_exponential(multiplier=self._retry_wait, max=self._retry_max_wait),
            stop=stop_after_attempt(self._retry_attempts) | stop_after_delay(self._retry_deadline),
            before_sleep=self._log_retry(what),
            reraise=True,
        )
        return retrying(fn)

    @staticmethod
    def _log_retry(what: str) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "S3 %s failed (attempt %d): %s; retrying in %.1f s",
                what,
                state.attempt_number,
                describe_error(exc) if exc else "?",
                wait,
            )

        return before_sleep

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
                if _error_code(exc) == "InvalidRange":  # an empty object has no byte 0
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
            code = _error_code(exc)
            if code in ("NoSuchKey", "404") or (
                _http_status(exc) == 404 and code != "NoSuchBucket"
            ):
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
