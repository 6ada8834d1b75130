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
* only transient failures are retried (tenacity, exponential backoff with jitter, bounded);
* the database and Redis failing are not the image's fault: every step that needs them waits
  the outage out (:mod:`pipeline.coordination.resilience`) instead of failing the item or
  dropping its message;
* a paid answer is written together with its attempt and the item's final status, in one
  transaction guarded by the claim; if that write fails the answer goes to the journal
  (:mod:`pipeline.coordination.journal`) first, and a takeover or the reconciler uses it
  instead of calling
  again;
* a takeover (the claim's lease ran out: its worker died) settles what the lost worker left:
  a journaled answer is used; an attempt that never left (no sent mark) is dropped; one that
  may have reached the provider is closed ``unknown`` and the item fails with reason
  ``unknown`` rather than paying again (unless ``resend_unknown``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from pipeline import metrics
from pipeline.coordination.admission import Admission
from pipeline.coordination.gate import PauseSignal
from pipeline.coordination.heartbeat import Heartbeat
from pipeline.coordination.journal import AnswerJournal, Entry, SentMarks
from pipeline.coordination.resilience import OutageTooLong, is_infra_error, outlast
from pipeline.domain.checks import check_fields
from pipeline.domain.images import ImageLimits, ImageRejected, prepare, sniff
from pipeline.outputs.events import QUEUE_PAUSED, Outbox, pause_data
from pipeline.providers.base import ImagePayload, Outcome, Provider, ProviderResult
from pipeline.sources import read_uri
from pipeline.sources.base import SourceError
from pipeline.storage import repo
from pipeline.storage.db import engine_for, one_statement, unit_of_work
from pipeline.storage.models import ItemStatus, utcnow

log = logging.getLogger(__name__)

#: outcomes after which the call may have cost money
BILLED = frozenset({Outcome.OK, Outcome.IMAGE, Outcome.UNKNOWN, Outcome.ERROR})
#: outcomes that stop every submission to the account until someone (or the monitor) resumes
PAUSING = {Outcome.QUOTA: "quota", Outcome.AUTH: "auth", Outcome.CLOCK: "clock"}
#: answers that settle the item: paid for, and never to be asked for again
ANSWERS = frozenset({Outcome.OK, Outcome.IMAGE, Outcome.ERROR})


class RateLimiterLike(Protocol):
    def acquire(
        self, timeout: float | None = None, *, before_slot: Callable[[], None] | None = None
    ) -> float: ...


class QuotaExhaustedLike(Exception):
    """Raised by a quota ledger when no call may be made."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    initial: float = 1.0
    max_wait: float = 30.0


@dataclass(frozen=True, slots=True)
class Work:
    """A claimed item, and the attempt recorded with the claim for its first call."""

    item_id: int
    batch_id: str
    uri: str
    sha256: str | None
    size: int | None
    via: str
    pair_key: str | None
    #: recorded with the claim for the first call; None once that call went elsewhere
    attempt_id: int | None
    #: the processor of the provider the calls go to (a failover chain's first one not paused)
    route: Any = None
    #: this claim's identity (worker and a token): calls are sent only while it owns the item
    claimant: str = ""


class _TakenOver(Exception):
    """The claim was taken over (this worker was cut off for a whole lease): no call."""


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


def result_row(
    item_id: int, provider: str, result: ProviderResult, today: datetime
) -> dict[str, Any]:
    side = result.side or ""
    f = result.fields
    return dict(
        item_id=item_id,
        provider=provider,
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
        checks=check_fields(side, f, today=today.date()) if side else {},
        raw=result.raw,
    )


def apply_answer(
    session: Any, entry: Entry, guard: Any, today: datetime, outbox: Outbox | None = None
) -> str | None:
    """Write a paid answer: its attempt closed, the item's final status and, for a success, its
    result — where ``guard`` still holds — and its ``item.finished`` event (``outbox``). Returns
    the status, or None when the item was no longer the writer's to settle (the attempt is
    recorded all the same)."""
    r = entry.result
    out = outbox or NO_WEBHOOK
    repo.finish_attempt(
        session,
        entry.attempt_id,
        outcome=r.outcome.value,
        code=r.code,
        msg=r.msg,
        http_status=r.http_status,
        elapsed_ms=entry.elapsed_ms or 0,
        ocrid=r.ocrid,
    )
    values: dict[str, Any] = {"code": r.code, "msg": r.msg, "ocrid": r.ocrid}
    if entry.sha256:
        values["sha256"] = entry.sha256
    if r.outcome is Outcome.OK:
        if not repo.settle(
            session, entry.item_id, ItemStatus.SUCCEEDED, guard, reason=None, **values
        ):
            return None
        repo.save_result(session, result_row(entry.item_id, entry.provider, r, today))
        out.item_finished(session, entry.item_id, ItemStatus.SUCCEEDED, code=r.code, ocrid=r.ocrid)
        return ItemStatus.SUCCEEDED
    reason = "image" if r.outcome is Outcome.IMAGE else "refused"
    if not repo.settle(session, entry.item_id, ItemStatus.FAILED, guard, reason=reason, **values):
        return None
    out.item_finished(
        session, entry.item_id, ItemStatus.FAILED, reason=reason, code=r.code, ocrid=r.ocrid
    )
    return ItemStatus.FAILED


def apply_answer_at_once(
    session: Any,
    entry: Entry,
    worker: str,
    today: datetime,
    outbox: Outbox | None = None,
    pair: tuple[str, str] | None = None,
) -> tuple[str | None, bool]:
    """:func:`apply_answer` for the worker holding the claim, in one statement (PostgreSQL):
    the same rows, one round trip. Also returns whether the card may have its other side: with
    ``pair`` (batch, pair key), False when no other item of the batch had that key as the
    statement began (none can have finished, so there is nothing to pair yet)."""
    r = entry.result
    out = outbox or NO_WEBHOOK
    values: dict[str, Any] = {"code": r.code, "msg": r.msg, "ocrid": r.ocrid}
    if entry.sha256:
        values["sha256"] = entry.sha256
    result = None
    if r.outcome is Outcome.OK:
        status, values["reason"] = ItemStatus.SUCCEEDED, None
        result = result_row(entry.item_id, entry.provider, r, today)
    else:
        status = ItemStatus.FAILED
        values["reason"] = "image" if r.outcome is Outcome.IMAGE else "refused"
    attempt = {
        "id": entry.attempt_id,
        "outcome": r.outcome.value,
        "code": r.code,
        "msg": r.msg,
        "http_status": r.http_status,
        "elapsed_ms": entry.elapsed_ms or 0,
        "ocrid": r.ocrid,
    }
    event = out.item_finished_row(status, reason=values["reason"], code=r.code, ocrid=r.ocrid)
    settled, others = repo.settle_answer(
        session,
        item_id=entry.item_id,
        worker=worker,
        status=status,
        values=values,
        attempt=attempt,
        event=event,
        result=result,
        pair=pair if result is not None else None,
    )
    return (status if settled else None), others != 0


#: events of a writer that was not told about a webhook
NO_WEBHOOK = Outbox()

UNKNOWN_MSG = (
    "the worker was lost while the provider had this image: it may have been billed and the "
    "answer is lost; `--retry-unknown` sends it again"
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
        quota=None,
        quota_exhausted: type[Exception] = QuotaExhaustedLike,
        on_pause: Callable[[str, str], None] | None = None,
        reader: Callable[[str], bytes] = read_uri,
        head_reader: Callable[[str], bytes] | None = None,
        url_for: Callable[[str], str] | None = None,
        first_claim: Callable[[str, int], int] | None = None,
        claim_lease: timedelta = timedelta(minutes=1),
        enqueue: Callable[[list[int]], None] | None = None,
        journal: AnswerJournal | None = None,
        sent_marks: SentMarks | None = None,
        admission: Admission | None = None,
        heartbeat: Heartbeat | None = None,
        infra_patience: float = 3600.0,
        resend_unknown: bool = False,
        pause_signal: PauseSignal | None = None,
        gate_ttl: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        today: Callable[[], datetime] = lambda: datetime.now(UTC),
        outbox: Outbox | None = None,
    ) -> None:
        self.db = database_url
        #: where final statuses and pauses write their events (docs/events.md)
        self.outbox = outbox or NO_WEBHOOK
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
        self.journal = journal
        self.sent_marks = sent_marks
        #: the first call's reservation, slot and sent mark in one Redis round trip (the quota,
        #: limiter and marks above, on one Redis); without it, one each
        self.admission = admission
        self.heartbeat = heartbeat
        self.infra_patience = infra_patience
        self.resend_unknown = resend_unknown
        self.pause_signal = pause_signal
        self.gate_ttl = gate_ttl
        self.sleep = sleep
        self.today = today
        self._gate_lock = threading.Lock()
        # (valid until, the pause signal's version then, the open pause or None)
        self._gate: tuple[float, bytes | None, Any] = (0.0, None, None)
        self._via: dict[str, str] = {}  # batch → bytes | url (fixed when the batch is created)
        #: per thread, (batch, pair key) of the items of the message it works that are still
        #: to come (:meth:`process_many`), each with its count
        self._later_pairs = threading.local()
        #: PostgreSQL writes an answer in one statement (data-modifying WITHs)
        self._one_statement = database_url.startswith("postgresql")
        #: the next provider of a failover chain, and the chain's first (pauses park with it)
        self.fallback: Processor | None = None
        self.primary: Processor = self
        #: whether threads of this process wait for work (the queue ran dry): the items of a
        #: message that has run ``hand_back_after`` seconds are then given back, one message
        #: each, rather than worked one after the other while those threads idle
        self.spare: Callable[[], bool] | None = None
        self.hand_back_after = 0.25

    def warm_up(self, connections: int) -> None:
        """Before the first message: open up to ``connections`` database connections, and on
        PostgreSQL run the claim and answer statements once on no item at all (an empty id
        list; item -1, which no row has), so that building and caching them, and the first
        connections, are not paid inside the first tasks, all threads at once."""
        size = getattr(engine_for(self.db).pool, "size", lambda: 1)()
        with ExitStack() as opened:  # never beyond the pool's steady size: no overflow, no wait
            for _ in range(max(1, min(connections, size))):
                opened.enter_context(one_statement(self.db))
        if not self._one_statement:
            return
        with one_statement(self.db) as conn:
            repo.claim_many_with_attempts(
                conn, [], self.worker_id, stale_before=utcnow(), provider=self.provider.name
            )
            for outcome, side in ((Outcome.OK, "front"), (Outcome.IMAGE, None)):
                result = ProviderResult(outcome, "0", "", ocrid="0", side=side, raw={})
                entry = Entry(-1, -1, self.provider.name, "0" * 64, result, self.worker_id, 0)
                apply_answer_at_once(
                    conn, entry, self.worker_id, self.today(), self.outbox, ("", "")
                )

    def _outlast(self, fn: Callable[[], Any], what: str) -> Any:
        return outlast(fn, what, patience=self.infra_patience, sleep=self.sleep)

    # -- the task body -------------------------------------------------------------------------
    def process(self, item_id: int) -> str:
        """Returns the item's status after this delivery ("skipped": someone else has it).
        Raises :class:`~pipeline.coordination.resilience.OutageTooLong` when the database or
        Redis stayed
        away for the whole patience: the caller hands the message back."""
        if self.heartbeat is not None:
            self.heartbeat.hold(item_id)
        try:
            claimed = self._outlast(lambda: self._claim(item_id), f"item {item_id}: claim")
            return self._go_on(claimed)
        finally:
            if self.heartbeat is not None:
                self.heartbeat.release(item_id)

    def process_many(self, item_ids: Sequence[int]) -> list[str]:
        """:meth:`process` for the items of one message, one after the other. On PostgreSQL
        their claims, with their first attempts, are made together in one statement before the
        first is worked on: a second delivery of the message finds every one of them taken,
        and the heartbeat keeps the claims of those still waiting alive."""
        ids = list(dict.fromkeys(int(i) for i in item_ids))
        started = time.monotonic()
        route = self._route() if self._one_statement and len(ids) > 1 else None
        if route is None:  # one item, SQLite, or paused (each item parks on its own)
            done: list[str] = []
            for n, i in enumerate(ids):
                if n and self._hand_back_now(started):  # not claimed yet: new messages only
                    self._requeue(ids[n:])
                    return done + [ItemStatus.QUEUED] * (len(ids) - n)
                done.append(self.process(i))
            return done
        if self.heartbeat is not None:
            for i in ids:
                self.heartbeat.hold(i)
        later = self._later_pairs.pairs = {}
        try:
            claims, fresh = self._claim_many(ids, route)
            for c in claims.values():
                if isinstance(c, Work) and c.pair_key is not None:
                    key = (c.batch_id, c.pair_key)
                    later[key] = later.get(key, 0) + 1
            out: list[str] = []
            handed: set[int] | None = None
            for n, i in enumerate(ids):
                if handed is None and n and self._hand_back_now(started):
                    rest = [(j, fresh[j]) for j in ids[n:] if j in fresh]
                    if rest:
                        handed = self._hand_back(rest)
                c = claims.get(i, "skipped")
                if isinstance(c, Work) and c.pair_key is not None:
                    key = (c.batch_id, c.pair_key)
                    later[key] -= 1
                    if not later[key]:
                        del later[key]
                if handed is not None and i in fresh:
                    # given back (queued, in a message of its own), or taken over meanwhile
                    out.append(ItemStatus.QUEUED if i in handed else "taken_over")
                    continue
                out.append(self._go_on(c))
            return out
        finally:
            self._later_pairs.pairs = {}
            if self.heartbeat is not None:
                for i in ids:
                    self.heartbeat.release(i)

    def _hand_back_now(self, started: float) -> bool:
        return (
            self.spare is not None
            and self.enqueue is not None
            and time.monotonic() - started >= self.hand_back_after
            and self.spare()
        )

    def _requeue(self, item_ids: Sequence[int]) -> None:
        """Each item in a message of its own (the reconciler sends again one that is lost)."""
        enqueue = self.enqueue
        assert enqueue is not None
        for i in item_ids:
            self._outlast(partial(enqueue, [i]), f"item {i}: enqueue")

    def _hand_back(self, claims: list[tuple[int, int]]) -> set[int]:
        """Give back claims of this message never sent (item, attempt row recorded with the
        claim): queued again, each in a message of its own, for the threads waiting for work.
        Returns the items given back (one missing was taken over meanwhile)."""

        def write() -> list[int]:
            with unit_of_work(self.db) as s:
                return repo.unclaim(s, claims, self.worker_id)

        back = self._outlast(write, f"{len(claims)} items: hand back")
        self._requeue(back)
        log.debug("%d items of a slow message handed back to idle threads", len(back))
        return set(back)

    def _go_on(self, claimed: str | Work) -> str:
        """The rest of a delivery after its claim: the work, or the status it ended with."""
        if isinstance(claimed, str):
            return claimed
        item_id = claimed.item_id
        try:
            return self._work(claimed)
        except (OutageTooLong, _Paused):
            raise
        except Exception as exc:
            if is_infra_error(exc):
                raise
            # A defect, not the image's fault and not the infrastructure's: the item ends
            # failed with the class named, instead of coming back with every takeover.
            log.error("item %s: %s in the worker", item_id, type(exc).__name__)
            self._outlast(lambda: self._close_open_attempts(item_id), f"item {item_id}: attempts")
            return self._finish(
                claimed,
                ItemStatus.FAILED,
                reason="internal_error",
                sent=True,
                msg=f"{type(exc).__name__} in the worker; see its log",
            )

    def _claim_many(
        self, ids: list[int], route: Processor
    ) -> tuple[dict[int, str | Work], dict[int, int]]:
        """The claims of :meth:`process_many`: by item id, the work to go on with or the status
        the delivery ends with (an id missing was not claimable); and the claims made fresh,
        with no predecessor's calls, by item id: their attempt rows."""

        def claim() -> dict[int, tuple[repo.Claimed, int | None]]:
            with one_statement(self.db) as s:
                return repo.claim_many_with_attempts(
                    s,
                    ids,
                    self.worker_id,
                    stale_before=utcnow() - self.claim_lease,
                    provider=route.provider.name,
                )

        got = self._outlast(claim, f"{len(ids)} items: claim")
        out: dict[int, str | Work] = {}
        fresh: dict[int, int] = {}
        owners: dict[int, str] = {}
        for item_id, (row, attempt_id) in got.items():
            if attempt_id is None:  # a predecessor made calls: settled in a transaction
                out[item_id] = self._outlast(
                    partial(self._claim_in_transaction, item_id, claimed=row),
                    f"item {item_id}: takeover",
                )
                continue
            work = self._work_of(item_id, row, self._batch_via(row.batch_id), attempt_id, route)
            out[item_id] = work
            fresh[item_id] = attempt_id
            owners[item_id] = work.claimant
        if owners and self.sent_marks is not None:
            marks = self.sent_marks
            self._outlast(lambda: marks.own_many(owners), "claim owners")
        return out, fresh

    def _batch_via(self, batch: str) -> str:
        """How the batch's images reach the provider (bytes or url), read once per process."""
        via = self._via.get(batch)
        if via is None:

            def read() -> str:
                with unit_of_work(self.db, read_only=True, single=True) as rs:
                    return repo.batch_via(rs, batch)

            via = self._via.setdefault(batch, self._outlast(read, "batch"))
        return via

    def _claim(self, item_id: int) -> str | Work:
        """The claim, what a lost predecessor left behind, and the first call's attempt row:
        the work to go on with, or the status this delivery ends with. On PostgreSQL, with a
        provider to call, the usual case (no predecessor) is one statement."""
        if self._one_statement:
            route = self._route()
            if route is not None:
                return self._claim_at_once(item_id, route)
        return self._claim_in_transaction(item_id)

    def _claim_at_once(self, item_id: int, route: Processor) -> str | Work:
        with one_statement(self.db) as s:
            got = repo.claim_with_attempt(
                s,
                item_id,
                self.worker_id,
                stale_before=utcnow() - self.claim_lease,
                provider=route.provider.name,
            )
        if got is None:
            log.debug("item %s: not queued any more, delivery ignored", item_id)
            return "skipped"
        row, attempt_id = got
        if attempt_id is None:  # a predecessor made calls: settled in a transaction
            return self._claim_in_transaction(item_id, claimed=row)
        work = self._work_of(item_id, row, self._batch_via(row.batch_id), attempt_id, route)
        if self.sent_marks is not None:
            marks = self.sent_marks
            self._outlast(lambda: marks.own(item_id, work.claimant), "claim owner")
        return work

    def _work_of(self, item_id: int, row: Any, via: str, attempt_id: int, route: Processor) -> Work:
        """The work of a claim just made, under a claimant token of its own."""
        return Work(
            item_id,
            row.batch_id,
            row.source_uri,
            row.sha256,
            row.size,
            via,
            row.pair_key,
            attempt_id,
            route,
            f"{self.worker_id}/{uuid.uuid4().hex[:12]}",
        )

    def _claim_in_transaction(self, item_id: int, claimed: Any = None) -> str | Work:
        """:meth:`_claim` in one transaction; ``claimed``: the row of a claim already made."""
        applied: str | None = None
        with unit_of_work(self.db) as s:
            row = claimed or repo.claim_row(
                s, item_id, self.worker_id, stale_before=utcnow() - self.claim_lease
            )
            if row is None:
                log.debug("item %s: not queued any more, delivery ignored", item_id)
                return "skipped"
            if row.attempts:  # a predecessor made calls: settle what it left first
                entry = self.journal.get(item_id) if self.journal is not None else None
                if entry is not None:
                    # a paid answer its worker could not write: use it, never call again
                    applied = apply_answer(
                        s, entry, repo.answerable(worker=self.worker_id), self.today(), self.outbox
                    )
                elif self._takeover_failed(s, item_id):
                    return ItemStatus.FAILED
            if applied is None:
                route = self._route()
                if route is None:
                    if repo.park_if_paused(s, item_id, self.provider.name, self.provider.account):
                        return ItemStatus.PAUSED
                    route = self  # the pause ended meanwhile
                via = self._via.get(row.batch_id) or self._via.setdefault(
                    row.batch_id, repo.batch_via(s, row.batch_id)
                )
                attempt_id = repo.insert_attempt(s, item_id, 1, route.provider.name)
                work = self._work_of(item_id, row, via, attempt_id, route)
        if applied is None:
            if self.sent_marks is not None:
                marks = self.sent_marks
                self._outlast(lambda: marks.own(item_id, work.claimant), "claim owner")
            return work
        if self.journal is not None:
            self.journal.drop(item_id)
        if applied == ItemStatus.SUCCEEDED and row.pair_key is not None:
            self._pair(item_id, (row.batch_id, row.pair_key))
        return applied or "skipped"

    def _close_open_attempts(self, item_id: int) -> None:
        with unit_of_work(self.db) as s:
            repo.close_attempts_unknown(s, repo.open_attempts(s, item_id))

    def _route(self) -> Processor | None:
        """This provider if it is not paused, else the next of the chain that is not; None
        when every one is paused."""
        p: Processor | None = self
        while p is not None:
            if p._open_pause() is None:
                return p
            p = p.fallback
        return None

    def _failover(self, w: Work, payload: ImagePayload, digest: str | None) -> str | None:
        """This provider just paused: the same image to the next provider of the chain that is
        not paused (the refusal that paused this one billed nothing), or None."""
        nxt = self.fallback._route() if self.fallback is not None else None
        if nxt is None:
            return None
        log.warning(
            "item %s: %s paused, sent to %s", w.item_id, self.provider.name, nxt.provider.name
        )
        return nxt._submit(replace(w, attempt_id=None, route=nxt), payload, digest)

    def _takeover_failed(self, s: Any, item_id: int) -> bool:
        """Attempts a lost worker left open: one never sent is dropped; one that may have
        reached the provider is closed ``unknown``, and unless ``resend_unknown`` the item fails
        with that reason (True) rather than paying a second time."""
        lost = repo.open_attempts(s, item_id)
        if not lost:
            return False
        sent = self.sent_marks.sent(lost) if self.sent_marks is not None else set(lost)
        for attempt_id in lost:
            if attempt_id not in sent:
                repo.delete_attempt(s, attempt_id)  # it never left the worker
        repo.close_attempts_unknown(s, sorted(sent))
        metrics.record_unknown(self.provider.name, len(sent))
        if sent and not self.resend_unknown:
            repo.set_status(s, item_id, ItemStatus.FAILED, reason=repo.UNKNOWN, msg=UNKNOWN_MSG)
            self.outbox.item_finished(s, item_id, ItemStatus.FAILED, reason=repo.UNKNOWN)
            metrics.record_item_final(ItemStatus.FAILED, repo.UNKNOWN)
            return True
        return False

    def _work(self, w: Work) -> str:
        if w.via == "url":
            return self._process_by_url(w)
        try:
            data = self.reader(w.uri)
        except SourceError as exc:
            return self._finish(w, ItemStatus.REJECTED, reason="unreadable", msg=str(exc))
        digest = hashlib.sha256(data).hexdigest()
        if w.sha256 and digest != w.sha256:
            return self._finish(
                w,
                ItemStatus.REJECTED,
                reason="changed",
                msg="the file changed after it was scanned; scan the source again",
            )
        if not w.sha256:
            # Listed without reading (S3): identical bytes are found only now.
            original = self._original_of(w.item_id, digest)
            if original is not None:
                return self._finish(
                    w,
                    ItemStatus.DUPLICATE,
                    reason=repo.SAME_CONTENT,
                    duplicate_of=original,
                    sha256=digest,
                )
        try:
            prepared = prepare(data, self.limits)
        except ImageRejected as exc:
            return self._finish(
                w, ItemStatus.REJECTED, reason=exc.reason, msg=str(exc), sha256=digest
            )
        del data
        return w.route._submit(w, ImagePayload(data=prepared.data), digest)

    def _original_of(self, item_id: int, digest: str) -> int | None:
        """Another item with these bytes that succeeded or is on its way, or None. Two workers
        meeting the same bytes at once agree through ``first_claim`` (first one wins)."""

        def look() -> int | None:
            with unit_of_work(self.db, read_only=True, single=True) as s:
                return repo.canonical_items(s, [digest]).get(digest)

        known = self._outlast(look, f"item {item_id}: same-content look-up")
        if known is not None and known != item_id:
            return known
        if self.first_claim is not None:
            winner = self._outlast(
                lambda: self.first_claim(digest, item_id),  # type: ignore[misc]
                f"item {item_id}: same-content claim",
            )
            if winner != item_id:
                return winner
        return None

    def _process_by_url(self, w: Work) -> str:
        """The provider fetches the image itself: only what the listing and the first bytes
        tell can be checked here, and the bytes never pass through the worker."""
        if self.url_for is None or self.head_reader is None:
            return self._finish(
                w,
                ItemStatus.REJECTED,
                reason="no_url",
                msg="this source cannot give the provider a URL; scan it with --via bytes",
            )
        if w.size is not None and w.size > self.limits.max_payload_bytes:
            return self._finish(
                w,
                ItemStatus.REJECTED,
                reason="too_large",
                msg=f"the object is {w.size} bytes; the provider fetches at most "
                f"{self.limits.max_payload_bytes}",
            )
        try:
            head = self.head_reader(w.uri)
        except SourceError as exc:
            return self._finish(w, ItemStatus.REJECTED, reason="unreadable", msg=str(exc))
        if not head:
            return self._finish(
                w, ItemStatus.REJECTED, reason="empty", msg="the object is empty (0 bytes)"
            )
        fmt = sniff(head)
        if fmt is None:
            return self._finish(
                w,
                ItemStatus.REJECTED,
                reason="not_image",
                msg="not an image: the content is not JPEG, PNG, BMP or PDF",
            )
        if fmt not in self.limits.allowed:
            return self._finish(
                w,
                ItemStatus.REJECTED,
                reason="unsupported_format",
                msg=f"{fmt.upper()} is not accepted by the provider (JPG, JPEG, PNG, BMP, PDF)",
            )
        try:
            url = self.url_for(w.uri)
        except SourceError as exc:
            return self._finish(w, ItemStatus.REJECTED, reason="no_url", msg=str(exc))
        return w.route._submit(w, ImagePayload(url=url), None)

    # -- calling the provider ------------------------------------------------------------------
    def _submit(self, w: Work, payload: ImagePayload, digest: str | None) -> str:
        item_id = w.item_id
        calls = 0
        clock_resigned = False
        call = self.provider.prepare(payload)  # encoded once; every send signs it anew

        def one_call() -> tuple[ProviderResult, int, int]:
            nonlocal calls, clock_resigned
            calls += 1
            # the first call's attempt row was written with the claim
            pre = w.attempt_id if calls == 1 else None
            got = self._call_once(item_id, calls, call, pre, claimant=w.claimant)
            outcome = got[0].outcome
            if outcome in (Outcome.TRANSIENT, Outcome.UNKNOWN):
                raise _Again(got[0])
            if outcome is Outcome.CLOCK and not clock_resigned:
                clock_resigned = True  # a fresh `time` is signed on the next call
                raise _Again(got[0])
            return got

        try:
            try:  # the usual case, without building the retry machinery
                result, attempt_id, elapsed = one_call()
            except _Again as first:
                failed = [first]

                def again() -> tuple[ProviderResult, int, int]:
                    # the retry machinery's first attempt is the call that just failed
                    if failed:
                        raise failed.pop()
                    return one_call()

                retrying = Retrying(
                    stop=stop_after_attempt(self.retry.max_attempts),
                    wait=wait_exponential_jitter(
                        multiplier=self.retry.initial,
                        max=self.retry.max_wait,
                        jitter=self.retry.initial,
                    ),
                    retry=retry_if_exception_type(_Again),
                    before_sleep=self._count_retry,
                    sleep=self.sleep,
                    reraise=True,
                )
                result, attempt_id, elapsed = retrying(again)
        except _Again as exc:
            r = exc.result
            if r.outcome is Outcome.CLOCK:
                # the attempts ran out before the re-sign: still a clock problem, never a failure
                self._pause("clock", pause_reason(r, self.provider.name))
                return self._failover(w, payload, digest) or self._park(
                    item_id, sha256=digest, code=r.code, msg=r.msg
                )
            return self._finish(
                w,
                ItemStatus.FAILED,
                reason="transient",
                code=r.code,
                msg=f"gave up after {calls} attempts: {r.msg}",
                sha256=digest,
                sent=True,
            )
        except _Paused as p:
            if p.new:
                self._pause(p.kind, p.reason)
            return self._failover(w, payload, digest) or self._park(item_id, sha256=digest)
        except _TakenOver:
            log.warning("item %s: taken over while this worker was cut off; not sent", item_id)
            return "taken_over"

        if result.outcome in ANSWERS:
            pair = (w.batch_id, w.pair_key) if w.pair_key is not None else None
            return self._settle(
                Entry(
                    item_id, attempt_id, self.provider.name, digest, result, self.worker_id, elapsed
                ),
                pair=pair,
            )
        if result.outcome in PAUSING:
            self._pause(PAUSING[result.outcome], pause_reason(result, self.provider.name))
            return self._failover(w, payload, digest) or self._park(
                item_id, sha256=digest, code=result.code, msg=result.msg
            )
        raise AssertionError(f"unhandled outcome {result.outcome}")  # pragma: no cover

    def _count_retry(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _Again):
            metrics.record_retry(self.provider.name, exc.result.outcome.value)

    def _call_once(
        self,
        item_id: int,
        number: int,
        call: Any,
        attempt_id: int | None = None,
        claimant: str | None = None,
    ) -> tuple[ProviderResult, int, int]:
        """One call: (answer, attempt id, ms). ``attempt_id``: the attempt already recorded
        (with the claim) for this call, dropped if no call is made. An answer that settles the
        item leaves its attempt open: it is closed in the transaction of the final status."""
        reservation = None
        marked = False  # the slot booked and the attempt marked sent, by the admission
        admission = self.admission if attempt_id is not None and claimant is not None else None
        try:
            self._check_gate(unsent_attempt=attempt_id)
            if self.quota is not None:
                try:
                    if admission is not None:
                        first, owner = attempt_id, claimant
                        assert first is not None and owner is not None
                        admitted = self._outlast(
                            lambda: admission.admit(item_id, first, owner), "admission"
                        )
                        if admitted is None:
                            raise _TakenOver()
                        reservation, marked = admitted
                    else:
                        reservation = self._outlast(self.quota.reserve, "quota reservation")
                except self.quota_exhausted as exc:
                    if attempt_id is not None:
                        self._drop_attempt(attempt_id)
                    raise _Paused(
                        "quota",
                        f"{self.provider.name} quota at its low watermark "
                        f"({exc}); submissions resume when a balance reading shows it "
                        "topped up",
                        new=True,
                    ) from None
            if attempt_id is None:
                attempt_id = self._outlast(
                    lambda: self._start_attempt(item_id, number), f"item {item_id}: attempt record"
                )
            recorded = attempt_id
            # The slot is taken last, right before the send: work between the two would shift
            # calls in time and let more than the rate arrive within some second. A pause that
            # came while we waited is seen just before the slot.
            if marked:
                metrics.record_limiter_wait(0.0, self.provider.name)
            elif self.limiter is not None:
                limiter = self.limiter
                waited = self._outlast(
                    lambda: limiter.acquire(
                        before_slot=lambda: self._check_gate(
                            unsent_attempt=recorded, reserved=reservation is not None
                        )
                    ),
                    "rate limiter",
                )
                metrics.record_limiter_wait(waited, self.provider.name)
            if self.sent_marks is not None and not marked:
                marks = self.sent_marks
                if not self._outlast(lambda: marks.mark(recorded, item_id, claimant), "sent mark"):
                    raise _TakenOver()
        except BaseException:
            if reservation is not None:
                self._settle_reservation(reservation.release)
            raise
        started = time.monotonic()
        result: ProviderResult | None = None
        try:
            result = self.provider.send(call)
        finally:
            # no result means the client itself blew up mid-call: count it as billed
            billed = result is None or result.outcome in BILLED
            if billed:
                metrics.record_billed(self.provider.name)
            if reservation is not None:
                self._settle_reservation(lambda: reservation.commit(billed))
        elapsed = int((time.monotonic() - started) * 1000)
        metrics.record_call(self.provider.name, result.outcome.value, result.code, elapsed / 1000)
        log.debug(
            "item %s attempt %d: %s code=%s in %d ms",
            item_id,
            number,
            result.outcome.value,
            result.code,
            elapsed,
        )
        if result.outcome not in ANSWERS:

            def finish() -> None:
                with unit_of_work(self.db) as s:
                    repo.finish_attempt(
                        s,
                        recorded,
                        outcome=result.outcome.value,
                        code=result.code,
                        msg=result.msg,
                        http_status=result.http_status,
                        elapsed_ms=elapsed,
                        ocrid=result.ocrid,
                    )

            self._outlast(finish, f"item {item_id}: attempt outcome")
        return result, recorded, elapsed

    def _start_attempt(self, item_id: int, number: int) -> int:
        with unit_of_work(self.db) as s:
            return repo.insert_attempt(s, item_id, number, self.provider.name)

    def _drop_attempt(self, attempt_id: int) -> None:
        def drop() -> None:
            with unit_of_work(self.db) as s:
                repo.delete_attempt(s, attempt_id)  # it was never sent

        self._outlast(drop, "unsent attempt")

    @staticmethod
    def _settle_reservation(settle: Callable[[], None]) -> None:
        # The ledger's bookkeeping: an unreachable Redis loses one reservation (it expires)
        # and never holds up an answer already paid for.
        try:
            settle()
        except Exception as exc:
            if not is_infra_error(exc):
                raise
            log.warning(
                "quota reservation not settled (%s); it expires on its own", type(exc).__name__
            )

    def _open_pause(self) -> Any:
        """The open pause of this account, or None. Read from SQL again only when the pause
        signal moved (a pause or resume anywhere), or ``gate_ttl`` seconds after the last read
        (:mod:`pipeline.coordination.gate`), not before every call."""
        now = time.monotonic()
        version = None
        if self.pause_signal is not None:
            signal = self.pause_signal
            version = self._outlast(signal.version, "pause signal")
        with self._gate_lock:
            until, seen, pause = self._gate
        if now < until and version == seen:
            return pause

        def read() -> Any:
            with unit_of_work(self.db, read_only=True, single=True) as s:
                return repo.open_pause(s, self.provider.name, self.provider.account)

        pause = self._outlast(read, "pause gate")
        with self._gate_lock:
            self._gate = (now + self.gate_ttl, version, pause)
        return pause

    def _check_gate(self, unsent_attempt: int | None = None, reserved: bool = False) -> None:
        pause = self._open_pause()
        if pause is None:
            return
        if reserved and pause.kind == "quota" and self._reservations_covered():
            # This call holds a reservation the ledger still covers: the quota pause (opened
            # by the next call the ledger refused) is for the calls after it. Giving it up
            # would leave paid quota unused and make the pause flap at every balance reading.
            return
        if unsent_attempt is not None:
            self._drop_attempt(unsent_attempt)
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
    def _settle(self, entry: Entry, pair: tuple[str, str] | None = None) -> str:
        """The paid answer into the database; into the journal first if the database fails.
        ``pair``: (batch, pair key) when the item's name has a side word (a partner may exist)."""
        guard = repo.answerable(worker=self.worker_id)
        ask = pair if entry.result.side else None

        def write() -> tuple[str | None, bool]:
            if self._one_statement:
                with one_statement(self.db) as s:
                    return apply_answer_at_once(
                        s, entry, self.worker_id, self.today(), self.outbox, ask
                    )
            with unit_of_work(self.db) as s:
                return apply_answer(s, entry, guard, self.today(), self.outbox), True

        journaled = False
        try:
            status, partnered = write()
        except Exception as exc:
            if not is_infra_error(exc):
                raise
            if self.journal is not None:
                self.journal.put(entry)
                journaled = True
            # OutageTooLong here leaves the answer in the journal: the reconciler writes it
            status, partnered = self._outlast(write, f"item {entry.item_id}: answer")
        if journaled and self.journal is not None:
            self.journal.drop(entry.item_id)
        if status is None:
            log.warning(
                "item %s: taken over before its answer was written; the answer is on its attempt",
                entry.item_id,
            )
            return "taken_over"
        metrics.record_item_final(
            status,
            None
            if status == ItemStatus.SUCCEEDED
            else ("image" if entry.result.outcome is Outcome.IMAGE else "refused"),
        )
        if status == ItemStatus.SUCCEEDED:
            # Nothing to look up when the card had no other side as the answer was written (a
            # side scanned later settles after this commit and pairs the two), nor when that
            # side is worked later in this thread's message (it pairs them after its commit).
            later = getattr(self._later_pairs, "pairs", None)
            if ask is not None and partnered and not (later and pair in later):
                self._pair(entry.item_id, ask)
        else:
            # DEBUG: a line per item is the log's cost at millions of images; the status, reason
            # and code are on the item and in the idocr_items_final_total counter
            log.debug("item %s: %s (%s)", entry.item_id, status, entry.result.code)
        return status

    def _pair(self, item_id: int, pair: tuple[str, str]) -> None:
        """Check the card's two sides together once both are recognised. After the result's own
        commit: of two sides finishing together, the later commit sees the earlier one. Counted
        first, without a write lock and without reading any field: most images have no partner
        yet."""
        try:
            with unit_of_work(self.db, read_only=True, single=True) as s:
                if repo.pair_count(s, *pair) != 2:
                    return
                group = repo.pair_group_of(s, *pair)
            if len(group) == 2:
                with unit_of_work(self.db) as s:
                    repo.store_pair_checks(s, group)
        except Exception as exc:  # the result stands; `idocr export` pairs the batch again
            # the class only: a database error quotes its parameters (file names, fields)
            log.warning(
                "item %s: pairing with the other side failed (%s)", item_id, type(exc).__name__
            )

    def _finish(self, w: Work, status: str, *, sent: bool = False, **values: object) -> str:
        """A final status without an answer to write. ``sent``: calls were made (their attempts
        are on record); otherwise the attempt recorded with the claim never left and is dropped."""
        item_id = w.item_id
        if values.get("sha256", "") is None:
            del values["sha256"]

        def write() -> bool:
            with unit_of_work(self.db) as s:
                if not sent and w.attempt_id is not None:
                    repo.drop_unsent_attempt(s, w.attempt_id)
                if not repo.settle(s, item_id, status, repo.held_by(self.worker_id), **values):
                    return False
                self.outbox.item_finished(
                    s,
                    item_id,
                    status,
                    reason=values.get("reason"),
                    code=values.get("code"),
                    batch_id=w.batch_id,
                )
                return True

        if not self._outlast(write, f"item {item_id}: status"):
            log.warning("item %s: taken over before it was settled", item_id)
            return "taken_over"
        metrics.record_item_final(status, values.get("reason"))
        if status != ItemStatus.SUCCEEDED:
            log.debug(
                "item %s: %s (%s)", item_id, status, values.get("reason") or values.get("code")
            )
        return status

    def _park(self, item_id: int, **values: object) -> str:
        """``paused`` while the pause is open — the resume re-enqueues it. If the pause ended
        meanwhile, the resume may already have passed this item by: back in the queue, then,
        with a message of its own."""
        if values.get("sha256", "") is None:
            del values["sha256"]

        home = self.primary.provider  # a chain parks with its first provider's pause

        def write() -> bool:
            with unit_of_work(self.db) as s:
                parked = repo.park_if_paused(s, item_id, home.name, home.account, **values)
                if not parked:
                    repo.set_status(s, item_id, ItemStatus.QUEUED, **values)
            return parked

        if self._outlast(write, f"item {item_id}: park"):
            return ItemStatus.PAUSED
        if self.enqueue is not None:
            self._requeue([item_id])
        return ItemStatus.QUEUED

    def _pause(self, kind: str, reason: str) -> None:
        def write() -> None:
            with unit_of_work(self.db) as s:
                if repo.open_pause(s, self.provider.name, self.provider.account) is None:
                    data = pause_data(self.provider.name, self.provider.account, kind, reason)
                    self.outbox.emit(s, QUEUE_PAUSED, data=data)
                repo.add_pause(s, self.provider.name, self.provider.account, kind, reason)

        self._outlast(write, "pause")
        if self.pause_signal is not None:
            self._outlast(self.pause_signal.bump, "pause signal")
        with self._gate_lock:
            self._gate = (0.0, None, None)  # this process sees its own pause at once
        metrics.record_pause(kind)
        log.warning("submissions paused (%s): %s", kind, reason)
        if self.on_pause is not None:
            self.on_pause(kind, reason)
