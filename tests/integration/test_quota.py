"""The quota ledger against the real Redis (this session's database, keys of each test's own)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from pipeline.coordination.quota import QuotaExhausted, QuotaLedger, Reservation, quota_key

pytestmark = pytest.mark.redis

@pytest.fixture
def prefix() -> str:
    """This test's own key namespace."""
    return f"idocr-test:{uuid.uuid4().hex}"


@pytest.fixture
def redis_client(prefix: str, redis_db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db_url)
    yield client
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
def make_ledger(redis_client: redis.Redis, prefix: str) -> Callable[..., QuotaLedger]:
    def make(low_watermark: int = 0, ttl: float = 300.0) -> QuotaLedger:
        return QuotaLedger(redis_client, "ihuyi", "C123", low_watermark, ttl=ttl, key_prefix=prefix)

    return make


def test_reserve_stops_at_low_watermark(make_ledger: Callable[..., QuotaLedger]) -> None:
    ledger = make_ledger(low_watermark=3)
    ledger.record_reading(10)
    held = [ledger.reserve() for _ in range(7)]  # 10 - 7 = 3: the watermark itself is not spent
    with pytest.raises(QuotaExhausted) as info:
        ledger.reserve()
    assert "remaining=10" in str(info.value) and "reserved=7" in str(info.value)
    assert (info.value.remaining, info.value.reserved) == (10, 7)
    held.pop().release()
    ledger.reserve()  # the released place is free again


def test_eight_threads_get_exactly_the_quota(make_ledger: Callable[..., QuotaLedger]) -> None:
    ledger = make_ledger()
    ledger.record_reading(50)
    granted: list[Reservation] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def grab() -> None:
        go.wait()
        while True:
            try:
                r = ledger.reserve()
            except QuotaExhausted:
                return
            with lock:
                granted.append(r)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(granted) == 50
    assert len({r.token for r in granted}) == 50
    assert ledger.snapshot().reserved == 50


def test_eight_threads_bill_exactly_the_quota(make_ledger: Callable[..., QuotaLedger]) -> None:
    ledger = make_ledger()
    ledger.record_reading(50)
    billed = []

    def work() -> None:
        while True:
            try:
                with ledger.reserve() as r:
                    r.billed()
            except QuotaExhausted:
                return
            billed.append(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(billed) == 50
    snap = ledger.snapshot()
    assert (snap.remaining, snap.reserved) == (0, 0)


def test_commit_and_release_arithmetic(make_ledger: Callable[..., QuotaLedger]) -> None:
    ledger = make_ledger()
    ledger.record_reading(10, at=1000.0)
    a, b, c = ledger.reserve(), ledger.reserve(), ledger.reserve()
    snap = ledger.snapshot()
    assert (snap.remaining, snap.reserved, snap.available, snap.reading_at) == (10, 3, 7, 1000.0)
    a.commit(billed=True)
    b.release()
    assert (ledger.snapshot().remaining, ledger.snapshot().reserved) == (9, 1)
    with pytest.raises(RuntimeError):
        a.commit(billed=True)  # settling twice would bill twice
    c.commit(billed=False)
    assert (ledger.snapshot().remaining, ledger.snapshot().reserved) == (9, 0)

    with ledger.reserve() as r:
        r.billed()
    with ledger.reserve():
        pass  # not billed
    with pytest.raises(ZeroDivisionError), ledger.reserve() as r:
        r.billed()
        raise ZeroDivisionError  # the call was billed, then our own code failed: still counted
    with ledger.reserve() as r:
        r.commit(billed=True)  # settled inside: exit does not settle again
    snap = ledger.snapshot()
    assert (snap.remaining, snap.reserved) == (6, 0)


def test_reading_while_in_flight_and_stale_readings(
    redis_client: redis.Redis, make_ledger: Callable[..., QuotaLedger]
) -> None:
    ledger = make_ledger()
    assert ledger.record_reading(10, at=2000.0)
    r = ledger.reserve()
    assert ledger.record_reading(8, at=2001.0)  # may already include r's call
    r.commit(billed=True)  # counted again: errs towards stopping early
    assert ledger.snapshot().remaining == 7
    assert not ledger.record_reading(100, at=1999.0)  # older reading arrives late: ignored
    assert ledger.snapshot().remaining == 7
    assert ledger.record_reading(5)  # Redis time now is newer than 2001
    assert ledger.snapshot().remaining == 5
    assert ledger.snapshot().reading_at == pytest.approx(redis_client.time()[0], abs=2)


def test_a_call_committed_while_the_reading_is_in_flight_is_not_forgotten(
    make_ledger: Callable[..., QuotaLedger],
) -> None:
    ledger = make_ledger()
    ledger.record_reading(10)
    r = ledger.reserve()
    mark = ledger.billed_mark()  # the monitor is about to ask the provider
    reading = 10  # the provider answers: r's call has not reached it yet
    r.commit(billed=True)  # r's call is billed and committed before the reading is stored
    assert ledger.record_reading(reading, billed_since=mark)
    assert ledger.snapshot().remaining == 9  # not 10: that would grant a call the provider refuses
    assert ledger.billed_mark() == mark + 1
    ledger.record_reading(0, billed_since=ledger.billed_mark() - 5)  # floored at 0
    assert ledger.snapshot().remaining == 0


def test_remaining_never_goes_negative(make_ledger: Callable[..., QuotaLedger]) -> None:
    ledger = make_ledger()
    ledger.record_reading(2)
    a, b = ledger.reserve(), ledger.reserve()
    ledger.record_reading(0)
    a.commit(billed=True)
    b.commit(billed=True)
    assert ledger.snapshot().remaining == 0


def test_expired_reservations_are_dropped(make_ledger: Callable[..., QuotaLedger]) -> None:
    ledger = make_ledger(ttl=0.2)
    ledger.record_reading(1)
    dead = ledger.reserve()  # its worker "dies": never settled
    with pytest.raises(QuotaExhausted):
        ledger.reserve()
    time.sleep(0.25)
    assert ledger.snapshot().reserved == 0
    live = ledger.reserve()
    dead.commit(billed=True)  # a late commit of an expired token still pays for its call
    assert ledger.snapshot().remaining == 0
    live.release()


def test_no_reading_means_unlimited(make_ledger: Callable[..., QuotaLedger]) -> None:
    ledger = make_ledger(low_watermark=5)
    held = [ledger.reserve() for _ in range(100)]
    snap = ledger.snapshot()
    assert (snap.remaining, snap.reserved, snap.reading_at, snap.available) == (
        None,
        100,
        None,
        None,
    )
    for r in held:
        r.commit(billed=True)
    assert ledger.snapshot().remaining is None  # billing without a reading invents no balance


def test_key_layout(
    redis_client: redis.Redis, prefix: str, make_ledger: Callable[..., QuotaLedger]
) -> None:
    assert quota_key("ihuyi", "C123") == "idocr:quota:ihuyi:C123"
    ledger = make_ledger()
    ledger.record_reading(3)
    ledger.reserve()
    keys = sorted(k.decode() for k in redis_client.scan_iter(match=f"{prefix}:*"))
    assert keys == [f"{prefix}:quota:ihuyi:C123", f"{prefix}:quota:ihuyi:C123:reservations"]
