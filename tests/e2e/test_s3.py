"""S3 sources as a user runs them: a real S3 server (SeaweedFS), URL mode, rescans, retries,
output prefixes."""

from __future__ import annotations

import json
from pathlib import Path

from idocr_sandbox.server import FaultPlan
from tests.conftest import EXAMPLES
from tests.e2e.test_cli import BAD, TRUTH, assert_exact, export, idocr, ihuyi_env


def upload_examples(s3_server, bucket: str, prefix: str = "cards") -> None:  # type: ignore[no-untyped-def]
    client = s3_server.client()
    for path in sorted((EXAMPLES / "images").rglob("*")):
        if path.is_file():
            key = f"{prefix}/" + path.relative_to(EXAMPLES / "images").as_posix()
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def s3_env(sandbox, s3_server, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return ihuyi_env(
        sandbox, IDOCR_S3_ENDPOINT_URL=s3_server.endpoint_url, AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1", **extra,
    )


def test_url_mode_sends_presigned_urls_not_bytes(tmp_path: Path, sandbox_factory, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    upload_examples(s3_server, s3_bucket)
    sandbox = sandbox_factory()
    env = s3_env(sandbox, s3_server)
    res = idocr("run", f"s3://{s3_bucket}/cards", "--via", "url", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = export(env, tmp_path)
    for entry in TRUTH:
        rec = records[entry["file"].removeprefix("images/")]
        assert rec["status"] == "succeeded", rec
        assert {k: rec[k] for k in entry["fields"]} == entry["fields"]
    # without the bytes, only what the first bytes tell is checked before paying: empty and
    # non-images are refused; a truncated, tiny or black-and-white image goes to the provider
    assert (records["bad/empty.jpg"]["status"], records["bad/empty.jpg"]["reason"]) == ("rejected", "empty")
    assert (records["bad/notes.txt"]["status"], records["bad/notes.txt"]["reason"]) == ("rejected", "not_image")
    assert sandbox.stats.by_endpoint.get("ihuyi.submit", 0) == len(TRUTH) + 3
    # every submission was by URL: the worker never read the bytes, so it knows no sha256
    assert not any(r["sha256"] for r in records.values() if r["status"] == "succeeded")
    # the URL is never logged
    log = (tmp_path / ".idocr" / "logs" / "worker.log").read_text()
    assert "X-Amz-Signature" not in log


def test_rescanning_a_prefix_enqueues_nothing_and_output_prefix(tmp_path: Path, sandbox_factory, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    upload_examples(s3_server, s3_bucket)
    # an identical copy under another key: sent once, found by its bytes in the worker
    client = s3_server.client()
    client.copy_object(Bucket=s3_bucket, Key="cards/copy of 高娟.jpg",
                       CopySource={"Bucket": s3_bucket, "Key": "cards/高娟 正面.jpg"})
    sandbox = sandbox_factory()
    env = s3_env(sandbox, s3_server)
    out = f"s3://{s3_bucket}/results"
    res = idocr("run", f"s3://{s3_bucket}/cards", "--batch", "night1", "--output", out, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sandbox.stats.billed == len(TRUTH)
    records = export(env, tmp_path, "night1")
    pair = [records["copy of 高娟.jpg"], records["高娟 正面.jpg"]]
    assert {r["status"] for r in pair} == {"succeeded"} and pair[0]["name"] == pair[1]["name"]
    # whichever a worker met first was sent; the other points at it and made no call
    dup, orig = sorted(pair, key=lambda r: r["duplicate_of"] is None)
    assert dup["duplicate_of"] == orig["source"] and dup["attempts"] == 0

    # the output prefix: one JSON per image and a manifest
    keys = [o["Key"] for p in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="results/") for o in p.get("Contents", [])]
    manifest = json.loads(client.get_object(Bucket=s3_bucket, Key="results/night1/manifest.json")["Body"].read())
    assert manifest["records"] == len(TRUTH) + len(BAD) + 1
    assert sum(1 for k in keys if k.startswith("results/night1/results/")) == manifest["records"]

    # the next night: a new batch over the same prefix sends nothing again
    res = idocr("scan", f"s3://{s3_bucket}/cards", "--batch", "night2", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "0 queued" in res.stderr and f"{len(TRUTH) + 1} already_succeeded" in res.stderr
    # ...and the same batch again adds nothing at all
    res = idocr("scan", f"s3://{s3_bucket}/cards", "--batch", "night1", env=env, cwd=tmp_path)
    assert "0 queued" in res.stderr and "already in the batch" in res.stderr
    assert sandbox.stats.billed == len(TRUTH)


def test_retry_failed_requeues_only_transient_failures(tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory(faults=FaultPlan(codes={"4010": 1.0}))
    env = ihuyi_env(sandbox, IDOCR_MAX_ATTEMPTS="2", IDOCR_RETRY_INITIAL="0.01", IDOCR_RETRY_MAX="0.02")
    res = idocr("run", str(EXAMPLES / "images"), "--batch", "b", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = export(env, tmp_path, "b")
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == len(TRUTH) and {r["reason"] for r in failed} == {"transient"}

    sandbox.set_faults(FaultPlan())
    res = idocr("run", str(EXAMPLES / "images"), "--batch", "b", "--retry-failed", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_exact(export(env, tmp_path, "b"))
    assert sandbox.stats.billed == len(TRUTH)  # the failed channel calls were not billed
