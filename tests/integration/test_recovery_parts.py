"""The parts recovery is built from, on real databases and Redis: the reconciler's passes, the
answer journal (Redis and its file fallback), sent marks, the claim heartbeat, waiting out an
outage. The whole of it under real faults is in tests/e2e/test_recovery.py."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, update

from pipeline.coordination.heartbeat import Heartbeat
from pipeline.coordination.journal import AnswerJournal, Entry, SentMarks
from pipeline.providers.base import Outcome, ProviderResult
from pipeline.workflows.reconcile import Reconciler, ensure_epoch, epoch_key
from pipeline.coordination.resilience import OutageTooLong, outlast
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Attempt, Item, Result, utcnow
from tests.conftest import EXAMPLES
from tests.integration.test_pipeline import make_processor, scan_into

FIELDS = {"name": "高娟", "gender": "女", "ethnicity": "汉", "date_of_birth": "1959-03-11",
          "domicile": "北京市", "id_number": "11010519590311002X"}


def ok_answer() -> ProviderResult:
    return ProviderResult(Outcome.OK, "2", "提交成功", ocrid="22112900000001", side="front",
                          fields=dict(FIELDS), raw={"code": 2}, http_status=200)


def one_item(db_url: str, tmp_path: Path) -> int:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES / "images" / "高娟 正面.jpg", folder / "a.jpg")
    sent, _ = scan_into(db_url, folder)
    return sent[0]


def reconciler(db_url: str, redis_url: str, sent: list[int], depth: int = 0, journal=None) -> Reconciler:  # type: ignore[no-untyped-def]
    return Reconciler(
        database_url=db_url, redis_client=redis.Redis.from_url(redis_url), queue="ocr",
        enqueue=sent.extend, queue_depth=lambda: depth, claim_lease=10, interval=1,
        provider="sandbox", account="sandbox", journal=journal,
    )


def age(db_url: str, item_id: int, seconds: float, **values: object) -> None:
    """Make the item look as if nothing happened to it for ``seconds``."""
    then = utcnow() - timedelta(seconds=seconds)
    with unit_of_work(db_url) as s:
        s.execute(update(Item).where(Item.id == item_id).values(updated_at=then, **values))


def test_a_journaled_answer_is_written_by_the_reconciler_without_a_call(db_url: str, tmp_path: Path, redis_url: str) -> None:
    item_id = one_item(db_url, tmp_path)
    # a worker claimed the item, was answered, could not write the answer, and died
    with unit_of_work(db_url) as s:
        repo.claim_row(s, item_id, "dead:1")
        attempt = repo.insert_attempt(s, item_id, 1, "sandbox")
    journal = AnswerJournal(redis.Redis.from_url(redis_url), tmp_path / "journal", "dead:1")
    journal.put(Entry(item_id, attempt, "sandbox", "ab" * 32, ok_answer(), "dead:1", 210))
    sent: list[int] = []
    rec = reconciler(db_url, redis_url, sent, journal=journal)
    # within the lease its writer may still be retrying: left alone
    assert rec.run_once().replayed == 0
    age(db_url, item_id, 60, claimed_at=utcnow() - timedelta(seconds=60))
    rep = rec.run_once()
    assert rep.replayed == 1
    with unit_of_work(db_url) as s:
        item = s.get(Item, item_id)
        result = s.get(Result, item_id)
        a = s.get(Attempt, attempt)
    assert (item.status, item.ocrid, item.sha256) == ("succeeded", "22112900000001", "ab" * 32)
    assert result.id_number == FIELDS["id_number"] and "id_number_checksum" in result.checks
    assert (a.outcome, a.elapsed_ms) == ("ok", 210)
    assert journal.get(item_id) is None
    assert sent == []  # written, not sent to the provider again


def test_a_takeover_uses_a_journaled_answer(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    item_id = one_item(db_url, tmp_path)
    with unit_of_work(db_url) as s:
        repo.claim_row(s, item_id, "dead:1")
        attempt = repo.insert_attempt(s, item_id, 1, "sandbox")
    r = redis.Redis.from_url(redis_url)
    journal = AnswerJournal(r, tmp_path / "journal", "dead:1")
    journal.put(Entry(item_id, attempt, "sandbox", None, ok_answer(), "dead:1", 5))
    SentMarks(r).mark(attempt)
    proc = make_processor(db_url, sandbox, redis_url)
    proc.journal = AnswerJournal(r, tmp_path / "journal", "test")
    proc.claim_lease = timedelta(0)
    assert proc.process(item_id) == "succeeded"
    assert sandbox.stats.billed == 0
    assert journal.get(item_id) is None


def test_the_journal_falls_back_to_a_file_and_hands_it_over(tmp_path: Path, redis_url: str) -> None:
    down = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    journal = AnswerJournal(down, tmp_path / "journal", "host:7")
    entry = Entry(5, 9, "ihuyi", None, ok_answer(), "host:7", 100)
    assert journal.put(entry) == "file"
    lines = (tmp_path / "journal" / "host_7.jsonl").read_text(encoding="utf-8").splitlines()
    # the answer is sealed with the data key in the file too, and opens whole
    assert FIELDS["name"] not in lines[0] and json.loads(lines[0])["result"].startswith("enc1:")
    assert Entry.loads(lines[0]).result.fields["name"] == FIELDS["name"]
    up = AnswerJournal(redis.Redis.from_url(redis_url), tmp_path / "journal", "host:8")
    assert up.move_files_to_redis() == 1
    back = up.get(5)
    assert back is not None and back.result == entry.result and back.elapsed_ms == 100
    assert not list((tmp_path / "journal").glob("*.jsonl"))


def test_a_broker_that_lost_its_data_is_fed_again_from_sql(db_url: str, tmp_path: Path, redis_url: str) -> None:
    item_id = one_item(db_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    ensure_epoch(client, "ocr")
    sent: list[int] = []
    rec = reconciler(db_url, redis_url, sent, depth=5)  # messages are waiting: nothing to do
    assert rec.run_once().acted is False and sent == []
    client.delete(epoch_key("ocr"))  # a restart with nothing kept (the test's db is shared)
    rep = rec.run_once()
    assert rep.broker_reset and rep.resent_all == 1 and sent == [item_id]
    assert client.get(epoch_key("ocr")) is not None
    assert rec.run_once().resent_all == 0  # once


def test_lost_messages_are_found_when_the_queue_is_empty(db_url: str, tmp_path: Path, redis_url: str) -> None:
    item_id = one_item(db_url, tmp_path)
    ensure_epoch(redis.Redis.from_url(redis_url), "ocr")
    sent: list[int] = []
    busy = reconciler(db_url, redis_url, sent, depth=3)
    idle = reconciler(db_url, redis_url, sent, depth=0)
    busy.run_once()
    idle.run_once()
    assert sent == []  # just enqueued: within the grace
    age(db_url, item_id, 60)
    busy.run_once()
    assert sent == []  # messages still waiting: its own may be among them
    assert idle.run_once().lost_messages == 1 and sent == [item_id]
    idle.run_once()
    assert sent == [item_id]  # noted: not sent again at every pass


def test_an_abandoned_claim_is_sent_for_takeover_and_a_live_one_is_not(db_url: str, tmp_path: Path, redis_url: str) -> None:
    item_id = one_item(db_url, tmp_path)
    with unit_of_work(db_url) as s:
        repo.claim_row(s, item_id, "w:1")
    sent: list[int] = []
    rec = reconciler(db_url, redis_url, sent, depth=9)
    beat = Heartbeat(db_url, "w:1", interval=60)
    beat.hold(item_id)
    age(db_url, item_id, 60, claimed_at=utcnow() - timedelta(seconds=60))
    assert beat.beat() == 1  # the worker is alive: its heartbeat renews the claim
    assert rec.run_once().stale_claims == 0
    beat.release(item_id)
    beat.stop()
    age(db_url, item_id, 60, claimed_at=utcnow() - timedelta(seconds=60))  # then it died
    assert rec.run_once().stale_claims == 1 and sent == [item_id]


def test_items_parked_by_a_closed_pause_are_queued_again(db_url: str, tmp_path: Path, redis_url: str) -> None:
    item_id = one_item(db_url, tmp_path)
    with unit_of_work(db_url) as s:
        repo.add_pause(s, "sandbox", "sandbox", "operator", "maintenance")
        assert repo.park_if_paused(s, item_id, "sandbox", "sandbox")
    sent: list[int] = []
    rec = reconciler(db_url, redis_url, sent, depth=1)
    assert rec.run_once().unparked == 0  # the pause is open
    with unit_of_work(db_url) as s:
        repo.close_pauses(s, "sandbox", "sandbox", "operator")  # and its resume was lost
    assert rec.run_once().unparked == 1 and sent == [item_id]
    with unit_of_work(db_url) as s:
        assert s.get(Item, item_id).status == "queued"


def test_one_reconciler_pass_at_a_time(db_url: str, redis_url: str) -> None:
    sent: list[int] = []
    rec = reconciler(db_url, redis_url, sent)
    lock = redis.Redis.from_url(redis_url).lock("idocr:reconcile-lock", timeout=10)
    assert lock.acquire(blocking=False)
    try:
        assert rec.run_once().ran is False
    finally:
        lock.release()
    assert rec.run_once().ran is True


def test_sent_marks(redis_url: str) -> None:
    marks = SentMarks(redis.Redis.from_url(redis_url))
    marks.mark(3)
    assert marks.sent([1, 3, 4]) == {3}
    assert marks.sent([]) == set()
    assert 0 < redis.Redis.from_url(redis_url).ttl("idocr:sent:3") <= 7 * 24 * 3600


def test_outages_are_waited_out_and_bugs_are_not() -> None:
    calls = {"n": 0}
    naps: list[float] = []

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError())
        return "done"

    assert outlast(flaky, "step", patience=60, sleep=naps.append) == "done"
    assert calls["n"] == 3 and len(naps) == 2

    def down() -> None:
        raise redis.exceptions.ConnectionError("refused")

    with pytest.raises(OutageTooLong, match="unreachable"):
        outlast(down, "step", patience=0.05, initial=0.01, max_wait=0.01)

    def bug() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        outlast(bug, "step", patience=60, sleep=naps.append)


def test_the_answer_write_waits_out_the_database_and_keeps_the_answer_meanwhile(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Unit of one behaviour: the first write of the answer fails on the database; the answer
    is in the journal before the retry, and gone from it after."""
    import pipeline.workflows.processing as processing

    sandbox = sandbox_factory()
    item_id = one_item(db_url, tmp_path)
    proc = make_processor(db_url, sandbox, redis_url)
    r = redis.Redis.from_url(redis_url)
    proc.journal = AnswerJournal(r, tmp_path / "journal", "test")
    proc.sleep = lambda _: None
    seen: list[bool] = []

    def failing_once(real):  # type: ignore[no-untyped-def]
        def write(session, entry, *args):  # type: ignore[no-untyped-def]
            seen.append(proc.journal.get(entry.item_id) is not None)  # type: ignore[union-attr]
            if len(seen) == 1:
                raise sa_exc.OperationalError("INSERT", {}, ConnectionResetError())
            return real(session, entry, *args)

        return write

    # the answer's write: several statements, or one on PostgreSQL
    for name in ("apply_answer", "apply_answer_at_once"):
        monkeypatch.setattr(processing, name, failing_once(getattr(processing, name)))
    assert proc.process(item_id) == "succeeded"
    assert seen == [False, True]  # journaled before the second try
    assert proc.journal.get(item_id) is None
    assert sandbox.stats.billed == 1
    with unit_of_work(db_url) as s:
        assert [a.outcome for a in s.scalars(select(Attempt))] == ["ok"]


def test_the_worker_counts_its_calls_in_the_metrics(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    sandbox = sandbox_factory()
    item_id = one_item(db_url, tmp_path)
    calls = sample("idocr_provider_calls_total", provider="sandbox", outcome="ok", code="2")
    billed = sample("idocr_provider_billed_total", provider="sandbox")
    done = sample("idocr_items_finished_total", status="succeeded", reason="")
    waits = sample("idocr_ratelimit_wait_seconds_count", provider="sandbox")
    assert make_processor(db_url, sandbox, redis_url).process(item_id) == "succeeded"
    assert sample("idocr_provider_calls_total", provider="sandbox", outcome="ok", code="2") == calls + 1
    assert sample("idocr_provider_billed_total", provider="sandbox") == billed + 1
    assert sample("idocr_items_finished_total", status="succeeded", reason="") == done + 1
    assert sample("idocr_ratelimit_wait_seconds_count", provider="sandbox") == waits + 1


def test_a_worker_cut_off_past_its_lease_does_not_send_what_was_taken_over(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """Worker A claims an item and stalls (its database away for longer than the lease);
    worker B takes the item over and gets the answer. When A comes back it must not send the
    image again: its call is refused by the owner check before the send."""
    import threading

    from pipeline.sources import read_uri

    sandbox = sandbox_factory()
    item_id = one_item(db_url, tmp_path)
    marks = SentMarks(redis.Redis.from_url(redis_url))
    stalled, go_on = threading.Event(), threading.Event()

    def slow_reader(uri: str) -> bytes:
        stalled.set()
        go_on.wait(30)
        return read_uri(uri)

    a = make_processor(db_url, sandbox, redis_url)
    a.worker_id, a.sent_marks, a.reader = "host:a", marks, slow_reader
    b = make_processor(db_url, sandbox, redis_url)
    b.worker_id, b.sent_marks, b.claim_lease = "host:b", marks, timedelta(0)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(a.process(item_id)))
    t.start()
    assert stalled.wait(10)
    assert b.process(item_id) == "succeeded"  # the takeover
    go_on.set()
    t.join(30)
    assert out == ["taken_over"]
    assert sandbox.stats.billed == 1
    with unit_of_work(db_url) as s:
        assert s.get(Item, item_id).status == "succeeded"
        assert [x.outcome for x in s.scalars(select(Attempt))] == ["ok"]
