"""The relay on real PostgreSQL (and SQLite), real Redis, a consumer in another process and a
real HTTP receiver: every event published at least once under its id, never twice by design,
webhook deliveries signed, retried and given up on; no personal data in the outbox."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, text

from pipeline.outputs.events import BATCH_FINISHED, ITEM_FINISHED, Outbox, emit
from pipeline.storage import repo
from pipeline.storage.db import engine_for, unit_of_work
from pipeline.storage.models import Event, Item, Request
from pipeline.workflows import relay as relay_mod
from pipeline.workflows.relay import Relay, Webhook, replay, result_key
from tests.conftest import EXAMPLES
from tests.integration.test_pipeline import copy_examples, make_processor, scan_into

TRUTH = json.loads((EXAMPLES / "truth.json").read_text(encoding="utf-8"))["images"]
SECRET = b"whsec-test-only"

CONSUMER = r"""
import json, sys, time, redis
r = redis.Redis.from_url(sys.argv[1], socket_timeout=30)
want, stream = int(sys.argv[2]), sys.argv[3]
seen, last, deadline = [], "0", time.monotonic() + 90
while len(seen) < want and time.monotonic() < deadline:
    got = r.xread({stream: last}, block=1000, count=500)
    if not got:
        continue
    for _, entries in got:
        for entry_id, fields in entries:
            last = entry_id
            seen.append({"event_id": fields[b"event_id"].decode(), "kind": fields[b"kind"].decode(),
                         "body": json.loads(fields[b"body"])})
print(json.dumps(seen, ensure_ascii=False))
"""


def _relay(db_url: str, redis_url: str, **kw: Any) -> Relay:
    return Relay(
        database_url=db_url,
        redis_client=redis.Redis.from_url(redis_url),
        stream="idocr:results",
        **kw,
    )


def _items(db_url: str, n: int, batch: str = "b1") -> list[int]:
    with unit_of_work(db_url) as s:
        repo.get_or_create_batch(s, batch, "/src", "sandbox")
        rows = [
            repo.NewItem(f"{batch}-{i}.jpg", f"/src/{batch}-{i}.jpg", f"sha256:{batch}{i}")
            for i in range(n)
        ]
        return [a.id for a in repo.add_items(s, batch, rows)]


def _finish(db_url: str, ids: list[int], outbox: Outbox) -> None:
    with unit_of_work(db_url) as s:
        for i in ids:
            repo.set_status(s, i, "rejected", reason="corrupt")
            outbox.item_finished(s, i, "rejected", reason="corrupt")


def test_a_consumer_in_another_process_gets_every_item_finished_with_its_record(
    pg_url: str, redis_url: str, tmp_path: Path, sandbox_factory
) -> None:  # type: ignore[no-untyped-def]
    folder = copy_examples(tmp_path / "in")
    sent, _ = scan_into(pg_url, folder)
    proc = make_processor(pg_url, sandbox_factory(), redis_url)
    for item_id in sent:
        proc.process(item_id)
    with unit_of_work(pg_url, read_only=True) as s:
        n_items = s.scalar(select(text("count(*)")).select_from(Item))
        expected = {e.item_id: e.event_id for e in s.scalars(select(Event))}
    assert len(expected) == n_items  # one item.finished per item, scan-time ones included

    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, redis_url, str(n_items + 1), "idocr:results"],
        stdout=subprocess.PIPE,
        text=True,
    )
    rep = _relay(pg_url, redis_url).run_once()
    assert rep.published == n_items + 1 and rep.batches_finished == 1
    out, _ = consumer.communicate(timeout=60)
    got = json.loads(out)
    ids = [g["event_id"] for g in got]
    assert len(ids) == len(set(ids)) == n_items + 1
    finished = {g["body"]["item_id"]: g for g in got if g["kind"] == ITEM_FINISHED}
    assert {k: g["event_id"] for k, g in finished.items()} == expected
    by_number = {
        g["body"]["fields"]["id_number"]: g["body"]
        for g in finished.values()
        if g["body"]["status"] == "succeeded"
    }
    for t in TRUTH:
        if t["side"] == "front" and t["fields"].get("id_number") in by_number:
            body = by_number[t["fields"]["id_number"]]
            assert body["fields"]["name"] == t["fields"]["name"]
            assert body["batch"] == "b1" and body["provider"] == "sandbox" and body["ocrid"]
            assert body["record"]["id_number"] == t["fields"]["id_number"]
    assert len(by_number) >= 3
    [batch_event] = [g["body"] for g in got if g["kind"] == BATCH_FINISHED]
    assert batch_event["total"] == n_items and sum(batch_event["statuses"].values()) == n_items

    # the outbox itself keeps no ID number, name or address in plain text
    with engine_for(pg_url).connect() as c:
        dump = "\n".join(str(r) for r in c.execute(text("SELECT * FROM events")))
    for t in TRUTH:
        for f in ("id_number", "name", "domicile"):
            value = t["fields"].get(f)
            if value:
                assert value not in dump, f
    assert "高娟" not in dump
    # published, and a second pass publishes nothing again
    assert _relay(pg_url, redis_url).run_once().published == 0


def test_two_relays_on_postgresql_publish_each_event_once(pg_url: str, redis_url: str) -> None:
    ids = _items(pg_url, 600)
    _finish(pg_url, ids, Outbox())
    relays = [_relay(pg_url, redis_url, batch=50) for _ in range(3)]
    threads = [threading.Thread(target=r.run_once) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    entries = redis.Redis.from_url(redis_url).xrange("idocr:results")
    published = [e[1][b"event_id"].decode() for e in entries]
    assert len(published) == len(set(published)) == 601  # 600 items and the batch
    with unit_of_work(pg_url, read_only=True) as s:
        assert s.scalar(select(text("count(*)")).select_from(Event).where(
            Event.published_at.is_(None))) == 0


def test_on_sqlite_one_relay_at_a_time(sqlite_url: str, redis_url: str) -> None:
    ids = _items(sqlite_url, 200)
    _finish(sqlite_url, ids, Outbox())
    relays = [_relay(sqlite_url, redis_url, batch=20) for _ in range(2)]
    threads = [threading.Thread(target=r.drain, args=(30,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    published = [e[1][b"event_id"].decode() for e in redis.Redis.from_url(redis_url).xrange("idocr:results")]
    assert len(published) == len(set(published)) == 201


def test_request_result_key_and_batch_extended_finishes_again(db_url: str, redis_url: str) -> None:
    [a] = _items(db_url, 1)
    with unit_of_work(db_url) as s:
        s.add(Request(idempotency_key="order-42", channel="client", status="accepted", item_id=a,
                      batch_id="b1", meta={"customer": "c-1"}))
    _finish(db_url, [a], Outbox())
    r = redis.Redis.from_url(redis_url)
    _relay(db_url, redis_url).run_once()
    body = json.loads(r.get(result_key("order-42")) or b"{}")
    assert body["kind"] == ITEM_FINISHED and body["item_id"] == a
    assert body["request"]["idempotency_key"] == "order-42"
    assert body["request"]["meta"] == {"customer": "c-1"}
    assert 0 < r.ttl(result_key("order-42")) <= 7 * 86400
    [b] = _items(db_url, 1, batch="b1x")  # another batch: b1 is not touched
    with unit_of_work(db_url) as s:
        repo.add_items(s, "b1", [repo.NewItem("late.jpg", "/src/late.jpg", "sha256:late")])
        late = s.scalar(select(Item.id).where(Item.fingerprint == "sha256:late"))
    _finish(db_url, [b, late], Outbox())
    _relay(db_url, redis_url).run_once()
    with unit_of_work(db_url, read_only=True) as s:
        done = [(e.batch_id, e.data["total"]) for e in s.scalars(
            select(Event).where(Event.kind == BATCH_FINISHED).order_by(Event.id))]
    assert done == [("b1", 1), ("b1", 2), ("b1x", 1)] or sorted(done) == [
        ("b1", 1), ("b1", 2), ("b1x", 1)]


class Receiver:
    """A real HTTP server that checks every signature; fails the first ``fail`` posts of each
    event."""

    def __init__(self, fail: int = 0, secret: bytes = SECRET) -> None:
        self.fail = fail
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers["X-Idocr-Timestamp"]
                mac = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                ok_sig = hmac.compare_digest(self.headers["X-Idocr-Signature"], "v1=" + mac)
                fresh = abs(time.time() - int(ts)) < 300
                eid = self.headers["X-Idocr-Event-Id"]
                with receiver.lock:
                    n = sum(1 for p in receiver.posts if p["event_id"] == eid)
                    accept = ok_sig and fresh and n >= receiver.fail
                    receiver.posts.append({
                        "event_id": self.headers["X-Idocr-Event-Id"],
                        "signed": ok_sig,
                        "body": json.loads(body),
                        "accepted": accept,
                    })
                self.send_response(204 if accept else 500)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    made: list[Receiver] = []

    def make(**kw: Any) -> Receiver:
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_a_receiver_failing_three_times_gets_one_delivery(pg_url: str, redis_url: str, receiver) -> None:  # type: ignore[no-untyped-def]
    rx = receiver(fail=3)
    [a] = _items(pg_url, 1)
    _finish(pg_url, [a], Outbox(webhook=True))
    hook = Webhook(url=rx.url, secret=SECRET, timeout=5, retry_for=3600, initial=0.05, max_wait=0.2)
    relay = _relay(pg_url, redis_url, webhook=hook)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        relay.run_once()
        with unit_of_work(pg_url, read_only=True) as s:
            ev = s.scalars(select(Event).where(Event.kind == ITEM_FINISHED)).one()
            if ev.delivery_state == "delivered":
                break
        time.sleep(0.05)
    relay.close()
    assert ev.delivery_state == "delivered" and ev.delivery_attempts == 4 and ev.last_error is None
    mine = [p for p in rx.posts if p["event_id"] == ev.event_id]
    assert [p["accepted"] for p in mine] == [False, False, False, True]
    assert all(p["signed"] for p in rx.posts)
    assert all(p["body"]["event_id"] == ev.event_id for p in mine)


def test_a_receiver_that_never_accepts_ends_dead_then_replayed(pg_url: str, redis_url: str, receiver) -> None:  # type: ignore[no-untyped-def]
    rx = receiver(fail=10**6)
    [a] = _items(pg_url, 1)
    _finish(pg_url, [a], Outbox(webhook=True))
    hook = Webhook(url=rx.url, secret=SECRET, timeout=5, retry_for=0.3, initial=0.05, max_wait=0.1)
    relay = _relay(pg_url, redis_url, webhook=hook)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        relay.run_once()
        with unit_of_work(pg_url, read_only=True) as s:
            ev = s.scalars(select(Event).where(Event.kind == ITEM_FINISHED)).one()
            # the item's event and its batch's: both dead before the replay counts them
            states = set(s.scalars(select(Event.delivery_state)))
        if states == {"dead"}:
            break
        time.sleep(0.05)
    assert ev.delivery_state == "dead" and ev.last_error == "HTTP 500"
    assert "127.0.0.1" not in ev.last_error and "token" not in ev.last_error
    attempts = ev.delivery_attempts
    assert attempts == len([p for p in rx.posts if p["event_id"] == ev.event_id]) >= 3
    with unit_of_work(pg_url) as s:
        assert replay(s, dead=True, webhook=True) == 2  # the item and its batch
    rx.fail = 0
    relay.run_once()
    relay.close()
    with unit_of_work(pg_url, read_only=True) as s:
        ev = s.scalars(select(Event).where(Event.kind == ITEM_FINISHED)).one()
    assert ev.delivery_state == "delivered"
    # the stream got it twice, under the same id
    ids = [e[1][b"event_id"].decode() for e in redis.Redis.from_url(redis_url).xrange("idocr:results")]
    assert ids.count(ev.event_id) == 2


def test_webhook_backoff_plan() -> None:
    hook = Webhook(url="http://x", secret=b"s", retry_for=86400, initial=5, max_wait=1800)
    assert [hook.wait(n) for n in (1, 2, 3, 10, 30)] == [5, 10, 20, 1800, 1800]
    assert not hook.gives_up(10) and hook.gives_up(60)
    total = 0.0
    n = 0
    while not hook.gives_up(n):
        n += 1
        total += hook.wait(n)
    assert 86400 <= total < 86400 + 1800
    assert "http://x" not in repr(hook) and "s" != repr(hook)


def test_unknown_state_refused(pg_url: str) -> None:
    with pytest.raises(ValueError), unit_of_work(pg_url) as s:
        relay_mod.list_events(s, state="lost")
    with pytest.raises(ValueError), unit_of_work(pg_url) as s:
        replay(s)
    with unit_of_work(pg_url) as s:
        emit(s, "queue.paused", data={"provider": "p"})
        assert [e.kind for e in relay_mod.list_events(s, state="unpublished")] == ["queue.paused"]


def test_pause_and_resume_are_events_once_each(pg_url: str, redis_url: str, clean_env: Path) -> None:
    from pipeline.config import Settings
    from pipeline.workflows import control

    settings = Settings(database_url=pg_url, redis_url=redis_url)
    control.pause(settings, "sandbox", "acct", "operator", "paused by the operator")
    control.pause(settings, "sandbox", "acct", "operator", "paused by the operator")  # open already
    control.resume(settings, "sandbox", "acct", enqueue=lambda ids: None)
    control.resume(settings, "sandbox", "acct", enqueue=lambda ids: None)  # nothing open
    assert _relay(pg_url, redis_url).run_once().published == 2
    bodies = [json.loads(e[1][b"body"]) for e in redis.Redis.from_url(redis_url).xrange("idocr:results")]
    assert [(b["kind"], b.get("pause"), b["provider"]) for b in bodies] == [
        ("queue.paused", "operator", "sandbox"), ("queue.resumed", None, "sandbox")]
    assert bodies[0]["reason"] == "paused by the operator" and bodies[1]["by"] == "operator"
