"""Paid-quota ledger in Redis, so concurrent workers on many hosts cannot overshoot the quota.

Per provider account, two keys::

    idocr:quota:{provider}:{account}                hash: remaining, reading_at
    idocr:quota:{provider}:{account}:reservations   sorted set: token -> expiry (server µs)

``remaining`` is the last balance reading (GetNum), decremented by every billed call committed
since. ``reserved`` is the number of calls in flight: the unexpired tokens of the sorted set. A
worker reserves before calling the provider and commits afterwards:

* :meth:`QuotaLedger.reserve` grants only while ``remaining - reserved > low_watermark`` and then
  adds a token; with no reading yet (showapi has no balance call) it always grants.
* :meth:`Reservation.commit` removes the token and, if the call was billed, decrements
  ``remaining``; :meth:`Reservation.release` is ``commit(billed=False)``.
* A worker that dies mid-call never commits: its token expires after ``ttl`` seconds (default
  300) and the next ``reserve`` drops it, so in-flight counts cannot leak.

Each step is one Lua script, atomic in Redis, and uses Redis ``TIME`` so worker clocks do not
matter. A reading taken while calls are in flight already counts those billed before it; setting
``remaining`` to the reading and still decrementing on their commits may count a call twice,
which only errs towards stopping early. The other way round, a call billed after the provider
answered the balance query but committed before the reading is stored would never be counted
(the reading overwrites its decrement): so the hash also counts every billed commit
(``billed``), the caller notes that count before it asks (:meth:`QuotaLedger.billed_mark`), and
:meth:`QuotaLedger.record_reading` subtracts the calls committed since. An older reading never
overwrites a newer one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import redis

from pipeline.coordination.redisconn import NOW_LUA, LuaScript

__all__ = [
    "DEFAULT_RESERVATION_TTL",
    "QuotaExhausted",
    "QuotaLedger",
    "QuotaSnapshot",
    "Reservation",
    "quota_key",
]

# Far beyond any provider call with its retries (seconds), so a live call's token does not expire;
# short enough that a crashed worker's reservation is back within minutes.
DEFAULT_RESERVATION_TTL = 300.0


def reserve_lua(ledger: str, reservations: str, token: str, ttl_us: str, low_watermark: str) -> str:
    """Lua, after ``now`` (:data:`NOW_LUA`): reserve ``token`` unless the remaining quota less
    the calls reserved is at the low watermark. Leaves ``granted``, ``remaining`` (false =
    unknown) and ``reserved`` (after the call). The arguments are Lua expressions (``KEYS[1]``):
    the ledger's own script and :mod:`pipeline.coordination.admission` share this text."""
    return f"""
redis.call('ZREMRANGEBYSCORE', {reservations}, '-inf', string.format('%.0f', now))
local reserved = redis.call('ZCARD', {reservations})
local remaining = redis.call('HGET', {ledger}, 'remaining')
local granted = not (remaining and tonumber(remaining) - reserved <= tonumber({low_watermark}))
if granted then
  local ttl = tonumber({ttl_us})
  redis.call('ZADD', {reservations}, string.format('%.0f', now + ttl), {token})
  -- every token expires within ttl of its creation, so the whole set may go a second after that
  redis.call('PEXPIRE', {reservations}, string.format('%.0f', math.ceil(ttl / 1000) + 1000))
  reserved = reserved + 1
end
"""


# KEYS: ledger hash, reservations set. ARGV: token, ttl_us, low_watermark.
# Returns {granted (1|0), remaining (nil = unknown), reserved (after the call)}.
_RESERVE_LUA = (
    NOW_LUA
    + reserve_lua("KEYS[1]", "KEYS[2]", "ARGV[1]", "ARGV[2]", "ARGV[3]")
    + """
return {granted and 1 or 0, remaining, reserved}
"""
)

# KEYS: ledger hash, reservations set. ARGV: token, billed (1|0).
# A token that already expired is simply absent; a billed call still costs quota.
_COMMIT_LUA = """
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' then
  local remaining = redis.call('HGET', KEYS[1], 'remaining')
  -- floor at 0: a fresh low reading plus late commits must not produce a negative balance
  if remaining and tonumber(remaining) > 0 then
    redis.call('HINCRBY', KEYS[1], 'remaining', -1)
  end
  -- every billed commit ever, for readings that were in flight meanwhile
  redis.call('HINCRBY', KEYS[1], 'billed', 1)
end
return 1
"""

# KEYS: ledger hash. ARGV: remaining, reading_at (seconds as text; '' = Redis time now),
# billed mark taken before the query ('' = none). Returns 1 if stored, 0 if a newer reading was
# already there.
_RECORD_LUA = """
local remaining = tonumber(ARGV[1])
if ARGV[3] ~= '' then
  local since = tonumber(redis.call('HGET', KEYS[1], 'billed') or '0') - tonumber(ARGV[3])
  remaining = math.max(0, remaining - math.max(0, since))
end
local at = ARGV[2]
if at == '' then
  local t = redis.call('TIME')
  at = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
local prev = redis.call('HGET', KEYS[1], 'reading_at')
if prev and tonumber(prev) > tonumber(at) then
  return 0
end
redis.call('HSET', KEYS[1], 'remaining', string.format('%.0f', remaining), 'reading_at', at)
return 1
"""

# KEYS: ledger hash, reservations set. Returns {remaining, reading_at, reserved}; read-only.
_SNAPSHOT_LUA = (
    NOW_LUA
    + """
local v = redis.call('HMGET', KEYS[1], 'remaining', 'reading_at')
local reserved = redis.call('ZCOUNT', KEYS[2], string.format('(%.0f', now), '+inf')
return {v[1], v[2], reserved}
"""
)


def quota_key(provider: str, account: str, *, prefix: str = "idocr") -> str:
    """The ledger key of one provider account: ``idocr:quota:{provider}:{account}``."""
    for name, part in (("provider", provider), ("account", account)):
        # an empty or spaced part would silently merge or split ledgers
        if not part or any(c.isspace() for c in part):
            raise ValueError(f"{name} must be a non-empty name without whitespace")
    return f"{prefix}:quota:{provider}:{account}"


class QuotaExhausted(Exception):
    """Granting one more call would take the quota to or below the low watermark."""

    def __init__(self, account: str, remaining: int, reserved: int, low_watermark: int) -> None:
        super().__init__(
            f"quota exhausted for {account}: remaining={remaining}, reserved={reserved}, "
            f"low_watermark={low_watermark}"
        )
        self.remaining = remaining
        self.reserved = reserved
        self.low_watermark = low_watermark


@dataclass(frozen=True, slots=True)
class QuotaSnapshot:
    remaining: int | None  # None: no reading yet, quota unknown (treated as unlimited)
    reserved: int  # calls in flight (unexpired reservations)
    reading_at: float | None  # when the reading was taken, epoch seconds

    @property
    def available(self) -> int | None:
        """What may still be reserved before the watermark check: remaining - reserved."""
        return None if self.remaining is None else self.remaining - self.reserved


class Reservation:
    """One granted call. Settle it exactly once: ``commit(billed)`` or ``release()``.

    As a context manager it settles on exit with whatever :meth:`billed` recorded, so::

        with ledger.reserve() as r:
            result = provider.submit(image)
            if result_was_billed(result):  # also when the outcome is unknown: err towards less
                r.billed()
    """

    __slots__ = ("_billed", "_ledger", "_settled", "token")

    def __init__(self, ledger: QuotaLedger, token: str) -> None:
        self._ledger = ledger
        self.token = token
        self._billed = False
        self._settled = False

    def __repr__(self) -> str:
        return f"Reservation({self.token!r}, settled={self._settled})"

    def billed(self) -> None:
        """Mark the call as billed; the context manager commits it as such on exit."""
        self._billed = True

    def commit(self, billed: bool) -> None:
        if self._settled:
            # a second settlement would double-count a billed call: a bug in the caller
            raise RuntimeError(f"{self!r} is already settled")
        self._ledger._commit(self.token, billed)
        # only once Redis has it: if the commit failed, it may be tried again
        self._settled = True

    def release(self) -> None:
        """The call was not made or not billed."""
        self.commit(billed=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._settled:
            self.commit(self._billed)


class QuotaLedger:
    def __init__(
        self,
        redis_client: redis.Redis,
        provider: str,
        account: str,
        low_watermark: int = 0,
        *,
        ttl: float = DEFAULT_RESERVATION_TTL,
        key_prefix: str = "idocr",
    ) -> None:
        if low_watermark < 0:
            raise ValueError("low_watermark must be >= 0")
        if not ttl > 0:
            raise ValueError("ttl must be > 0 seconds")
        self.provider = provider
        self.account = account
        self.low_watermark = low_watermark
        self.ttl = ttl
        self.key = quota_key(provider, account, prefix=key_prefix)
        self._keys = [self.key, f"{self.key}:reservations"]
        self._ttl_us = round(ttl * 1_000_000)
        self._redis = redis_client
        self._reserve = LuaScript(redis_client, _RESERVE_LUA)
        self._commit_script = LuaScript(redis_client, _COMMIT_LUA)
        self._record = LuaScript(redis_client, _RECORD_LUA)
        self._snapshot = LuaScript(redis_client, _SNAPSHOT_LUA)

    def __repr__(self) -> str:
        return (
            f"QuotaLedger({self.provider!r}, {self.account!r}, low_watermark={self.low_watermark})"
        )

    def record_reading(
        self, remaining: int, at: float | None = None, *, billed_since: int | None = None
    ) -> bool:
        """Store a balance reading taken at ``at``; False, changing nothing, if a later one is
        stored.

        ``at`` is epoch seconds on *Redis's* clock, like every other time here (e.g. from
        ``redis_client.time()`` just before the GetNum request); default: Redis time now. Host
        clocks would let a skewed worker's fresh reading lose to an older one.

        ``billed_since``: :meth:`billed_mark` taken just before the balance query; the calls
        committed as billed since then are subtracted from the reading (some may be in it
        already: that errs towards stopping early, never towards a call the provider refuses).
        """
        if remaining < 0:
            raise ValueError("remaining must be >= 0")
        stamp = "" if at is None else repr(float(at))
        mark = "" if billed_since is None else int(billed_since)
        return bool(self._record(keys=[self.key], args=[int(remaining), stamp, mark]))

    def billed_mark(self) -> int:
        """How many calls have been committed as billed so far (for :meth:`record_reading`)."""
        return int(self._redis.hget(self.key, "billed") or 0)

    def reserve(self) -> Reservation:
        """Grant one call, or raise :class:`QuotaExhausted`."""
        token = uuid.uuid4().hex
        granted, remaining, reserved = self._reserve(keys=self.keys, args=self.reserve_args(token))
        if not granted:
            raise self.exhausted(remaining, reserved)
        return Reservation(self, token)

    @property
    def keys(self) -> list[str]:
        """The keys of :func:`reserve_lua`: the ledger hash, the reservations set."""
        return self._keys

    def reserve_args(self, token: str) -> list[object]:
        """The arguments of :func:`reserve_lua` for a reservation under ``token``."""
        return [token, self._ttl_us, self.low_watermark]

    def exhausted(self, remaining: Any, reserved: Any) -> QuotaExhausted:
        """The refusal of a reservation the script did not grant."""
        return QuotaExhausted(
            f"{self.provider}:{self.account}", int(remaining), int(reserved), self.low_watermark
        )

    def _commit(self, token: str, billed: bool) -> None:
        self._commit_script(keys=self._keys, args=[token, 1 if billed else 0])

    def snapshot(self) -> QuotaSnapshot:
        remaining, reading_at, reserved = self._snapshot(keys=self._keys)
        return QuotaSnapshot(
            remaining=None if remaining is None else int(remaining),
            reserved=int(reserved),
            reading_at=None if reading_at is None else float(reading_at),
        )
