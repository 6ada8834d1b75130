"""Admission: a first call's quota reservation, rate-limiter slot and sent mark in one Redis
round trip, with the same rules as the three scripts it stands for. Real Redis (this session's
database, emptied around each test), real databases and sandbox for the worker's path."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.coordination.admission import Admission
from pipeline.coordination.journal import SentMarks
from pipeline.coordination.quota import QuotaExhausted, QuotaLedger
from pipeline.coordination.ratelimit import RateLimiter
from pipeline.coordination.redisconn import LuaScript
from pipeline.workflows.processing import Processor
from tests.integration.test_task_items import examples_and_worker

pytestmark = pytest.mark.redis


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def parts(r: redis.Redis, rate: float = 1000, burst: int = 10, low: int = 0) -> Admission:
    return Admission(
        QuotaLedger(r, "p", "acct", low_watermark=low),
        RateLimiter(r, "test:rate", rate, burst),
        SentMarks(r),
    )


def test_a_free_slot_is_reserved_booked_and_marked_in_one_call(r: redis.Redis) -> None:
    a = parts(r)
    a.ledger.record_reading(10)
    got = a.admit(7, 70, "w/1")
    assert got is not None
    reservation, marked = got
    assert marked
    assert a.ledger.snapshot().reserved == 1
    assert r.get("test:rate") is not None  # the slot booked
    assert r.get(a.marks.owner_key(7)) == b"w/1"  # no owner key (Redis lost it): taken
    assert a.marks.sent([70]) == {70}
    reservation.commit(billed=True)
    assert (a.ledger.snapshot().remaining, a.ledger.snapshot().reserved) == (9, 0)


def test_an_item_another_claim_owns_gets_nothing(r: redis.Redis) -> None:
    a = parts(r)
    a.marks.own(7, "w/other")
    assert a.admit(7, 70, "w/1") is None
    assert a.ledger.snapshot().reserved == 0
    assert r.get("test:rate") is None
    assert a.marks.sent([70]) == set()


def test_the_low_watermark_refuses_with_nothing_reserved_or_booked(r: redis.Redis) -> None:
    a = parts(r, low=3)
    a.ledger.record_reading(4)
    a.marks.own(7, "w/1")
    got = a.admit(7, 70, "w/1")
    assert got is not None and got[1]
    with pytest.raises(QuotaExhausted) as info:
        a.admit(8, 80, "w/1")  # 4 - 1 reserved = 3: the watermark itself is not spent
    assert (info.value.remaining, info.value.reserved) == (4, 1)
    assert a.ledger.snapshot().reserved == 1
    assert a.marks.sent([70, 80]) == {70}


def test_no_free_slot_keeps_the_reservation_and_leaves_the_slot_and_mark_to_the_caller(
    r: redis.Redis,
) -> None:
    a = parts(r, rate=1, burst=1)
    assert a.limiter.try_acquire() == 0.0  # the only slot of this second
    booked = r.get("test:rate")
    got = a.admit(7, 70, "w/1")
    assert got is not None
    reservation, marked = got
    assert not marked
    assert r.get("test:rate") == booked  # nothing booked
    assert a.marks.sent([70]) == set()
    assert a.ledger.snapshot().reserved == 1
    reservation.release()
    assert a.ledger.snapshot().reserved == 0


def test_a_script_the_server_lost_is_loaded_again(r: redis.Redis) -> None:
    script = LuaScript(r, "return 41 + 1")
    script.sha = "0" * 40  # as after a restart or a SCRIPT FLUSH: EVALSHA finds nothing
    assert script() == 42
    assert script() == 42


@pytest.mark.parametrize("rate", [1000.0, 4.0])
def test_a_worker_with_admission_bills_each_image_once(
    rate: float, db_url: str, tmp_path: Path, sandbox_factory, redis_url: str  # type: ignore[no-untyped-def]
) -> None:
    """At a rate the calls never wait for, each first call is one admission and no separate
    reservation, slot or mark; at 4 calls/s most slots are not free at once, and those calls
    wait for theirs and are marked after it, as without admission."""
    sandbox = sandbox_factory()
    sent, proc = examples_and_worker(db_url, tmp_path, sandbox, redis_url)
    r = redis.Redis.from_url(redis_url)
    assert proc.quota is not None and proc.sent_marks is not None
    proc.limiter = RateLimiter(r, "test:rate", rate, 1)
    proc.admission = Admission(proc.quota, proc.limiter, proc.sent_marks)
    calls: Counter[str] = Counter()
    count(proc, calls)
    statuses = proc.process_many(sent)
    assert statuses.count("succeeded") == 8
    assert sandbox.stats.billed == 8 and set(sandbox.stats.billed_by_sha.values()) == {1}
    assert calls["admit"] == 8  # the three rejected images never reach the provider's side
    if rate == 1000.0:
        assert (calls["reserve"], calls["book"], calls["mark"]) == (0, 0, 0)
    else:
        # every call after the first found its slot taken: booked and marked on their own
        assert calls["book"] >= 5 and calls["book"] == calls["mark"]
        assert calls["reserve"] == 0
    assert proc.quota.snapshot().reserved == 0  # every reservation settled
    r.close()


def count(proc: Processor, calls: Counter[str]) -> None:
    """Count the admissions, reservations, slot bookings and marks ``proc`` makes."""
    assert proc.admission is not None and proc.limiter is not None and proc.sent_marks is not None
    for owner, name, label in (
        (proc.admission, "admit", "admit"),
        (proc.quota, "reserve", "reserve"),
        (proc.limiter, "_book", "book"),
        (proc.sent_marks, "mark", "mark"),
    ):
        original = getattr(owner, name)

        def counted(*args: object, _original=original, _label=label, **kw: object) -> object:  # type: ignore[no-untyped-def]
            calls[_label] += 1
            return _original(*args, **kw)

        setattr(owner, name, counted)
