"""The S3 source against a real S3 server (SeaweedFS), plus its pure parsing/classification.

Faults (throttling, 5xx) are injected with botocore's own ``before-send`` hook, which answers
a request in place of the server: everything else—signing, parsing, retries—runs as in
production.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import botocore.exceptions as bexc
import httpx
import pytest
from botocore.awsrequest import AWSResponse

from pipeline.sources.base import SourceError
from pipeline.s3 import is_transient, parse_s3_uri
from pipeline.sources.s3 import ObjectNotFound, ObjectTooLarge, S3Source
from tests.s3server import (  # noqa: F401 - the fixtures register on import
    DUMMY_ACCESS_KEY,
    DUMMY_SECRET_KEY,
    S3Server,
    s3_bucket_fixture,
    s3_server_fixture,
)

# -- pure: URI parsing and error classification -------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("s3://scans", "scans", ""),
        ("s3://scans/", "scans", ""),
        ("s3://scans/2024", "scans", "2024/"),
        ("s3://scans/2024/", "scans", "2024/"),
        ("S3://scans/a/b", "scans", "a/b/"),
        ("s3://scans/身份证 扫描/%20+?#", "scans", "身份证 扫描/%20+?#/"),
    ],
)
def test_parse_s3_uri(uri: str, bucket: str, prefix: str) -> None:
    assert parse_s3_uri(uri) == (bucket, prefix)


@pytest.mark.parametrize("uri", ["gs://b/p", "/data/scans", "file:///x", "s3://", "s3:///x", ""])
def test_parse_s3_uri_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match="S3|bucket"):
        parse_s3_uri(uri)


def _client_error(code: str, status: int) -> bexc.ClientError:
    return bexc.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "ListObjectsV2",
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("Whatever", 502), True),
        (_client_error("TooManyRequests", 429), True),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("InvalidAccessKeyId", 403), False),
        (bexc.EndpointConnectionError(endpoint_url="http://x"), True),
        (bexc.ConnectTimeoutError(endpoint_url="http://x"), True),
        (bexc.ReadTimeoutError(endpoint_url="http://x"), True),
        (bexc.ConnectionClosedError(endpoint_url="http://x"), True),
        (bexc.SSLError(endpoint_url="http://x", error="bad cert"), False),
        (bexc.NoCredentialsError(), False),
        (ValueError("x"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_default_client_config() -> None:
    compat = S3Source("s3://b/p", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    cfg = compat.client.meta.config
    # botocore's max_attempts counts retries: 5 of them, 6 requests in all.
    assert cfg.retries == {"total_max_attempts": 6, "mode": "standard"}
    assert cfg.s3 == {"addressing_style": "path"}
    assert cfg.connect_timeout and cfg.read_timeout
    aws = S3Source("s3://b/p", region="eu-west-1")
    assert not (aws.client.meta.config.s3 or {}).get("addressing_style")
    assert compat.uri == "s3://b/p/"


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        S3Source("s3://b", page_size=0)
    with pytest.raises(ValueError):
        S3Source("s3://b", page_size=1001)
    with pytest.raises(ValueError):
        S3Source("/local/folder")


# -- against a real server ----------------------------------------------------------------------

PREFIX = "scans/"
# relative key -> body; every one of these must come back, byte for byte.
WANTED: dict[str, bytes] = {
    "a.jpg": b"\xff\xd8\xff jpeg-ish",
    "with space.jpg": b"space",
    "中文 身份证.png": b"\x89PNG chinese",
    "plus+sign.jpg": b"plus",
    "percent%20literal%.jpg": b"percent",
    "query?and#hash.jpg": b"query",
    "nested/deeper/x.jpeg": b"nested",
    "notes.txt": b"not an image: still listed, rejected later with a reason",
    "dots.in.name..jpg": b"dots",
}
# full keys that exist but must not be yielded
SKIPPED = [
    f"{PREFIX}nested/",  # directory marker
    f"{PREFIX}empty-dir/",  # directory marker with nothing under it
    f"{PREFIX}.DS_Store",
    f"{PREFIX}.hidden/y.jpg",
    f"{PREFIX}nested/._x.jpeg",  # AppleDouble
    f"{PREFIX}legacy_$folder$",  # Hadoop placeholder
]
OUTSIDE = ["scans-old/z.jpg", "other/w.jpg", "scans", "scansx.jpg"]


@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Dummy credentials through the standard chain (env vars), no profile, no IMDS lookups."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture()
def populated(s3_server: S3Server, s3_bucket: str) -> str:
    client = s3_server.client()
    for rel, body in WANTED.items():
        client.put_object(Bucket=s3_bucket, Key=PREFIX + rel, Body=body)
    for key in SKIPPED + OUTSIDE:
        body = b"" if key.endswith(("/", "$folder$")) else b"x"
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    return s3_bucket


def _fill(server: S3Server, bucket: str, n: int, prefix: str = "p/") -> list[str]:
    client = server.client()
    keys = [f"obj-{i:03d}.jpg" for i in range(n)]
    for k in keys:
        client.put_object(Bucket=bucket, Key=prefix + k, Body=k.encode())
    return keys


class SendLog:
    """Records every HTTP request of one operation; can answer some with a canned error."""

    def __init__(self, fail: Callable[[int, Any], int | None] | None = None) -> None:
        self.urls: list[str] = []
        self._fail = fail

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        self.urls.append(request.url)
        status = self._fail(len(self.urls), request) if self._fail else None
        if status is None:
            return None  # let botocore send it
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>'
            + (b"SlowDown" if status == 503 else b"InternalError")
            + b"</Code><Message>injected</Message></Error>"
        )
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))


class _Raw:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def _watch(source: S3Source, operation: str, log: SendLog) -> SendLog:
    source.client.meta.events.register(f"before-send.s3.{operation}", log)
    return log


def _no_retry_client(server: S3Server) -> Any:
    """botocore retries off, so a test counts exactly the attempts S3Source itself makes."""
    return server.client(retries={"total_max_attempts": 1, "mode": "standard"})


@pytest.mark.s3
def test_iter_refs_yields_exactly_the_objects(
    s3_server: S3Server, populated: str, aws_env: None
) -> None:
    source = S3Source(f"s3://{populated}/{PREFIX}", endpoint_url=s3_server.endpoint_url)
    refs = list(source.iter_refs())
    by_key = {r.key: r for r in refs}
    assert len(by_key) == len(refs), "no key twice"
    assert set(by_key) == set(WANTED)
    for rel, body in WANTED.items():
        ref = by_key[rel]
        assert ref.uri == f"s3://{populated}/{PREFIX}{rel}"
        assert ref.size == len(body)
        assert ref.etag == hashlib.md5(body).hexdigest()  # single-part ETag, quotes stripped
        assert ref.error is None
        assert source.read_bytes(rel) == body


@pytest.mark.s3
def test_prefix_without_slash_is_a_folder(
    s3_server: S3Server, populated: str, aws_env: None
) -> None:
    # "s3://b/scans" must not pick up scans-old/… or scansx.jpg
    source = S3Source(f"s3://{populated}/scans", endpoint_url=s3_server.endpoint_url)
    assert {r.key for r in source.iter_refs()} == set(WANTED)


@pytest.mark.s3
def test_whole_bucket(s3_server: S3Server, populated: str, aws_env: None) -> None:
    source = S3Source(f"s3://{populated}", endpoint_url=s3_server.endpoint_url)
    keys = {r.key for r in source.iter_refs()}
    assert keys == {PREFIX + k for k in WANTED} | set(OUTSIDE)


@pytest.mark.s3
def test_pagination(s3_server: S3Server, s3_bucket: str) -> None:
    keys = _fill(s3_server, s3_bucket, 7)
    source = S3Source(f"s3://{s3_bucket}/p", client=s3_server.client(), page_size=2)
    log = _watch(source, "ListObjectsV2", SendLog())
    assert [r.key for r in source.iter_refs()] == keys  # S3 order: UTF-8 binary
    assert len(log.urls) == 4  # 2 + 2 + 2 + 1


@pytest.mark.s3
def test_iter_refs_is_lazy(s3_server: S3Server, s3_bucket: str) -> None:
    _fill(s3_server, s3_bucket, 7)
    source = S3Source(f"s3://{s3_bucket}/p", client=s3_server.client(), page_size=2)
    log = _watch(source, "ListObjectsV2", SendLog())
    refs = source.iter_refs()
    assert log.urls == []  # a generator: nothing requested before the first next()
    next(refs)
    next(refs)
    assert len(log.urls) == 1
    next(refs)
    assert len(log.urls) == 2


@pytest.mark.s3
def test_start_after_resumes(s3_server: S3Server, s3_bucket: str) -> None:
    keys = _fill(s3_server, s3_bucket, 7)
    source = S3Source(f"s3://{s3_bucket}/p/", client=s3_server.client(), page_size=2)
    assert [r.key for r in source.iter_refs(start_after=keys[2])] == keys[3:]


@pytest.mark.s3
def test_transient_page_failure_resumes_from_token(s3_server: S3Server, s3_bucket: str) -> None:
    keys = _fill(s3_server, s3_bucket, 7)
    source = S3Source(
        f"s3://{s3_bucket}/p",
        client=_no_retry_client(s3_server),
        page_size=2,
        retry_wait=0.01,
        retry_max_wait=0.05,
    )
    # The 3rd request (page 3) is throttled twice, then a 500, then let through.
    log = _watch(
        source,
        "ListObjectsV2",
        SendLog(lambda n, _req: {3: 503, 4: 503, 5: 500}.get(n)),
    )
    got = [r.key for r in source.iter_refs()]
    assert got == keys, "every key exactly once, in order: pages 1-2 are not listed again"
    assert len(log.urls) == 4 + 3
    # The retried requests carried the token page 2 ended with; none restarted from scratch.
    retried = log.urls[2:6]
    assert len(set(retried)) == 1 and "continuation-token=" in retried[0]


@pytest.mark.s3
def test_persistent_failure_is_bounded(s3_server: S3Server, s3_bucket: str) -> None:
    _fill(s3_server, s3_bucket, 3)
    source = S3Source(
        f"s3://{s3_bucket}/p",
        client=_no_retry_client(s3_server),
        page_size=2,
        retry_attempts=3,
        retry_wait=0.01,
        retry_max_wait=0.05,
    )
    log = _watch(source, "ListObjectsV2", SendLog(lambda n, _req: 503 if n > 1 else None))
    refs = source.iter_refs()
    first = [next(refs), next(refs)]
    with pytest.raises(SourceError) as info:
        next(refs)
    assert [r.key for r in first] == ["obj-000.jpg", "obj-001.jpg"]
    assert len(log.urls) == 1 + 3
    message = str(info.value)
    assert s3_bucket in message and "'p/'" in message and "SlowDown" in message


@pytest.mark.s3
def test_no_such_bucket_fails_fast(s3_server: S3Server, aws_env: None) -> None:
    source = S3Source("s3://no-such-bucket-here/x", endpoint_url=s3_server.endpoint_url)
    log = _watch(source, "ListObjectsV2", SendLog())
    started = time.monotonic()
    with pytest.raises(SourceError) as info:
        list(source.iter_refs())
    assert time.monotonic() - started < 2.0
    assert len(log.urls) == 1, "NoSuchBucket is not retried, by botocore or by us"
    message = str(info.value)
    assert "no-such-bucket-here" in message and "NoSuchBucket" in message
    assert DUMMY_SECRET_KEY not in message and DUMMY_ACCESS_KEY not in message


@pytest.mark.s3
def test_unreachable_endpoint_is_retried_then_fails(aws_env: None) -> None:
    from tests.s3server import _free_ports, make_client

    (port,) = _free_ports(1)  # nothing listens there: connection refused
    client = make_client(
        f"http://127.0.0.1:{port}", retries={"total_max_attempts": 1, "mode": "standard"}
    )
    source = S3Source(
        "s3://bucket/p", client=client, retry_attempts=3, retry_wait=0.01, retry_max_wait=0.05
    )
    log = _watch(source, "ListObjectsV2", SendLog())
    with pytest.raises(SourceError, match="cannot list bucket 'bucket' prefix 'p/'"):
        list(source.iter_refs())
    assert len(log.urls) == 3


@pytest.mark.s3
def test_read_bytes_errors(s3_server: S3Server, populated: str, aws_env: None) -> None:
    source = S3Source(f"s3://{populated}/{PREFIX}", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(ObjectNotFound, match=f"object not found: s3://{populated}/scans/gone.jpg"):
        source.read_bytes("gone.jpg")
    assert issubclass(ObjectNotFound, SourceError)
    with pytest.raises(SourceError):
        source.read_bytes("")


@pytest.mark.s3
def test_read_bytes_retries_transient(s3_server: S3Server, populated: str) -> None:
    source = S3Source(
        f"s3://{populated}/{PREFIX}",
        client=_no_retry_client(s3_server),
        retry_wait=0.01,
        retry_max_wait=0.05,
    )
    log = _watch(source, "GetObject", SendLog(lambda n, _req: 503 if n == 1 else None))
    assert source.read_bytes("中文 身份证.png") == WANTED["中文 身份证.png"]
    assert len(log.urls) == 2


@pytest.mark.s3
def test_max_bytes(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="big.jpg", Body=b"x" * 1000)
    client.put_object(Bucket=s3_bucket, Key="fits.jpg", Body=b"x" * 100)
    source = S3Source(f"s3://{s3_bucket}", client=client, max_bytes=100)
    with pytest.raises(ObjectTooLarge, match="1000 bytes, the limit is 100"):
        source.read_bytes("big.jpg")
    assert source.read_bytes("fits.jpg") == b"x" * 100
    unlimited = S3Source(f"s3://{s3_bucket}", client=client, max_bytes=None)
    assert len(unlimited.read_bytes("big.jpg")) == 1000


@pytest.mark.s3
def test_presign(s3_server: S3Server, populated: str, aws_env: None) -> None:
    source = S3Source(f"s3://{populated}/{PREFIX}", endpoint_url=s3_server.endpoint_url)
    for rel in ("中文 身份证.png", "plus+sign.jpg", "query?and#hash.jpg"):
        url = source.presign(rel, expires=60)
        assert url.startswith(s3_server.endpoint_url + f"/{populated}/")
        assert "X-Amz-Signature=" in url  # SigV4
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, response.text
        assert response.content == WANTED[rel]
    with pytest.raises(ValueError):
        source.presign("a.jpg", expires=0)
