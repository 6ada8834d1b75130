"""Global rate limiter: one budget per provider account, shared by every worker on every host.

Celery's ``rate_limit`` is per worker instance (DESIGN.md measured 5/s × 4 processes = 20/s), so
the provider's rate is enforced here instead, in Redis, atomically in one Lua script.

Algorithm: GCRA (generic cell rate algorithm), in its *booking* form
-------------------------------------------------------------------
One key holds the theoretical arrival time (TAT, server microseconds) of the next free slot,
stored as ``"tat:since"`` with the start of the current busy period (see *Start margin*).
With emission interval ``T = 1/rate`` and ``burst`` cells of tolerance, a caller arriving at
server time ``now`` books the slot::

    tat     = max(TAT, now)
    new_tat = tat + T
    start   = new_tat - burst * T          # earliest moment this slot may be used
    delay   = max(0, start - now)

and the script stores ``new_tat`` only if ``delay <= max_wait``. So:

* :meth:`RateLimiter.reserve` books the next slot and returns its delay; the caller sleeps that
  long and goes. Waiters are served in booking order (FIFO) and nobody polls: one Redis round
  trip per grant, however many workers wait.
* ``max_wait`` caps how far ahead a slot may be booked, so no caller commits to a wait it did
  not ask for, and bookings are not made long before their use (the longer the sleep, the likelier
  the worker is killed or the queue paused meanwhile; each abandoned booking is one slot of lost
  capacity, never excess). Past the cap nothing is booked and the delay is returned, so
  ``reserve() > max_wait`` means "not booked".
* :meth:`RateLimiter.try_acquire` is ``reserve(max_wait=0)``: it books only a slot that is free
  now, otherwise returns the wait without booking.
* :meth:`RateLimiter.acquire` books within ``min(max_wait, time left of timeout)`` and sleeps the
  delay exactly. If the queue is longer than ``max_wait`` it sleeps until its turn would fall
  within the cap (plus up to 5 ms of jitter, so workers that saw the same long queue do not all
  come back in the same millisecond) and books then. With ``max_wait=0`` this degenerates into the
  plain try/sleep/retry limiter, which the benchmark uses for comparison.

Sizing: N workers on one account keep the queue about N/rate seconds long. While ``max_wait``
exceeds that, every waiter holds a booking. Beyond it the surplus keeps coming back to a queue
that the booked workers refill: still within the limit, but those waiters poll and are served in
no particular order (bench: 32 processes at 20/s with ``max_wait=0.5`` took 19 round trips per
grant, and one process got nothing in 5 s).

Bound: between any two booked slots i < j, ``s_j - s_i >= (j - i + 1 - burst) * T``, so any
window of one second holds at most ``rate + burst - 1`` slot starts (< ``rate + burst``). ``T`` is
rounded *up* to whole microseconds so rounding can only lower the rate.

Margin: the provider counts arrivals, not slots, and a call reaches it a little later or earlier
than its slot (thread wake-up, the network, the provider's own clock). At exactly ``T = 1/rate``
a first call late by 5 ms and a 21st on time already put 21 calls into one second at 20/s. With
``margin`` m the interval is ``T = (1 + m)/rate``: any ``1 + m`` seconds hold at most
``rate + burst - 1`` slot starts, so arrivals that vary by up to m seconds still count at most
that many in any one second. It costs ``m/(1 + m)`` of the throughput (m = 15 ms: 1.5 %).

Start margin: a busy period starts cold. When work arrives at idle workers they all wake at once,
decode images and write to the database together, and the first calls leave tens of milliseconds
late (bench: the second call of a run 40–55 ms behind its slot on a 2-core machine, later calls
within 5 ms). Slots in the first second of a busy period (the bucket was idle before it) are
therefore spaced by ``start_margin`` instead, once per busy period: 0.1 costs 0.1 s of capacity.

Time comes from Redis (``TIME`` inside the script, allowed with effect replication, the default
since Redis 5), so the clocks of worker hosts do not matter. The key expires on its own once idle.

Key naming: :func:`rate_key` -> ``idocr:rate:{provider}:{account}``. The account name is not a
secret; API keys never go into key names.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Protocol

import redis

from pipeline.config import Settings
from pipeline.coordination.redisconn import NOW_LUA, LuaScript, redis_client


class ProviderLike(Protocol):
    name: str
    account: str


__all__ = ["DEFAULT_MAX_WAIT", "RateLimitTimeout", "RateLimiter", "rate_key"]

# The queue is N workers / rate seconds long; 30 s keeps every waiter booked up to 30 workers per
# call/s of rate (e.g. 150 workers at 5/s). Callers that must not wait so long pass a timeout.
DEFAULT_MAX_WAIT = 30.0

# De-synchronises workers that come back after an over-long queue; small against any rate we run.
_JITTER = 0.005


def gcra_lua(key: str, interval: str, burst: str, max_wait: str, start_interval: str) -> str:
    """Lua, after ``now`` (server microseconds): book the next slot of the limiter at ``key``
    if it starts within ``max_wait``. Leaves ``booked`` and ``delay`` (µs until the slot). The
    arguments are Lua expressions (``ARGV[1]``): the limiter's own script and
    :mod:`pipeline.coordination.admission` share this text."""
    return f"""
local interval = tonumber({interval})
local burst = tonumber({burst})
local max_wait = tonumber({max_wait})
local start_interval = tonumber({start_interval})
local tat, since = now, now
local v = redis.call('GET', {key})
if v then
  local a, b = string.match(v, '^(%d+):(%d+)$')
  if a then
    tat, since = tonumber(a), tonumber(b)
  else
    tat = tonumber(v) or now
    since = tat - 1000000
  end
end
if tat < now then
  tat, since = now, now
end
local step = interval
if tat - since < 1000000 then
  step = start_interval
end
local new_tat = tat + step
local delay = tat - (burst - 1) * step - now
if delay < 0 then delay = 0 end
local booked = delay <= max_wait
if booked then
  -- the key is useless once now >= new_tat; keep it a second longer, then let it go
  local ttl_ms = math.ceil((new_tat - now) / 1000) + 1000
  redis.call('SET', {key}, string.format('%.0f:%.0f', new_tat, since),
             'PX', string.format('%.0f', ttl_ms))
end
"""


# KEYS[1] = TAT key, its value "tat:since" (since: when the current busy period began).
# ARGV = interval_us, burst, max_wait_us, start_interval_us (all integers).
# Returns {booked (1|0), delay_us}. Every number that reaches Redis or a string is formatted with
# %.0f: Lua's own number-to-string keeps 14 digits, which would cut server microseconds (16).
_GCRA_LUA = (
    NOW_LUA
    + gcra_lua("KEYS[1]", "ARGV[1]", "ARGV[2]", "ARGV[3]", "ARGV[4]")
    + """
return {booked and 1 or 0, delay}
"""
)


class RateLimitTimeout(TimeoutError):
    """No slot could be had within the caller's timeout. Nothing was booked."""

    def __init__(self, key: str, delay: float, left: float) -> None:
        super().__init__(f"rate limit {key}: next slot in {delay:.3f}s, only {left:.3f}s left")
        self.key = key
        self.delay = delay  # until the earliest slot, when the limiter was last asked
        self.left = left  # of the caller's timeout at that moment


def rate_key(provider: str, account: str, *, prefix: str = "idocr") -> str:
    """The limiter key of one provider account: ``idocr:rate:{provider}:{account}``."""
    for name, part in (("provider", provider), ("account", account)):
        # an empty or spaced part would silently merge or split buckets
        if not part or any(c.isspace() for c in part):
            raise ValueError(f"{name} must be a non-empty name without whitespace")
    return f"{prefix}:rate:{provider}:{account}"


class RateLimiter:
    """At most ``rate`` slots per second (plus ``burst`` back to back) across all clients of
    ``key``."""

    def __init__(
        self,
        redis_client: redis.Redis,
        key: str,
        rate: float,
        burst: int = 1,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        margin: float = 0.0,
        start_margin: float | None = None,
    ) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError("rate must be a positive, finite number of calls per second")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        start_margin = margin if start_margin is None else start_margin
        for name, m in (("margin", margin), ("start_margin", start_margin)):
            if not 0 <= m < 1:
                raise ValueError(f"{name} must be >= 0 and below one second")
        self.key = key
        self.rate = rate
        self.burst = burst
        self.max_wait = max_wait
        self.margin = margin
        self.start_margin = start_margin
        # up: rounding may only slow us down
        self._interval_us = math.ceil(1_000_000 * (1 + margin) / rate)
        self._start_interval_us = math.ceil(1_000_000 * (1 + max(margin, start_margin)) / rate)
        self._script = LuaScript(redis_client, _GCRA_LUA)

    def __repr__(self) -> str:
        return (
            f"RateLimiter({self.key!r}, rate={self.rate}, burst={self.burst}, margin={self.margin})"
        )

    def book_args(self, max_wait: float) -> list[int]:
        """The arguments of :func:`gcra_lua` for this limiter (the key is :attr:`key`)."""
        # floor: a slot exactly at the cap counts as within it, never a microsecond beyond
        return [
            self._interval_us,
            self.burst,
            math.floor(max_wait * 1_000_000),
            self._start_interval_us,
        ]

    def _book(self, max_wait: float) -> tuple[bool, float]:
        booked, delay_us = self._script(keys=[self.key], args=self.book_args(max_wait))
        return bool(booked), int(delay_us) / 1_000_000

    def reserve(self, max_wait: float | None = None) -> float:
        """Book the next slot and return seconds until it starts (0.0 = now).

        If that slot lies more than ``max_wait`` (default: the limiter's) ahead, nothing is
        booked and the returned delay is greater than ``max_wait``.
        """
        return self._book(self.max_wait if max_wait is None else max(0.0, max_wait))[1]

    def try_acquire(self) -> float:
        """Take a slot if one is free now (returns 0.0); else the seconds to wait, nothing
        booked."""
        return self._book(0.0)[1]

    def acquire(
        self,
        timeout: float | None = None,
        *,
        before_slot: Callable[[], None] | None = None,
        lead: float = 0.05,
    ) -> float:
        """Block until this caller holds a slot; return the seconds waited.

        Raises :class:`RateLimitTimeout`, without booking, as soon as the earliest slot is seen
        to lie beyond ``timeout``; it does not sleep into a timeout it knows it will miss.

        ``before_slot`` runs ``lead`` seconds before a slot that is further away than twice
        that (e.g. to re-check a pause after a long wait), so whatever it costs happens before
        the slot, not between the slot and the call. If it raises, the booked slot is given up
        (lost capacity, never excess).
        """
        started = time.monotonic()
        while True:
            left = None if timeout is None else timeout - (time.monotonic() - started)
            horizon = self.max_wait if left is None else max(0.0, min(self.max_wait, left))
            booked, delay = self._book(horizon)
            if booked:
                if before_slot is not None and delay > 2 * lead:
                    slot = time.monotonic() + delay
                    time.sleep(delay - lead)
                    before_slot()
                    delay = slot - time.monotonic()
                if delay > 0:
                    # the slot is ours alone: no jitter needed, every extra ms is lost throughput
                    time.sleep(delay)
                return time.monotonic() - started
            if left is not None and delay > left:
                raise RateLimitTimeout(self.key, delay, left)
            # queue longer than max_wait: return when our turn falls within the cap, book then
            time.sleep(delay - horizon + random.uniform(0.0, _JITTER))


def provider_limiter(settings: Settings, provider: ProviderLike) -> RateLimiter:
    """The one rate limiter of a provider account: submissions and balance queries share it."""
    return RateLimiter(
        redis_client(settings),
        rate_key(provider.name, provider.account),
        settings.rate_limit,
        settings.rate_burst,
        margin=settings.rate_margin,
        start_margin=settings.rate_start_margin,
    )
