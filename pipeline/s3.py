"""S3 as sources and outputs both use it: parsing ``s3://`` URIs, the client on the standard
credential chain, which errors are worth another attempt, credential-free error descriptions,
and the one retry policy (bounded, jittered backoff on transient errors only, on top of
botocore's own retries)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
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

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEME = "s3://"

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


def error_code(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def http_status(exc: bexc.ClientError) -> int:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if isinstance(status, int) else 0


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt: throttling, 5xx, timeouts, dropped connections, short reads."""
    if isinstance(exc, bexc.ClientError):
        code = error_code(exc)
        if code in _FATAL_CODES:
            return False
        if code in _TRANSIENT_CODES:
            return True
        status = http_status(exc)
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
        code = error.get("Code") or f"HTTP {http_status(exc)}"
        message = error.get("Message") or ""
        return f"{code}: {message}" if message else str(code)
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return "no usable AWS credentials (environment, profile or instance role)"
    if isinstance(exc, bexc.BotoCoreError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class S3Retry:
    """Bounded by attempts and by elapsed time; waits jittered and capped. botocore already
    retries each request (standard mode): this outer layer rides out longer outages (a store
    restarting, sustained throttling)."""

    attempts: int = 5
    wait: float = 0.5
    max_wait: float = 20.0
    deadline: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry_attempts must be at least 1")

    def call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        transient: Callable[[BaseException], bool] = is_transient,
        describe: Callable[[BaseException], str] = describe_error,
    ) -> T:
        """``fn()``, tried again on ``transient`` errors; the last error is raised as it is."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            pause = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "S3 %s failed (attempt %d): %s; retrying in %.1f s",
                what,
                state.attempt_number,
                describe(exc) if exc else "?",
                pause,
            )

        retrying = Retrying(
            retry=retry_if_exception(transient),
            wait=wait_random_exponential(multiplier=self.wait, max=self.max_wait),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.deadline),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)
