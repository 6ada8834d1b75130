"""What a worker does with one item: claim, gate, check the image, call the provider, persist.

Money rules, in code order:

* the claim is a compare-and-set (queued → submitting): a redelivered message finds the item
  taken and makes no call;
* the pause gate is read before the claim turns into a call and again before every retry;
  a paused item goes to ``paused`` (no attempt counted) and is re-enqueued on resume; a call
  already granted by the quota ledger, and still covered by it, goes ahead through a quota pause;
* the image is checked and normalised before any money is spent;
* every call first takes a slot from the global rate limiter and a reservation from the quota
  ledger, and is recorded as an attempt *before* it is sent, so a crash mid-call leaves an
  attempt with no outcome (unknown: it may have been billed), never a silent double charge;
* only transient failures are retried (tenacity, exponential backoff with jitter, bounded).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from pipeline.images import ImageLimits, ImageRejected, prepare, sniff
from pipeline.providers.base import ImagePayload, Outcome, Provider, ProviderResult
from pipeline.sources import read_uri
from pipeline.sources.base import SourceError
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import ItemStatus, Result, utcnow
from pipeline.validation import check_fields

log = logging.getLogger(__name__)

#: outcomes after which the call may have cost money
BILLED = frozenset({Outcome.OK, Outcome.IMAGE, Outcome.UNKNOWN, Outcome.ERROR})
#: outcomes that stop every submission to the account until someone (or the monitor) resumes
PAUSING = {Outcome.QUOTA: "quota", Outcome.AUTH: "auth", Outcome.CLOCK: "clock"}


class RateLimiterLike(Protocol):
    def acquire(
        self, timeout: float | None = None, *, before_slot: Callable[[], None] | None = None
    ) -> float: ...


class QuotaLike(Protocol):
    def reserve(self): ...  # type: ignore[no-untyped-def]  # -> context manager with .billed()


class QuotaExhaustedLike(Exception):
    """Raised by a quota ledger when no call may be made."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    initial: float = 1.0
    max_wait: float = 30.0


class _Again(Exception):
    def __init__(self, result: ProviderResult) -> None:
        self.result = result


class _Paused(Exception):
    """Submissions are paused: ``new`` when this worker must open the pause (the quota ledger
    refused), not when it found one already open."""

    def __init__(self, kind: str, reason: str, new: bool = False) -> None:
        self.kind = kind
        self.reason = reason
        self.new = new


def pause_reason(result: ProviderResult, provider: str) -> str:
    if result.outcome is Outcome.QUOTA:
        return f"{provider} quota exhausted (code {result.code} {result.msg}); top up, then resume"
    if result.outcome is Outcome.CLOCK:
        return (
            f"{provider} rejected the signature time (code {result.code} {result.msg}): "
            "this machine's clock is probably skewed; fix the clock (NTP), then `idocr resume`"
        )
    return (
        f"{provider} refused the account (code {result.code} {result.msg}): check the account, "
        "key, contract and registered IP, then `idocr resume`"
    )


class Processor:
    def __init__(
        self,
        *,
        database_url: str,
        provider: Provider,
        limits: ImageLimits,
        retry: RetryPolicy,
        worker_id: str,
        limiter: RateLimiterLike | None = None,
        quota=None,  # type: ignore[no-untyped-def]
        quota_exhausted: type[Exception] = QuotaExhaustedLike,
        on_pause: Callable[[str, str], None] | None = None,
        reader: Callable[[str], bytes] = read_uri,
        head_reader: Callable[[str], bytes] | None = None,
        url_for: Callable[[str], str] | None = None,
        first_claim: Callable[[str, int], int] | None = None,
        claim_lease: timedelta = timedelta(minutes=15),
        enqueue: Callable[[list[int]], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        today: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = database_url
        self.provider = provider
        self.limits = limits
        self.retry = retry
        self.worker_id = worker_id
        self.limiter = limiter
        self.quota = quota
        self.quota_exhausted = quota_exhausted
        self.on_pause = on_pause
        self.reader = reader
        self.head_reader = head_reader
        self.url_for = url_for
        self.first_claim = first_claim
        self.claim_lease = claim_lease
        self.enqueue = enqueue
        self.sleep = sleep
        self.today = today

    # -- the task body -------------------------------------------------------------------------
    def process(self, item_id: int) -> str:
        """Returns the item's status after this delivery ("skipped": someone else has it)."""
        with unit_of_work(self.db) as s:
            item = repo.claim(s, item_id, self.worker_id, stale_before=utcnow() - self.claim_lease)
            if item is None:
                log.info("item %s: not queued any more, delivery ignored", item_id)
                return "skipped"
            if repo.park_if_paused(s, item_id, self.provider.name, self.provider.account):
                return ItemStatus.PAUSED
            uri, sha, size = item.source_uri, item.sha256, item.size
            via = repo.batch_via(s, item.batch_id)
        if via == "url":
            return self._process_by_url(item_id, uri, size)

        try:
            data = self.reader(uri)
        except SourceError as exc:
            return self._finish(item_id, ItemStatus.REJECTED, reason="unreadable", msg=str(exc))
        digest = hashlib.sha256(data).hexdigest()
        if sha and digest != sha:
            return self._finish(
                item_id, ItemStatus.REJECTED, reason="changed",
                msg="the file changed after it was scanned; scan the source again",
            )
        if not sha:
            # Listed without reading (S3): identical bytes are found only now.
            original = self._original_of(item_id, digest)
            if original is not None:
                return self._finish(
                    item_id, ItemStatus.DUPLICATE, reason=repo.SAME_CONTENT,
                    duplicate_of=original, sha256=digest,
                )
        try:
            prepared = prepare(data, self.limits)
        except ImageRejected as exc:
            return self._finish(item_id, ItemStatus.REJECTED, reason=exc.reason, msg=str(exc), sha256=digest)
        del data
        return self._submit(item_id, ImagePayload(data=prepared.data), digest)

    def _original_of(self, item_id: int, digest: str) -> int | None:
        """Another item with these bytes that succeeded or is on its way, or None. Two workers
        meeting the same bytes at once agree through ``first_claim`` (first one wins)."""
        with unit_of_work(self.db, read_only=True) as s:
            known = repo.canonical_items(s, [digest]).get(digest)
        if known is not None and known != item_id:
            return known
        if self.first_claim is not None:
            winner = self.first_claim(digest, item_id)
            if winner != item_id:
                return winner
        return None

    def _process_by_url(self, item_id: int, uri: str, size: int | None) -> str:
        """The provider fetches the image itself: only what the listing and the first bytes
        tell can be checked here, and the bytes never pass through the worker."""
        if self.url_for is None or self.head_reader is None:
            return self._finish(
                item_id, ItemStatus.REJECTED, reason="no_url",
                msg="this source cannot give the provider a URL; scan it with --via bytes",
            )
        if size is not None and size > self.limits.max_payload_bytes:
            return self._finish(
                item_id, ItemStatus.REJECTED, reason="too_large",
                msg=f"the object is {size} bytes; the provider fetches at most {self.limits.max_payload_bytes}",
            )
        try:
            head = self.head_reader(uri)
        except SourceError as exc:
            return self._finish(item_id, ItemStatus.REJECTED, reason="unreadable", msg=str(exc))
        if not head:
            return self._finish(item_id, ItemStatus.REJECTED, reason="empty", msg="the object is empty (0 bytes)")
        fmt = sniff(head)
        if fmt is None:
            return self._finish(item_id, ItemStatus.REJECTED, reason="not_image",
                                msg="not an image: the content is not JPEG, PNG, BMP or PDF")
        if fmt not in self.limits.allowed:
            return self._finish(item_id, ItemStatus.REJECTED, reason="unsupported_format",
                                msg=f"{fmt.upper()} is not accepted by the provider (JPG, JPEG, PNG, BMP, PDF)")
        return self._submit(item_id, ImagePayload(url=self.url_for(uri)), None)

    # -- calling the provider ------------------------------------------------------------------
    def _submit(self, item_id: int, payload: ImagePayload, digest: str | None) -> str:
        calls = 0
        clock_resigned = False
        call = self.provider.prepare(payload)  # encoded once; every send signs it anew

        retrying = Retrying(
            stop=stop_after_attempt(self.retry.max_attempts),
            wait=wait_exponential_jitter(multiplier=self.retry.initial, max=self.retry.max_wait, jitter=self.retry.initial),
            retry=retry_if_exception_type(_Again),
            sleep=self.sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    calls += 1
                    result = self._call_once(item_id, calls, call)
                    if result.outcome in (Outcome.TRANSIENT, Outcome.UNKNOWN):
                        raise _Again(result)
                    if result.outcome is Outcome.CLOCK and not clock_resigned:
                        clock_resigned = True  # a fresh `time` is signed on the next call
                        raise _Again(result)
        except _Again as exc:
            r = exc.result
            if r.outcome is Outcome.CLOCK:
                # the attempts ran out before the re-sign: still a clock problem, never a failure
                self._pause("clock", pause_reason(r, self.provider.name))
                return self._park(item_id, sha256=digest, code=r.code, msg=r.msg)
            return self._finish(
                item_id, ItemStatus.FAILED, reason="transient", code=r.code,
                msg=f"gave up after {calls} attempts: {r.msg}", sha256=digest,
            )
        except _Paused as p:
            if p.new:
                self._pause(p.kind, p.reason)
            return self._park(item_id, sha256=digest)

        if result.outcome is Outcome.OK:
            return self._succeed(item_id, result, digest)
        if result.outcome in PAUSING:
            self._pause(PAUSING[result.outcome], pause_reason(result, self.provider.name))
            return self._park(item_id, sha256=digest, code=result.code, msg=result.msg)
        reason = "image" if result.outcome is Outcome.IMAGE else "refused"
        return self._finish(
            item_id, ItemStatus.FAILED, reason=reason, code=result.code, msg=result.msg,
            ocrid=result.ocrid, sha256=digest,
        )

    def _call_once(self, item_id: int, number: int, call: Any) -> ProviderResult:
        self._check_gate()
        reservation = None
        if self.quota is not None:
            try:
                reservation = self.quota.reserve()
            except self.quota_exhausted as exc:
                raise _Paused("quota", f"{self.provider.name} quota at its low watermark ({exc}); "
                              "submissions resume when a balance reading shows it topped up",
                              new=True) from None
        try:
            with unit_of_work(self.db) as s:
                attempt_id = repo.start_attempt(s, item_id, number, self.provider.name).id
                # each call renews the claim: only a worker silent for a whole lease loses it
                repo.set_status(s, item_id, ItemStatus.SUBMITTING, attempts=number, claimed_at=utcnow())
            # The slot is taken last, right before the send: work between the two would shift
            # calls in time and let more than the rate arrive within some second. A pause that
            # came while we waited is seen just before the slot.
            if self.limiter is not None:
                self.limiter.acquire(before_slot=lambda: self._check_gate(
                    unsent_attempt=attempt_id, reserved=reservation is not None))
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        started = time.monotonic()
        result: ProviderResult | None = None
        try:
            result = self.provider.send(call)
        finally:
            if reservation is not None:
                # no result means the client itself blew up mid-call: count it as billed
                reservation.commit(result is None or result.outcome in BILLED)
        elapsed = int((time.monotonic() - started) * 1000)
        with unit_of_work(self.db) as s:
            repo.finish_attempt(
                s, attempt_id, outcome=result.outcome.value, code=result.code, msg=result.msg,
                http_status=result.http_status, elapsed_ms=elapsed, ocrid=result.ocrid,
            )
        log.info(
            "item %s attempt %d: %s code=%s in %d ms",
            item_id, number, result.outcome.value, result.code, elapsed,
        )
        return result

    def _check_gate(self, unsent_attempt: int | None = None, reserved: bool = False) -> None:
        with unit_of_work(self.db, read_only=True) as s:
            pause = repo.open_pause(s, self.provider.name, self.provider.account)
        if pause is None:
            return
        if reserved and pause.kind == "quota" and self._reservations_covered():
            # This call holds a reservation the ledger still covers: the quota pause (opened
            # by the next call the ledger refused) is for the calls after it. Giving it up
            # would leave paid quota unused and make the pause flap at every balance reading.
            return
        if unsent_attempt is not None:
            with unit_of_work(self.db) as s:
                repo.delete_attempt(s, unsent_attempt)  # it was never sent
        raise _Paused(pause.kind, pause.reason)

    def _reservations_covered(self) -> bool:
        """Whether the ledger still vouches for the calls it granted: it has a balance reading
        and that reading, less the calls committed since, is above the low watermark. Not
        ``remaining - reserved``: a reading taken while calls are in flight already excludes the
        ones billed before it, which are still reserved until they commit, so that difference
        runs short of the truth for as long as any call is in flight. Without a reading
        (showapi, or a provider refusal before any) a quota pause stops reserved calls too."""
        snapshot = getattr(self.quota, "snapshot", None)
        if snapshot is None:
            return False
        remaining = snapshot().remaining
        return remaining is not None and remaining > getattr(self.quota, "low_watermark", 0)

    # -- persisting ----------------------------------------------------------------------------
    def _succeed(self, item_id: int, result: ProviderResult, digest: str | None) -> str:
        side = result.side or ""
        checks = check_fields(side, result.fields, today=self.today().date()) if side else {}
        f = result.fields
        with unit_of_work(self.db) as s:
            repo.save_result(
                s,
                Result(
                    item_id=item_id,
                    provider=self.provider.name,
                    side=result.side,
                    name=f.get("name"),
                    gender=f.get("gender"),
                    ethnicity=f.get("ethnicity"),
                    date_of_birth=f.get("date_of_birth"),
                    domicile=f.get("domicile"),
                    id_number=f.get("id_number"),
                    issue_authority=f.get("issue_authority"),
                    valid_from=f.get("valid_from"),
                    valid_to=f.get("valid_to"),
                    quality=result.extra.get("quality"),
                    checks=checks,
                    raw=result.raw,
                ),
            )
            repo.set_status(
                s, item_id, ItemStatus.SUCCEEDED, reason=None, code=result.code,
                msg=result.msg, ocrid=result.ocrid, sha256=digest,
            )
        if side:
            self._pair(item_id)
        return ItemStatus.SUCCEEDED

    def _pair(self, item_id: int) -> None:
        """Check the card's two sides together once both are recognised. After the result's own
        commit: of two sides finishing together, the later commit sees the earlier one. Looked
        up first without a write lock: most images have no partner yet."""
        try:
            with unit_of_work(self.db, read_only=True) as s:
                group = repo.pair_group(s, item_id)
            if len(group) == 2:
                with unit_of_work(self.db) as s:
                    repo.store_pair_checks(s, group)
        except Exception as exc:  # the result stands; `idocr export` pairs the batch again
            # the class only: a database error quotes its parameters (file names, fields)
            log.warning("item %s: pairing with the other side failed (%s)", item_id, type(exc).__name__)

    def _finish(self, item_id: int, status: str, *, final: bool = True, **values: object) -> str:
        with unit_of_work(self.db) as s:
            repo.set_status(s, item_id, status, **values)
        if final and status != ItemStatus.SUCCEEDED:
            log.info("item %s: %s (%s)", item_id, status, values.get("reason") or values.get("code"))
        return status

    def _park(self, item_id: int, **values: object) -> str:
        """``paused`` while the pause is open — the resume re-enqueues it. If the pause ended
        meanwhile, the resume may already have passed this item by: back in the queue, then,
        with a message of its own."""
        with unit_of_work(self.db) as s:
            parked = repo.park_if_paused(s, item_id, self.provider.name, self.provider.account, **values)
            if not parked:
                repo.set_status(s, item_id, ItemStatus.QUEUED, **values)
        if parked:
            return ItemStatus.PAUSED
        if self.enqueue is not None:
            self.enqueue([item_id])
        return ItemStatus.QUEUED

    def _pause(self, kind: str, reason: str) -> None:
        with unit_of_work(self.db) as s:
            repo.add_pause(s, self.provider.name, self.provider.account, kind, reason)
        log.warning("submissions paused (%s): %s", kind, reason)
        if self.on_pause is not None:
            self.on_pause(kind, reason)
