"""Batch output (one JSON per item plus a manifest) to a local folder and to a real S3 server.

The batches are built through ``pipeline.storage`` exactly as the producer and workers leave
them: a success with its result, a duplicate sharing it, a failure, a rejection, an item still
queued, and a file that changed at the same path between two scans (two items, one source).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.outputs.records import records
from pipeline.outputs.files import (
    FolderOutput,
    OutputError,
    S3Output,
    _Uploader,
    open_output,
    write_batch_output,
)
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Item, ItemStatus, Result
from tests.s3server import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, S3Server, _free_ports, make_client

BATCH = "20260301-101500-ab12"
ROOT = "file:///data/scans/"
# A synthetic ID number (valid shape, not a real person's): it must never reach an output name.
ID_NUMBER = "110101199003074514"
# Pieces of source keys that would leak who is on the card if copied into object names.
PERSONAL = ("张三", ID_NUMBER, "李四", "王五", "changed", "bulk", "人员", "正面", "反面")


def _sha(ch: str) -> str:
    return ch * 64


def _result(item_id: int, name: str, **fields: Any) -> Result:
    return Result(
        item_id=item_id,
        provider="sandbox",
        side="front",
        name=name,
        gender="男",
        ethnicity="汉",
        date_of_birth="1990-03-07",
        domicile="北京市东城区某街道1号",
        id_number=ID_NUMBER,
        quality=["blur"],
        checks={"id_number_checksum": {"ok": True}},
        raw={"code": 2},
        **fields,
    )


def make_batch(url: str, batch: str = BATCH, bulk: int = 0) -> dict[str, int]:
    """The batch described in the module docstring (+ ``bulk`` extra items); key → item id."""
    ids: dict[str, int] = {}
    with unit_of_work(url) as s:
        repo.get_or_create_batch(s, batch, ROOT, "sandbox")
        rows = [
            repo.NewItem(f"张三 {ID_NUMBER} 正面.jpg", "", "sha256:" + _sha("a"), sha256=_sha("a")),
            repo.NewItem("copy/张三 副本.jpg", "", "sha256:" + _sha("a"), sha256=_sha("a")),
            repo.NewItem("李四/反面.png", "", "sha256:" + _sha("b"), sha256=_sha("b")),
            repo.NewItem("bad/empty.jpg", "", "size:0", status=ItemStatus.REJECTED, reason="empty"),
            repo.NewItem("王五 待处理.jpg", "", "sha256:" + _sha("c"), sha256=_sha("c")),
            repo.NewItem("changed.jpg", "", "etag:v1", etag="v1"),
        ]
        rows += [
            repo.NewItem(f"bulk/人员-{i:04d}.jpg", "", f"sha256:{i:064x}", sha256=f"{i:064x}")
            for i in range(bulk)
        ]
        for r in rows:
            r.source_uri = ROOT + r.source_key
        for item in repo.add_items(s, batch, rows):
            ids[item.source_key] = item.id
        # The file at changed.jpg was replaced between two scans: a second item, same source.
        (again,) = repo.add_items(
            s, batch, [repo.NewItem("changed.jpg", ROOT + "changed.jpg", "etag:v2", etag="v2")]
        )
        ids["changed.jpg#2"] = again.id

        first = ids[f"张三 {ID_NUMBER} 正面.jpg"]
        repo.set_status(s, first, ItemStatus.SUCCEEDED, code="0", ocrid="ocr-1", attempts=1)
        s.add(_result(first, "张三"))
        repo.set_status(
            s, ids["李四/反面.png"], ItemStatus.FAILED, code="4010", msg="blurred", attempts=3
        )
        repo.set_status(s, ids["changed.jpg"], ItemStatus.SUCCEEDED, code="0", attempts=1)
        s.add(_result(ids["changed.jpg"], "旧版本"))
        repo.set_status(s, ids["changed.jpg#2"], ItemStatus.FAILED, code="4004", attempts=1)
        for i in range(0, bulk, 2):
            item_id = ids[f"bulk/人员-{i:04d}.jpg"]
            repo.set_status(s, item_id, ItemStatus.SUCCEEDED, code="0", attempts=1)
            s.add(_result(item_id, f"人员{i}"))
    return ids


def expected_records(url: str, batch: str = BATCH) -> list[dict[str, Any]]:
    with unit_of_work(url) as s:
        return [json.loads(json.dumps(r, ensure_ascii=False)) for r in records(s, batch)]


def write(url: str, sink: Any, batch: str = BATCH, **kw: Any) -> Any:
    with unit_of_work(url) as s:
        return write_batch_output(s, batch, sink, **kw)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative POSIX path → bytes), hidden temp files included."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_no_personal_names(names: list[str]) -> None:
    for name in names:
        for piece in PERSONAL:
            assert piece not in name, f"output name {name!r} carries part of a source key"


def check_output(
    files: dict[str, bytes], expected: list[dict[str, Any]], batch: str = BATCH
) -> None:
    """The documents of one output: results, manifest lines and summary agree with the DB."""
    summary = json.loads(files[f"{batch}/manifest.json"])
    assert summary["batch"] == batch and summary["version"] == 1
    assert summary["records"] == len(expected)
    assert summary["counts"] == dict(Counter(r["status"] for r in expected))
    assert summary["manifest"] == "manifest.jsonl" and summary["results"] == "results/"
    created = datetime.fromisoformat(summary["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0

    lines = files[f"{batch}/manifest.jsonl"].decode("utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == len(expected)
    results = {name for name in files if name.startswith(f"{batch}/results/")}
    assert results == {f"{batch}/{e['result']}" for e in entries}, "one document per entry"
    assert len({e["result"] for e in entries}) == len(entries), "no two items share a name"
    for entry, rec in zip(entries, expected, strict=True):
        assert entry == {
            "source": rec["source"],
            "key": rec["key"],
            "status": rec["status"],
            "result": entry["result"],
        }
        body = files[f"{batch}/{entry['result']}"]
        assert json.loads(body.decode("utf-8")) == rec
    assert set(files) == results | {f"{batch}/manifest.json", f"{batch}/manifest.jsonl"}
    assert_no_personal_names(list(files))


# -- local folder --------------------------------------------------------------------------------


def test_folder_output(db_url: str, tmp_path: Path) -> None:
    ids = make_batch(db_url)
    out = tmp_path / "deliveries" / "acme"  # does not exist yet
    sink = open_output(str(out))
    assert isinstance(sink, FolderOutput) and out.is_dir()

    report = write(db_url, sink)
    expected = expected_records(db_url)
    assert len(expected) == 7
    files = tree(out)
    check_output(files, expected)
    assert report.records == 7
    assert report.manifest == str(out / BATCH / "manifest.json")
    assert report.counts == dict(sorted(Counter(r["status"] for r in expected).items()))
    # A duplicate carries its original's answer (pipeline.outputs.records).
    assert report.counts == {"failed": 2, "queued": 1, "rejected": 1, "succeeded": 3}

    # Each document is the record as UTF-8 (not \\u escapes), indented.
    entries = [json.loads(x) for x in files[f"{BATCH}/manifest.jsonl"].splitlines()]
    by_key = {e["key"]: e for e in entries}
    first = files[f"{BATCH}/{by_key[f'张三 {ID_NUMBER} 正面.jpg']['result']}"]
    assert '\n  "name": "张三",' in first.decode("utf-8")
    # The name is the item id, padded: stable, unique, says nothing about the card.
    assert by_key["bad/empty.jpg"]["result"] == f"results/{ids['bad/empty.jpg']:012d}.json"
    # The file replaced at the same path: two items, two documents, each its own answer.
    changed = [e for e in entries if e["key"] == "changed.jpg"]
    assert [e["status"] for e in changed] == ["succeeded", "failed"]
    assert changed[0]["result"] != changed[1]["result"]
    # Result files hold ID data: not readable by other users.
    assert (out / BATCH / changed[0]["result"]).stat().st_mode & 0o077 == 0

    # Rerun after progress: the same names are overwritten, none added, the news is in.
    queued = ids["王五 待处理.jpg"]
    with unit_of_work(db_url) as s:
        repo.set_status(s, queued, ItemStatus.SUCCEEDED, code="0", attempts=1)
        s.add(_result(queued, "王五"))
    report2 = write(db_url, open_output(str(out)), chunk=2)
    files2 = tree(out)
    expected2 = expected_records(db_url)
    check_output(files2, expected2)
    assert set(files2) == set(files)
    assert report2.counts == {"failed": 2, "rejected": 1, "succeeded": 4}
    doc = json.loads(files2[f"{BATCH}/results/{queued:012d}.json"])
    assert doc["status"] == "succeeded" and doc["name"] == "王五"
    # unchanged items: byte-identical documents
    same = f"{BATCH}/results/{ids['bad/empty.jpg']:012d}.json"
    assert files2[same] == files[same]


class FailingFolder(FolderOutput):
    """A folder whose ``fail_at``-th put fails (a full disk, say), optionally threaded."""

    def __init__(self, root: Path, fail_at: int, concurrency: int) -> None:
        super().__init__(root)
        self.concurrency = concurrency
        self.fail_at = fail_at
        self.calls = 0
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes, content_type: str) -> None:
        with self._lock:
            self.calls += 1
            n = self.calls
        if n == self.fail_at:
            raise OutputError(f"cannot write {self.location(name)}: No space left on device")
        time.sleep(0.002)
        super().put(name, data, content_type)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_failed_output_writes_no_manifest_and_reruns(
    sqlite_url: str, tmp_path: Path, concurrency: int
) -> None:
    make_batch(sqlite_url, bulk=40)
    out = tmp_path / "out"
    sink = FailingFolder(out, fail_at=5, concurrency=concurrency)
    with pytest.raises(OutputError, match="No space left"):
        write(sqlite_url, sink, chunk=7)
    left = tree(out)
    assert f"{BATCH}/manifest.json" not in left and f"{BATCH}/manifest.jsonl" not in left
    assert not [n for n in left if Path(n).name.startswith(".")], "no temp files left behind"
    # The first failure stops the run: not every record was attempted.
    assert sink.calls < 20
    # The rerun completes the same output.
    write(sqlite_url, FolderOutput(out))
    check_output(tree(out), expected_records(sqlite_url))


def test_uploader_bounds_pending_puts(tmp_path: Path) -> None:
    """With slow puts, the producer blocks at 2 × threads pending: memory stays flat."""
    release = threading.Event()
    done: list[str] = []

    class Slow:
        concurrency = 2

        def put(self, name: str, data: bytes, content_type: str) -> None:
            release.wait(10)
            done.append(name)

    submitted = 0

    def produce() -> None:
        nonlocal submitted
        with _Uploader(Slow()) as up:  # type: ignore[arg-type]
            for i in range(20):
                up.submit(f"r/{i}", b"x" * 1000, "application/json")
                submitted += 1
            up.finish()

    t = threading.Thread(target=produce)
    t.start()
    deadline = time.monotonic() + 5
    while submitted < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert submitted == 4, "2 running + 2 queued, then submit waits"
    release.set()
    t.join(10)
    assert (
        not t.is_alive() and submitted == 20 and sorted(done) == sorted(f"r/{i}" for i in range(20))
    )


def test_validation(sqlite_url: str, tmp_path: Path) -> None:
    make_batch(sqlite_url)
    sink = FolderOutput(tmp_path / "o")
    for bad in ("../x", "a/b", ".hidden", "", "x" * 65):
        with pytest.raises(ValueError, match="batch id"):
            write(sqlite_url, sink, batch=bad)
    with pytest.raises(OutputError, match="no batch 'nope'"):
        write(sqlite_url, sink, batch="nope")
    for name in ("../escape.json", "/abs.json", "a//b.json", "a/./b.json", "a\\b.json"):
        with pytest.raises(ValueError, match="not a relative output name"):
            sink.put(name, b"{}", "application/json")
    assert not (tmp_path / "escape.json").exists()
    with pytest.raises(ValueError, match="unsupported output location scheme 'gs'"):
        open_output("gs://bucket/x")
    with pytest.raises(ValueError, match="S3"):
        open_output("s3://")


# -- S3 --------------------------------------------------------------------------------------------


@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials through the standard chain (env vars), no profile, no IMDS lookups."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)


def s3_tree(server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents") or ():
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"].removeprefix(prefix)] = body
    return out


def _without_created_at(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    doc.pop("created_at")
    return doc


@pytest.mark.s3
def test_s3_output(
    sqlite_url: str, s3_server: S3Server, s3_bucket: str, aws_env: None, tmp_path: Path
) -> None:
    make_batch(sqlite_url, bulk=150)
    expected = expected_records(sqlite_url)
    sink = open_output(f"s3://{s3_bucket}/exports/2026", endpoint_url=s3_server.endpoint_url)
    assert isinstance(sink, S3Output) and sink.concurrency == 8
    with sink:
        report = write(sqlite_url, sink, chunk=25)
    assert report.records == len(expected) == 157
    assert report.manifest == f"s3://{s3_bucket}/exports/2026/{BATCH}/manifest.json"
    objects = s3_tree(s3_server, s3_bucket, "exports/2026/")
    check_output(objects, expected)
    # Nothing outside the prefix.
    assert set(s3_tree(s3_server, s3_bucket, "")) == {f"exports/2026/{k}" for k in objects}

    # Byte for byte what the folder output holds (bar the manifest's timestamp).
    write(sqlite_url, FolderOutput(tmp_path / "local"))
    local = tree(tmp_path / "local")
    assert set(local) == set(objects)
    for name, data in local.items():
        if name.endswith("manifest.json"):
            assert _without_created_at(objects[name]) == _without_created_at(data)
        else:
            assert objects[name] == data, name

    client = s3_server.client()
    some_result = next(n for n in objects if "/results/" in n)
    head = client.head_object(Bucket=s3_bucket, Key=f"exports/2026/{some_result}")
    assert head["ContentType"] == "application/json"
    head = client.head_object(Bucket=s3_bucket, Key=f"exports/2026/{BATCH}/manifest.jsonl")
    assert head["ContentType"] == "application/x-ndjson"

    # Rerun: the same keys, overwritten, none added.
    with open_output(
        f"s3://{s3_bucket}/exports/2026/", endpoint_url=s3_server.endpoint_url
    ) as again:
        write(sqlite_url, again)
    assert set(s3_tree(s3_server, s3_bucket, "exports/2026/")) == set(objects)


@pytest.mark.s3
def test_s3_no_such_bucket_fails_fast(sqlite_url: str, s3_server: S3Server, aws_env: None) -> None:
    make_batch(sqlite_url)
    started = time.monotonic()
    with (
        S3Output("s3://no-such-bucket-here/out", endpoint_url=s3_server.endpoint_url) as sink,
        pytest.raises(OutputError) as info,
    ):
        write(sqlite_url, sink)
    assert time.monotonic() - started < 5.0, "NoSuchBucket is not retried"
    message = str(info.value)
    assert "'no-such-bucket-here'" in message and "'out/'" in message
    # SeaweedFS answers a PUT into a missing bucket with AccessDenied, AWS with NoSuchBucket:
    # both are fatal, neither retried.
    assert "NoSuchBucket" in message or "AccessDenied" in message
    assert DUMMY_SECRET_KEY not in message and DUMMY_ACCESS_KEY not in message


@pytest.mark.s3
def test_s3_unreachable_endpoint_fails_after_bounded_retries(
    sqlite_url: str, aws_env: None
) -> None:
    make_batch(sqlite_url, bulk=30)
    (port,) = _free_ports(1)  # nothing listens there: connection refused
    client = make_client(
        f"http://127.0.0.1:{port}", retries={"total_max_attempts": 1, "mode": "standard"}
    )
    sends: list[str] = []
    lock = threading.Lock()

    def count(**_: Any) -> None:
        with lock:
            sends.append("put")

    client.meta.events.register("before-send.s3.PutObject", count)
    sink = S3Output(
        "s3://results-bucket/deliveries/acme",
        client=client,
        max_workers=2,
        retry_attempts=3,
        retry_wait=0.01,
        retry_max_wait=0.05,
    )
    started = time.monotonic()
    with pytest.raises(OutputError) as info:
        write(sqlite_url, sink)
    assert time.monotonic() - started < 10.0
    message = str(info.value)
    assert "bucket 'results-bucket' prefix 'deliveries/acme/'" in message
    assert "EndpointConnectionError" in message or "connect" in message.lower()
    assert DUMMY_SECRET_KEY not in message and DUMMY_ACCESS_KEY not in message
    assert_no_personal_names([message])
    # 3 attempts for each put that was under way (2 threads, 4 pending at most), then stop.
    assert 3 <= len(sends) <= 3 * 4


def test_open_output_s3_parses_location(aws_env: None) -> None:
    sink = open_output("s3://my-bucket/a/b", endpoint_url="http://127.0.0.1:9")
    assert isinstance(sink, S3Output)
    assert (sink.bucket, sink.prefix) == ("my-bucket", "a/b/")
    assert sink.location("x/manifest.json") == "s3://my-bucket/a/b/x/manifest.json"
    sink.close()


def test_records_query_items_in_id_order(sqlite_url: str) -> None:
    """The pairing of records with item ids relies on records() ordering by item id."""
    make_batch(sqlite_url, bulk=5)
    with unit_of_work(sqlite_url) as s:
        ids = list(
            s.scalars(select(Item.source_uri).where(Item.batch_id == BATCH).order_by(Item.id))
        )
        assert [r["source"] for r in records(s, BATCH)] == ids


@pytest.mark.s3
def test_s3_put_file_multipart(
    s3_server: S3Server, s3_bucket: str, aws_env: None, tmp_path: Path
) -> None:
    """A manifest of millions of lines goes up as a multipart upload (over 8 MiB)."""
    big = tmp_path / "manifest.jsonl"
    line = json.dumps({"source": "s3://b/k", "status": "succeeded", "result": "results/1.json"})
    big.write_text((line + "\n") * (9 * 1024 * 1024 // (len(line) + 1) + 1))
    with S3Output(f"s3://{s3_bucket}/m", endpoint_url=s3_server.endpoint_url) as sink:
        sink.put_file("b/manifest.jsonl", big, "application/x-ndjson")
    got = s3_server.client().get_object(Bucket=s3_bucket, Key="m/b/manifest.jsonl")
    assert got["Body"].read() == big.read_bytes()
    assert "-" in got["ETag"], "a multipart upload's ETag"


def test_folder_put_file_across_file_systems(tmp_path: Path) -> None:
    """A spool file on another file system (a tmpfs /tmp) is copied in atomically."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to copy from")
    src = shm / f"idocr-test-{time.monotonic_ns()}.jsonl"
    src.write_bytes(b'{"a": 1}\n' * 1000)
    try:
        sink = FolderOutput(tmp_path / "o")
        sink.put_file("b/manifest.jsonl", src, "application/x-ndjson")
        assert (tmp_path / "o" / "b" / "manifest.jsonl").read_bytes() == src.read_bytes()
        assert [p.name for p in (tmp_path / "o" / "b").iterdir()] == ["manifest.jsonl"]
    finally:
        src.unlink(missing_ok=True)
