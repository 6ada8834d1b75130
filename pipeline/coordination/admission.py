"""Admission: what a call needs from Redis right before it is sent, in one round trip.

A first call of a claim takes, in this order, a quota reservation
(:mod:`pipeline.coordination.quota`), a rate-limiter slot (:mod:`pipeline.coordination.ratelimit`)
and the attempt's sent mark, set only while the claimant still owns the item
(:class:`pipeline.coordination.journal.SentMarks`): three scripts, three round trips. When the
slot is free now, which is every call below the rate, one script does all three, running the
same Lua text as the three scripts (shared fragments), so the rules cannot drift apart:

* the item is no longer the claimant's: nothing is reserved, booked or marked;
* the quota is at its low watermark: nothing is reserved or booked (:class:`QuotaExhausted`);
* no slot is free now: the reservation stands, nothing is booked or marked, and the caller waits
  for a slot with the limiter and marks after it, as without admission;
* otherwise the slot is booked and the attempt marked sent: the call goes at once.
"""

from __future__ import annotations

import uuid

from pipeline.coordination.journal import SENT_MARK_TTL, SentMarks, mark_lua, owner_check_lua
from pipeline.coordination.quota import QuotaLedger, Reservation, reserve_lua
from pipeline.coordination.ratelimit import RateLimiter, gcra_lua
from pipeline.coordination.redisconn import NOW_LUA, LuaScript

# KEYS: owner key, sent mark, ledger hash, reservations set, limiter key.
# ARGV: claimant, mark TTL, token, reservation ttl_us, low watermark, then the limiter's
# interval_us, burst, max_wait_us (0: a slot free now only), start_interval_us.
# Returns {-1} (owned by another claim), {0, remaining, reserved} (quota refused),
# {1, remaining, reserved} (reserved, no slot free now), {2, remaining, reserved} (all three).
_ADMIT_LUA = (
    owner_check_lua("KEYS[1]", "ARGV[1]")
    + "if not owned then return {-1} end\n"
    + NOW_LUA
    + reserve_lua("KEYS[3]", "KEYS[4]", "ARGV[3]", "ARGV[4]", "ARGV[5]")
    + "if not granted then return {0, remaining, reserved} end\n"
    + gcra_lua("KEYS[5]", "ARGV[6]", "ARGV[7]", "ARGV[8]", "ARGV[9]")
    + "if not booked then return {1, remaining, reserved} end\n"
    + mark_lua("KEYS[1]", "KEYS[2]", "ARGV[1]", "ARGV[2]")
    + "return {2, remaining, reserved}\n"
)


class Admission:
    """The quota reservation, a slot free now and the sent mark of a first call, in one round
    trip. The ledger, the limiter and the marks must be on one Redis (the worker's)."""

    def __init__(self, ledger: QuotaLedger, limiter: RateLimiter, marks: SentMarks) -> None:
        self.ledger = ledger
        self.limiter = limiter
        self.marks = marks
        self._script = LuaScript(marks.redis, _ADMIT_LUA)

    def __repr__(self) -> str:
        return f"Admission({self.ledger!r}, {self.limiter!r})"

    def admit(
        self, item_id: int, attempt_id: int, claimant: str
    ) -> tuple[Reservation, bool] | None:
        """None when the item is no longer ``claimant``'s (nothing done); else the reservation
        and whether the slot was booked and the attempt marked sent (False: wait for a slot,
        then mark). Raises :class:`~pipeline.coordination.quota.QuotaExhausted`, nothing
        reserved, at the low watermark."""
        token = uuid.uuid4().hex
        got = self._script(
            keys=[
                self.marks.owner_key(item_id),
                self.marks.sent_key(attempt_id),
                *self.ledger.keys,
                self.limiter.key,
            ],
            args=[
                claimant,
                SENT_MARK_TTL,
                *self.ledger.reserve_args(token),
                *self.limiter.book_args(0.0),
            ],
        )
        state = int(got[0])
        if state < 0:
            return None
        if state == 0:
            raise self.ledger.exhausted(got[1], got[2])
        return Reservation(self.ledger, token), state == 2
