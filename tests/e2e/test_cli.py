"""`idocr` as a user runs it: subprocesses, real workers, real Redis and PostgreSQL, the sandbox
over HTTP standing in for the provider (its stats show what was billed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, IDOCR, idocr_env

TRUTH = json.loads((EXAMPLES / "truth.json").read_text(encoding="utf-8"))["images"]
BAD = {
    "bad/empty.jpg": "empty",
    "bad/notes.txt": "not_image",
    "bad/truncated.jpg": "corrupt",
    "bad/tiny.png": "too_small",
    "bad/grayscale.jpg": "grayscale",
}


def idocr(*args: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IDOCR, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def export(env: dict[str, str], cwd: Path, *args: str) -> dict[str, dict]:
    res = idocr("export", *args, env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return {rec["key"]: rec for rec in map(json.loads, res.stdout.splitlines())}


def assert_exact(records: dict[str, dict]) -> None:
    for entry in TRUTH:
        rec = records[entry["file"].removeprefix("images/")]
        assert rec["status"] == "succeeded", rec
        assert rec["side"] == entry["side"]
        assert {k: rec[k] for k in entry["fields"]} == entry["fields"]
    for key, reason in BAD.items():
        assert (records[key]["status"], records[key]["reason"]) == ("rejected", reason), key
    assert len(records) == len(TRUTH) + len(BAD)


def ihuyi_env(sandbox, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return idocr_env(
        IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url,
        IDOCR_IHUYI_ACCOUNT="sandbox", IDOCR_IHUYI_API_KEY="sandbox-key", **extra,
    )


def test_run_on_the_embedded_default(tmp_path: Path) -> None:
    """No configuration at all: embedded Redis, SQLite in ./.idocr, the local OCR engine
    reading the shipped examples' pixels (no truth file involved)."""
    res = idocr("run", str(EXAMPLES / "images"), env=idocr_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / ".idocr" / "idocr.db").is_file()
    assert "succeeded" in res.stderr and "rejected" in res.stderr
    records = export(idocr_env(), tmp_path)
    assert_exact(records)
    assert {r["provider"] for r in records.values() if r["status"] == "succeeded"} == {"local"}
    # nothing personal in what the run printed
    for entry in TRUTH:
        if entry["side"] == "front":
            assert entry["fields"]["id_number"] not in res.stderr + res.stdout


def test_run_through_the_ihuyi_protocol_bills_each_image_once(tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory(latency=0.05)
    env = ihuyi_env(sandbox)
    res = idocr("run", str(EXAMPLES / "images"), "--batch", "nightly", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_exact(export(env, tmp_path, "nightly"))
    assert sandbox.stats.billed == len(TRUTH)
    assert set(sandbox.stats.billed_by_sha.values()) == {1}
    assert "40502" not in json.dumps(sandbox.stats.codes)  # no rejected signature

    # the same folder into the same batch: nothing new, nothing billed
    res = idocr("run", str(EXAMPLES / "images"), "--batch", "nightly", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "0 queued" in res.stderr and "13 already in the batch" in res.stderr
    assert sandbox.stats.billed == len(TRUTH)

    csv_out = tmp_path / "out.csv"
    res = idocr("export", "nightly", "--format", "csv", "--output", str(csv_out), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = csv_out.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("source,key,sha256,batch,status")
    assert len(lines) == 1 + len(TRUTH) + len(BAD)


def test_wrong_key_stops_the_run_and_fails_no_image(tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    env = ihuyi_env(sandbox)
    env["IDOCR_IHUYI_API_KEY"] = "a-wrong-key"
    res = idocr("run", str(EXAMPLES / "images"), env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "refused" in res.stderr and "40502" in res.stderr
    assert "a-wrong-key" not in res.stderr + res.stdout
    records = export(env, tmp_path)
    assert not [r for r in records.values() if r["status"] == "failed"]
    assert sandbox.stats.billed == 0
    st = idocr("status", env=env, cwd=tmp_path)
    assert "paused (auth)" in st.stdout


def _start_worker(env: dict[str, str], cwd: Path, name: str) -> subprocess.Popen[bytes]:
    log = (cwd / f"{name}.log").open("wb")
    return subprocess.Popen(
        [*IDOCR, "worker", "-c", "2", "-n", f"{name}@%h"],
        env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_scan_then_two_workers_on_postgresql_and_redis(tmp_path: Path, sandbox_factory, pg_url: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory(latency=0.05)
    env = ihuyi_env(sandbox, IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url, IDOCR_RATE_LIMIT="50")
    folder = tmp_path / "in"
    shutil.copytree(EXAMPLES / "images", folder)
    res = idocr("scan", str(folder), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    batch = res.stdout.strip()
    assert batch and "\n" not in batch

    workers = [_start_worker(env, tmp_path, "w1"), _start_worker(env, tmp_path, "w2")]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = idocr("status", batch, env=env, cwd=tmp_path)
            if "every item is final" in st.stdout:
                break
            time.sleep(1)
        else:
            pytest.fail("workers did not finish: " + st.stdout + st.stderr + (tmp_path / "w1.log").read_text())
    finally:
        for w in workers:
            _stop(w)
    assert_exact(export(env, tmp_path, batch))
    assert sandbox.stats.billed == len(TRUTH)
    assert set(sandbox.stats.billed_by_sha.values()) == {1}
    # both workers took part
    logs = [(tmp_path / f"w{i}.log").read_text() for i in (1, 2)]
    assert all("idocr.ocr.submit" in log for log in logs), logs

    # scanning the same folder into the same batch enqueues nothing
    res = idocr("scan", str(folder), "--batch", batch, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "0 queued" in res.stderr


def test_every_command_has_help(tmp_path: Path) -> None:
    for cmd in ("run", "scan", "worker", "status", "export", "balance", "sandbox", "pause", "resume", "migrate"):
        res = idocr(cmd, "--help", env=idocr_env(), cwd=tmp_path)
        assert res.returncode == 0 and "Usage:" in res.stdout, cmd


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    res = idocr("run", str(tmp_path / "nope"), env=idocr_env(), cwd=tmp_path)
    assert res.returncode == 1
    assert "no such folder" in res.stderr


def test_run_an_s3_prefix_in_bytes_mode(tmp_path: Path, sandbox_factory, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    client = s3_server.client()
    for path in (EXAMPLES / "images").rglob("*"):
        if path.is_file():
            key = "cards/" + path.relative_to(EXAMPLES / "images").as_posix()
            client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="elsewhere/x.jpg", Body=b"not in the prefix")
    sandbox = sandbox_factory()
    env = ihuyi_env(
        sandbox, IDOCR_S3_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
    )
    res = idocr("run", f"s3://{s3_bucket}/cards", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    records = export(env, tmp_path)
    assert_exact(records)
    rec = records["高娟 正面.jpg"]
    assert rec["source"] == f"s3://{s3_bucket}/cards/高娟 正面.jpg"
    assert rec["sha256"]  # computed by the worker from the bytes it read
    assert sandbox.stats.billed == len(TRUTH)
