"""Messages of several items (IDOCR_TASK_ITEMS): the queue packs ids into one message, the
worker claims them together (one statement on PostgreSQL) and works them one after the other,
with the same money rules as one item a message. Real databases, Redis and sandbox."""

from __future__ import annotations

import base64
import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import event, select

from pipeline.config import Settings
from pipeline.coordination.heartbeat import Heartbeat
from pipeline.coordination.journal import SentMarks
from pipeline.storage import repo
from pipeline.storage.db import engine_for, unit_of_work
from pipeline.storage.models import Attempt, Item, Result
from tests.integration.test_pipeline import copy_examples, items, make_processor, scan_into


def claim_statements(db_url: str) -> list[str]:
    """The claim statements the engine of ``db_url`` runs from now on (a live list)."""
    seen: list[str] = []

    def note(conn, cursor, statement, *_: object) -> None:  # type: ignore[no-untyped-def]
        if "UPDATE ITEMS SET STATUS" in " ".join(statement.upper().split()):
            seen.append(statement)

    event.listen(engine_for(db_url), "before_cursor_execute", note)
    return seen


def examples_and_worker(db_url: str, tmp_path: Path, sandbox, redis_url: str):  # type: ignore[no-untyped-def]
    """The examples scanned (their ids), and a worker with sent marks and a heartbeat."""
    sent, _ = scan_into(db_url, copy_examples(tmp_path / "in"))
    proc = make_processor(db_url, sandbox, redis_url)
    proc.sent_marks = SentMarks(redis.Redis.from_url(redis_url))
    proc.heartbeat = Heartbeat(db_url, "test", interval=60)
    return sent, proc


def test_a_message_of_several_items_bills_each_once_and_a_second_delivery_nothing(
    db_url: str, tmp_path: Path, sandbox_factory, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    sent, proc = examples_and_worker(db_url, tmp_path, sandbox, redis_url)
    claims = claim_statements(db_url)
    statuses = proc.process_many(sent)
    assert statuses.count("succeeded") == 8 and len(statuses) == len(sent) == 11
    assert sandbox.stats.billed == 8 and set(sandbox.stats.billed_by_sha.values()) == {1}
    if db_url.startswith("postgresql"):
        # the eleven claims, with their first attempts, in one statement
        assert len(claims) == 1 and "ANY" in claims[0].upper(), claims
    # the same message delivered again: every item is taken, nothing is sent
    assert proc.process_many(sent) == ["skipped"] * len(sent)
    assert sandbox.stats.billed == 8
    rows = items(db_url)
    assert {r.status for r in rows.values()} == {"succeeded", "rejected"}
    with unit_of_work(db_url, read_only=True) as s:
        # rejected images never left: their attempts (recorded with the claim) were dropped
        assert sorted(a.outcome for a in s.scalars(select(Attempt))) == ["ok"] * 8
    assert not proc.heartbeat.held()  # every claim given back
    # the two sides of one card, in one message: the later one checks the pair
    front, back = rows["高娟 正面.jpg"], rows["高娟 背面.jpg"]
    with unit_of_work(db_url, read_only=True) as s:
        checks = {r.item_id: r.checks for r in s.scalars(select(Result))}
    assert checks[front.id]["valid_period_matches_age"]["with"] == "高娟 背面.jpg"
    assert checks[back.id]["valid_period_matches_age"]["ok"] is True


def test_two_deliveries_of_one_message_at_once_bill_each_image_once(
    db_url: str, tmp_path: Path, sandbox_factory, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    sent, _ = scan_into(db_url, copy_examples(tmp_path / "in"))
    procs = [make_processor(db_url, sandbox, redis_url) for _ in range(2)]
    for i, p in enumerate(procs):
        p.worker_id = f"host:{i}"
        p.sent_marks = SentMarks(redis.Redis.from_url(redis_url))
    out: list[list[str]] = [[], []]
    threads = [
        threading.Thread(target=lambda i=i: out[i].extend(procs[i].process_many(sent)))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sandbox.stats.billed == 8 and set(sandbox.stats.billed_by_sha.values()) == {1}
    for first, second in zip(*out, strict=True):  # each item worked by exactly one of the two
        assert [first, second].count("skipped") == 1, out


def test_an_item_a_dead_worker_left_is_settled_without_paying_twice(
    db_url: str, tmp_path: Path, sandbox_factory, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    sent, _ = scan_into(db_url, copy_examples(tmp_path / "in"))
    lost = next(
        it.id
        for it in items(db_url).values()
        if it.status == "queued" and not it.source_key.startswith("bad/")
    )
    r = redis.Redis.from_url(redis_url)
    # a worker claimed it, recorded its attempt, marked it sent and died
    with unit_of_work(db_url) as s:
        repo.claim_row(s, lost, "dead:1")
        attempt = repo.insert_attempt(s, lost, 1, "sandbox")
    SentMarks(r).mark(attempt)
    proc = make_processor(db_url, sandbox, redis_url)
    proc.sent_marks = SentMarks(r)
    proc.claim_lease = timedelta(0)  # its lease has run out
    statuses = dict(zip(sent, proc.process_many(sent), strict=True))
    assert statuses[lost] == "failed"  # it may have been billed: never sent again
    assert sandbox.stats.billed == 7
    with unit_of_work(db_url, read_only=True) as s:
        item = s.get(Item, lost)
        assert item is not None and item.reason == repo.UNKNOWN
        assert s.get(Attempt, attempt).outcome == "unknown"  # type: ignore[union-attr]


def test_the_queue_packs_ids_into_messages_of_task_items(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDOCR_REDIS_URL", redis_url)
    from workers.queue import CeleryQueue

    settings = Settings(redis_url=redis_url, task_items=4, queue="ocr-test-items")
    client = redis.Redis.from_url(redis_url)
    CeleryQueue(settings).enqueue(list(range(1, 11)))
    bodies = [
        json.loads(base64.b64decode(json.loads(m)["body"]))
        for m in reversed(client.lrange("ocr-test-items", 0, -1))
    ]
    # a list of ids per message; a message of one id carries the id alone
    assert [b[0][0] for b in bodies] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    client.delete("ocr-test-items")
    CeleryQueue(settings).enqueue([42])
    (raw,) = client.lrange("ocr-test-items", 0, -1)
    assert json.loads(base64.b64decode(json.loads(raw)["body"]))[0] == [42]
    client.delete("ocr-test-items")


@pytest.mark.parametrize("bad", [0, 1001])
def test_task_items_is_bounded(bad: int) -> None:
    with pytest.raises(ValueError, match="IDOCR_TASK_ITEMS"):
        Settings(task_items=bad)


def test_a_side_whose_card_has_no_other_side_is_not_looked_up_for_pairing(
    db_url: str, tmp_path: Path, sandbox_factory, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    scan_into(db_url, copy_examples(tmp_path / "in"))
    rows = items(db_url)
    front, back = rows["高娟 正面.jpg"].id, rows["高娟 背面.jpg"].id
    lone = [rows[k].id for k in ("front side 01.png", "back side 02.png", "scan 03 人像面.bmp")]
    proc = make_processor(db_url, sandbox, redis_url)
    lookups: list[str] = []

    def note(conn, cursor, statement, *_: object) -> None:  # type: ignore[no-untyped-def]
        sql = " ".join(statement.upper().split())
        if sql.startswith("SELECT") and "JOIN RESULTS" in sql and "PAIR_KEY" in sql:
            lookups.append(sql)

    event.listen(engine_for(db_url), "before_cursor_execute", note)
    try:
        for item_id in lone:
            assert proc.process(item_id) == "succeeded"
        if db_url.startswith("postgresql"):
            # the answer's statement saw no other item with the card's name: nothing to pair
            assert lookups == []
        lookups.clear()
        # one side while the other waits in the queue, then the other, each a message alone
        assert proc.process(front) == "succeeded"
        assert len(lookups) == 1  # counted: the other side has no result yet
        assert proc.process(back) == "succeeded"
        assert len(lookups) == 3  # counted, then read and checked
    finally:
        event.remove(engine_for(db_url), "before_cursor_execute", note)
    with unit_of_work(db_url, read_only=True) as s:
        checks = {r.item_id: r.checks for r in s.scalars(select(Result))}
    assert checks[front]["valid_period_matches_age"]["with"] == "高娟 背面.jpg"
    assert checks[back]["valid_period_matches_age"]["ok"] is True
    assert all("valid_period_matches_age" not in checks[i] for i in lone)


def test_the_warm_up_writes_nothing_and_the_work_goes_on(
    db_url: str, tmp_path: Path, sandbox_factory, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import func

    from pipeline.storage.models import Event

    sandbox = sandbox_factory()
    sent, _ = scan_into(db_url, copy_examples(tmp_path / "in"))
    proc = make_processor(db_url, sandbox, redis_url)

    def counts() -> tuple[object, ...]:
        with unit_of_work(db_url, read_only=True) as s:
            rows = tuple(s.scalar(select(func.count()).select_from(m)) for m in (Attempt, Result, Event))
            return rows + tuple(sorted((i.id, i.status, i.attempts) for i in s.scalars(select(Item))))

    before = counts()
    ran: list[str] = []

    def note(conn, cursor, statement, *_: object) -> None:  # type: ignore[no-untyped-def]
        ran.append(" ".join(statement.upper().split()))

    event.listen(engine_for(db_url), "before_cursor_execute", note)
    try:
        proc.warm_up(connections=4)
    finally:
        event.remove(engine_for(db_url), "before_cursor_execute", note)
    assert counts() == before  # nothing claimed, closed, inserted or emitted
    if db_url.startswith("postgresql"):
        # the claim and the answer statements (a success, and a refusal) were run once
        assert any("UPDATE ITEMS SET STATUS" in q and "ANY" in q for q in ran)
        assert sum("INSERT INTO EVENTS" in q for q in ran) == 2
        assert sum("INSERT INTO RESULTS" in q for q in ran) == 1
    statuses = proc.process_many(sent)
    assert statuses.count("succeeded") == 8 and sandbox.stats.billed == 8


def test_a_slow_message_gives_its_unsent_items_to_idle_threads(
    db_url: str, tmp_path: Path, sandbox_factory, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    sent, proc = examples_and_worker(db_url, tmp_path, sandbox, redis_url)
    queued: list[list[int]] = []
    proc.enqueue = queued.append
    proc.spare, proc.hand_back_after = (lambda: True), 0.0  # threads idle, the message slow
    statuses = proc.process_many(sent)
    first, rest = sent[0], sent[1:]
    assert statuses[1:] == ["queued"] * len(rest)
    assert queued == [[i] for i in rest]  # a message each
    assert not proc.heartbeat.held()
    rows = {r.id: r for r in items(db_url).values()}
    assert rows[first].status != "queued" and sandbox.stats.billed <= 1
    with unit_of_work(db_url, read_only=True) as s:
        assert {a.item_id for a in s.scalars(select(Attempt))} <= {first}  # no attempt left
    for i in rest:  # as it was before its claim
        assert (rows[i].status, rows[i].attempts, rows[i].claimed_by) == ("queued", 0, None)
    # the idle threads work them: every good image billed once, none lost
    proc.spare = None
    for (i,) in queued:
        proc.process_many([i])
    final = items(db_url)
    assert {r.status for r in final.values()} == {"succeeded", "rejected"}
    assert sandbox.stats.billed == 8 and set(sandbox.stats.billed_by_sha.values()) == {1}
