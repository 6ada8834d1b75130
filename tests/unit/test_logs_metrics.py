"""JSON logs mask PII in every field; metrics add up across processes and read the state."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.logs import configure_logging, mask_structured

ID_NUMBER = "11010119900307001X"
MASKED = "110101********001X"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_mask_message_fields_and_tracebacks(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging(1, "json", buf)
    log = logging.getLogger("idocr.test")
    log.info(
        "item %s read %s",
        7,
        ID_NUMBER,
        extra={
            "id_number": ID_NUMBER,
            "path": f"/scans/{ID_NUMBER}.jpg",
            "holder": {"name": "张三丰"},
            "item_id": 123456789012345678,
            "elapsed_ms": 231,
            "ok": True,
        },
    )
    try:
        raise ValueError(f"cannot read /scans/{ID_NUMBER}.jpg")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert ID_NUMBER not in buf.getvalue()
    assert first["message"] == f"item 7 read {MASKED}"
    assert first["id_number"] == MASKED and first["path"] == f"/scans/{MASKED}.jpg"
    assert first["holder"] == {"name": "张**"}
    # numbers are not PII: an 18-digit item id and a latency pass unchanged
    assert (
        first["item_id"] == 123456789012345678
        and first["elapsed_ms"] == 231
        and first["ok"] is True
    )
    assert first["level"] == "INFO" and first["logger"] == "idocr.test"
    assert first["time"].endswith("+00:00")
    assert MASKED in second["exc_info"] and second["level"] == "ERROR"


def test_text_logs_stay_text(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging(0, "text", buf)
    logging.getLogger("idocr.test").warning("number %s", ID_NUMBER)
    assert buf.getvalue().rstrip().endswith(f"idocr.test: number {MASKED}")
    # Celery hands its level over as a logging level, not a verbosity count
    configure_logging(logging.INFO, "text", buf)
    assert logging.getLogger().level == logging.INFO
    configure_logging("debug", "text", buf)
    assert logging.getLogger().level == logging.DEBUG
    with pytest.raises(ValueError, match="log format"):
        configure_logging(0, "xml", buf)


def test_mask_structured_leaves_non_pii_alone() -> None:
    assert mask_structured("count", 5) == 5
    assert mask_structured("sha256", "ab" * 32) == "ab" * 32
    assert mask_structured("ids", [ID_NUMBER, 3]) == [MASKED, 3]
    assert mask_structured("domicile", "北京市东城区东华门街道1号") == "北京市东城区***"


_RECORD = """
import sys
from pipeline import metrics
metrics.record_call("ihuyi", "ok", "2", 0.3)
metrics.record_call("ihuyi", "transient", "4010", 1.5)
metrics.record_billed("ihuyi")
metrics.record_retry("ihuyi", "transient")
metrics.record_call("ihuyi", "unknown", None, 30.0)
metrics.record_unknown("ihuyi")
metrics.record_limiter_wait(0.02, "ihuyi")
"""

_SERVE = """
from prometheus_client import generate_latest
from pipeline.metrics import build_registry
print(generate_latest(build_registry()).decode())
"""


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_counters_of_every_process_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "PATH": "/usr/bin:/bin"}
    for _ in range(2):  # two worker processes
        subprocess.run([sys.executable, "-c", _RECORD], env=env, check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-c", _SERVE],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    got = _samples(out)
    calls = "idocr_provider_calls_total"
    assert got[(calls, (("code", "2"), ("outcome", "ok"), ("provider", "ihuyi")))] == 2
    assert got[(calls, (("code", "4010"), ("outcome", "transient"), ("provider", "ihuyi")))] == 2
    # one sent and lost, one found in flight on a dead worker, in each process
    assert got[(calls, (("code", ""), ("outcome", "unknown"), ("provider", "ihuyi")))] == 4
    assert got[("idocr_provider_billed_total", (("provider", "ihuyi"),))] == 2
    assert (
        got[("idocr_provider_retries_total", (("outcome", "transient"), ("provider", "ihuyi")))]
        == 2
    )
    assert got[("idocr_provider_unknown_total", (("provider", "ihuyi"),))] == 4
    assert got[("idocr_provider_latency_seconds_count", (("provider", "ihuyi"),))] == 6
    assert (
        got[("idocr_provider_latency_seconds_bucket", (("le", "0.5"), ("provider", "ihuyi")))] == 2
    )
    assert got[("idocr_ratelimit_wait_seconds_count", (("provider", "ihuyi"),))] == 2


def test_a_broken_metric_call_never_raises() -> None:
    from pipeline import metrics

    metrics.record_call("ihuyi", "ok", "2", "not a number")  # type: ignore[arg-type]
    metrics.record_limiter_wait(None)  # type: ignore[arg-type]


@pytest.mark.redis
def test_state_gauges_come_from_sql_and_redis(
    sqlite_url: str, redis_url: str, clean_env: Path
) -> None:
    import redis
    from prometheus_client import generate_latest

    from pipeline.config import Settings
    from pipeline.metrics import build_registry
    from pipeline.coordination.quota import QuotaLedger
    from pipeline.storage import repo
    from pipeline.storage.db import unit_of_work

    settings = Settings(database_url=sqlite_url, redis_url=redis_url, provider="sandbox")
    with unit_of_work(sqlite_url) as s:
        repo.get_or_create_batch(s, "b1", "/in/", "sandbox")
        repo.add_items(
            s, "b1", [repo.NewItem(f"{i}.jpg", f"file:///in/{i}.jpg", f"k:{i}") for i in range(3)]
        )
        repo.add_pause(s, "sandbox", "sandbox", "quota", "quota exhausted")
        repo.add_balance_reading(s, "sandbox", "sandbox", 42)
    client = redis.Redis.from_url(redis_url)
    client.rpush(settings.queue, "m1", "m2")
    QuotaLedger(client, "sandbox", "sandbox").record_reading(40)
    got = _samples(generate_latest(build_registry(settings, state=True)).decode())
    acct = (("account", "sandbox"), ("provider", "sandbox"))
    assert got[("idocr_items", (("batch", "b1"), ("status", "queued")))] == 3
    assert got[("idocr_paused", acct)] == 1
    assert (
        got[
            (
                "idocr_pause_kind",
                (("account", "sandbox"), ("kind", "quota"), ("provider", "sandbox")),
            )
        ]
        == 1
    )
    assert got[("idocr_balance_remaining", acct)] == 42
    assert got[("idocr_queue_depth", (("queue", settings.queue),))] == 2
    assert got[("idocr_quota_remaining", acct)] == 40
    assert got[("idocr_state_up", (("source", "sql"),))] == 1
    assert got[("idocr_state_up", (("source", "redis"),))] == 1

    # a database that does not answer is reported, and the scrape still succeeds
    broken = Settings(database_url=f"sqlite:///{clean_env}/missing/dir/x.db", redis_url=redis_url)
    got = _samples(generate_latest(build_registry(broken, state=True)).decode())
    assert got[("idocr_state_up", (("source", "sql"),))] == 0


def test_a_worker_serves_its_counters_on_the_configured_port(clean_env: Path) -> None:
    import socket
    import urllib.request

    from pipeline import metrics
    from pipeline.config import Settings

    assert metrics.serve_worker_metrics(Settings()) is None  # no port: nothing served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = metrics.serve_worker_metrics(Settings(metrics_port=port))
    try:
        assert metrics.serve_worker_metrics(Settings(metrics_port=port)) is server
        metrics.record_billed("showapi")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as res:
            body = res.read().decode()
        assert 'idocr_provider_billed_total{provider="showapi"}' in body
        # the state gauges are `idocr metrics`'s to serve
        assert "idocr_items{" not in body and "idocr_paused" not in body
    finally:
        server.shutdown()
        metrics._worker_server = None
