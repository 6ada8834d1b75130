"""`idocr status` and the export's times on both backends: counts, the latest batch, UTC."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from pipeline.config import Settings
from pipeline.outputs.records import records, write_csv
from pipeline.workflows.status import NoSuchBatch, collect, latest_batch_id
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Attempt, Batch, Item, ItemStatus

ID_NUMBER = "11010119900307001X"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")


def _batch(url: str, batch: str, rows: list[repo.NewItem], created: datetime) -> list[int]:
    with unit_of_work(url) as s:
        repo.get_or_create_batch(s, batch, "/in/", "sandbox")
        ids = [a.id for a in repo.add_items(s, batch, rows)] if rows else []
        s.execute(update(Batch).where(Batch.id == batch).values(created_at=created))
    return ids


def _row(key: str, **kw: object) -> repo.NewItem:
    return repo.NewItem(key, f"file:///in/{key}", f"sha256:{key}", **kw)  # type: ignore[arg-type]


def test_status_counts_rate_and_the_latest_batch_with_items(db_url: str, clean_env: Path) -> None:
    now = datetime.now(UTC)
    ids = _batch(
        db_url,
        "b1",
        [_row(f"{i}.jpg") for i in range(4)]
        + [_row("empty.jpg", status=ItemStatus.REJECTED, reason="empty")],
        now - timedelta(hours=1),
    )
    # a later scan that failed before adding anything: not "the latest"
    _batch(db_url, "b2-empty", [], now)
    with unit_of_work(db_url) as s:
        for n, item_id in enumerate(ids[:2]):
            s.add(
                Attempt(
                    item_id=item_id,
                    number=1,
                    provider="sandbox",
                    started_at=now,
                    outcome="ok",
                    code="2",
                )
            )
            s.execute(
                update(Item)
                .where(Item.id == item_id)
                .values(
                    status=ItemStatus.SUCCEEDED,
                    code="2",
                    claimed_at=now,
                    updated_at=now - timedelta(seconds=n),
                )
            )
    settings = Settings(database_url=db_url)
    with unit_of_work(db_url, read_only=True) as s:
        assert latest_batch_id(s) == "b1"
        st = collect(settings, s, None, live_quota=False)
        with pytest.raises(NoSuchBatch):
            collect(settings, s, "nosuchbatch", live_quota=False)
    assert st.batch == "b1"
    assert st.by_status == {"queued": 2, "succeeded": 2, "rejected": 1}
    assert ("rejected", "empty", 1) in st.by_code and ("succeeded", "2", 2) in st.by_code
    assert st.pending == 2 and not st.final
    assert st.rate_achieved == pytest.approx(2 / 60)
    # two items finished in the last minute, two to go: about a minute
    assert st.eta_seconds == pytest.approx(60.0)
    doc = st.to_dict()
    assert doc["items"]["total"] == 5 and doc["rate"]["limit"] == settings.rate_limit
    assert ISO_UTC.fullmatch(doc["generated_at"])


def test_export_times_are_utc_with_an_offset_on_both_backends(db_url: str) -> None:
    (item_id,) = _batch(db_url, "b", [_row("a.jpg")], datetime.now(UTC))
    stamp = datetime(2026, 11, 21, 16, 0, 0, 123456, tzinfo=UTC)
    with unit_of_work(db_url) as s:
        s.execute(update(Item).where(Item.id == item_id).values(updated_at=stamp))
    with unit_of_work(db_url, read_only=True) as s:
        (rec,) = list(records(s, "b"))
    assert rec["updated_at"] == "2026-11-21T16:00:00.123456+00:00"


def test_excel_csv_keeps_the_id_number_as_text(sqlite_url: str) -> None:
    from pipeline.storage.models import Result

    (item_id,) = _batch(sqlite_url, "b", [_row("a.jpg")], datetime.now(UTC))
    with unit_of_work(sqlite_url) as s:
        s.add(
            Result(
                item_id=item_id,
                provider="sandbox",
                name="张三",
                id_number=ID_NUMBER,
                domicile='=HYPERLINK("http://x")',
                raw={},
            )
        )
        s.execute(update(Item).where(Item.id == item_id).values(status=ItemStatus.SUCCEEDED))
    buf = io.StringIO()
    with unit_of_work(sqlite_url, read_only=True) as s:
        assert write_csv(records(s, "b"), buf, excel=True) == 1
    text = buf.getvalue()
    assert text.startswith("\ufeffsource,")
    (row,) = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    assert row["id_number"] == f'="{ID_NUMBER}"'
    assert row["name"] == "张三"
    assert row["domicile"].startswith("'=")  # a formula in recognised text stays inert
    assert row["attempts"] == "0"  # small numbers stay numbers
    plain = io.StringIO()
    with unit_of_work(sqlite_url, read_only=True) as s:
        write_csv(records(s, "b"), plain)
    (row,) = csv.DictReader(io.StringIO(plain.getvalue()))
    assert not plain.getvalue().startswith("\ufeff") and row["id_number"] == ID_NUMBER


@pytest.mark.redis
def test_status_reads_the_live_quota_ledger(sqlite_url: str, redis_url: str) -> None:
    import redis

    from pipeline.coordination.quota import QuotaLedger

    _batch(sqlite_url, "b", [_row("a.jpg")], datetime.now(UTC))
    client = redis.Redis.from_url(redis_url)
    ledger = QuotaLedger(client, "sandbox", "sandbox")
    ledger.record_reading(50)
    held = ledger.reserve()
    settings = Settings(database_url=sqlite_url, redis_url=redis_url, provider="sandbox")
    with unit_of_work(sqlite_url, read_only=True) as s:
        st = collect(settings, s, "b")
    held.release()
    assert st.quota is not None
    assert (st.quota["remaining"], st.quota["reserved"], st.quota["available"]) == (50, 1, 49)
    assert st.quota_left == 49 and ISO_UTC.fullmatch(st.quota["reading_at"])
    # an unreachable Redis leaves the quota out instead of failing the status
    down = Settings(database_url=sqlite_url, redis_url="redis://127.0.0.1:1/0", provider="sandbox")
    with unit_of_work(sqlite_url, read_only=True) as s:
        assert collect(down, s, "b").quota is None
