"""The relay: publishes the events outbox at least once (docs/events.md).

Two jobs, each in short transactions of up to ``batch`` events:

* **the results stream**: events not yet published (``published_at IS NULL``, oldest first)
  are built into their public shape (an ``item.finished`` event reads the item's record, as the
  export builds it, and the request it came from) and sent in one pipelined round trip: an
  ``XADD`` to the results stream (approximate ``MAXLEN``) each, and for an item of a request a
  ``SET <prefix>result:<idempotency key>`` (with a TTL). Then they are marked published in the
  same transaction that selected them. A crash between the send and the commit sends them again
  under the same ``event_id``: consumers dedupe by it.
* **the webhook** (when configured): deliveries due are leased (``next_delivery_at`` moved past
  the lease) and committed, POSTed signed (HMAC-SHA256 over ``<timestamp>.<body>``), then
  recorded: delivered, or retried later with exponential backoff (capped, jittered) until the
  planned waits add up to ``retry_for``, then ``dead``.

Several relays may run (every worker runs one): on PostgreSQL each takes its rows with
``FOR UPDATE SKIP LOCKED``, so no event is sent twice in the normal course; on SQLite (no row
locks) one relay at a time runs, under a Redis lock.

After a chunk is on the stream, the relay looks at the batches its ``item.finished`` events
belong to: a batch with no item left unfinished gets its ``batch.finished`` event (counts by
status and code), once per batch size (a deterministic event id): a batch extended later
finishes again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import redis
from sqlalchemy import (
    BigInteger,
    Table,
    any_,
    bindparam,
    exists,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.outputs.events import (
    BATCH_FINISHED,
    DEAD,
    DELIVERED,
    ITEM_FINISHED,
    PENDING,
    Outbox,
)
from pipeline.outputs.records import CARD_FIELDS, records_of_items, utc_iso
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import FINAL_STATUSES, Event, Item, ItemStatus, Request, utcnow

if TYPE_CHECKING:
    from pipeline.config import Settings

log = logging.getLogger(__name__)

#: an item in one of these is not final yet (every status but the final ones)
UNFINISHED = tuple(sorted(set(ItemStatus) - FINAL_STATUSES))

#: the prefix of every Redis key idocr writes
KEY_PREFIX = "idocr:"
RELAY_LOCK = f"{KEY_PREFIX}relay-lock"
#: the personal and recognised fields of a record (``fields`` in an item.finished event)
RECORD_FIELDS = ("side", *CARD_FIELDS)
_BATCH_NS = uuid.UUID("6f1c3a52-93f4-4c38-9a0e-2f1b0d7c5e11")


def result_key(idempotency_key: str) -> str:
    """The Redis key a request's ``item.finished`` event is kept under."""
    return f"{KEY_PREFIX}result:{idempotency_key}"


def batch_finished_id(batch_id: str, total: int) -> str:
    """``batch.finished`` of a batch of ``total`` items: one id, whoever notices it first."""
    return str(uuid.uuid5(_BATCH_NS, f"{batch_id}\x00{total}"))


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Idocr-Signature`` header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: bytes = field(repr=False)
    timeout: float = 10.0
    retry_for: float = 86400.0
    initial: float = 5.0
    max_wait: float = 1800.0
    #: concurrent POSTs per relay
    parallel: int = 8

    def __repr__(self) -> str:  # never the URL (it may hold credentials) nor the secret
        return "Webhook(<configured>)"

    def wait(self, attempts: int) -> float:
        """The planned wait after the ``attempts``-th failed delivery (no jitter)."""
        return float(min(self.max_wait, self.initial * 2 ** max(0, attempts - 1)))

    def gives_up(self, attempts: int) -> bool:
        """The planned waits after ``attempts`` failures add up to ``retry_for``."""
        return sum(self.wait(n) for n in range(1, attempts + 1)) >= self.retry_for


@dataclass(slots=True)
class Report:
    published: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    batches_finished: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.published or self.delivered or self.failed or self.dead)


class Relay:
    def __init__(
        self,
        *,
        database_url: str,
        redis_client: redis.Redis,
        stream: str = "idocr:results",
        maxlen: int | None = 1_000_000,
        result_ttl: int = 7 * 86400,
        batch: int = 100,
        interval: float = 0.2,
        webhook: Webhook | None = None,
        outbox: Outbox | None = None,
        http_post: Callable[..., Any] | None = None,
        lock_ttl: float = 30.0,
    ) -> None:
        self.db = database_url
        self.redis = redis_client
        self.stream = stream
        self.maxlen = maxlen
        self.result_ttl = result_ttl
        self.batch = batch
        self.interval = interval
        self.webhook = webhook
        self.outbox = outbox or Outbox(webhook=webhook is not None)
        self._post = http_post
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self.lock_ttl = lock_ttl
        self._wake = threading.Event()
        self._postgres = database_url.startswith("postgresql")

    # -- one pass ------------------------------------------------------------------------------
    def run_once(self) -> Report:
        """Publish what is waiting and deliver what is due, until a pass finds nothing."""
        rep = Report()
        lock = None
        if not self._postgres:
            lock = self.redis.lock(RELAY_LOCK, timeout=self.lock_ttl, blocking=False)
            if not lock.acquire():
                return rep
        try:
            while True:
                n, finished = self.publish_once()
                rep.published += n
                rep.batches_finished += finished
                if n < self.batch and not finished:
                    break
                self._keep(lock)
            if self.webhook is not None:
                while True:
                    self._keep(lock)
                    d, f, dead, taken = self.deliver_once()
                    rep.delivered += d
                    rep.failed += f
                    rep.dead += dead
                    if taken < self.batch:
                        break
        finally:
            if lock is not None:
                try:
                    lock.release()
                except redis.exceptions.LockError:
                    pass
        return rep

    def _keep(self, lock: Any) -> None:
        """Renew the SQLite relay's lock between chunks: a long backlog outlasts its lease."""
        if lock is not None:
            lock.extend(self.lock_ttl, replace_ttl=True)

    def _nothing(self, cond: Any) -> bool:
        """SQLite: whether no event matches ``cond``, looked at without the write lock (a
        relay's idle polls must not hold up the workers' writes)."""
        if self._postgres:
            return False
        with unit_of_work(self.db, read_only=True) as s:
            return s.scalar(select(Event.id).where(cond).limit(1)) is None

    def publish_once(self) -> tuple[int, int]:
        """One chunk onto the stream; returns (events published, batch.finished written)."""
        if self._nothing(Event.published_at.is_(None)):
            return 0, 0
        with unit_of_work(self.db) as s:
            # plain rows (read-only here), by statements built once
            events: list[Any] = list(s.execute(_UNPUBLISHED, {"n": self.batch}))
            if not events:
                return 0, 0
            bodies = self._bodies(s, events)
            pipe = self.redis.pipeline(transaction=False)
            for ev in events:
                body, requests = bodies[ev.id]
                text = _dumps(body)
                pipe.xadd(
                    self.stream,
                    {"event_id": ev.event_id, "kind": ev.kind, "body": text},
                    maxlen=self.maxlen,
                    approximate=True,
                )
                for key, per_request in requests:
                    pipe.set(result_key(key), _dumps(per_request), ex=self.result_ttl)
            pipe.execute()
            s.execute(
                _PUBLISHED_POSTGRES if self._postgres else _PUBLISHED,
                {"ids": [e.id for e in events], "now": utcnow()},
            )
            batches = {e.batch_id for e in events if e.kind == ITEM_FINISHED and e.batch_id}
            finished = sum(finish_batch_if_done(s, b, self.outbox) for b in sorted(batches))
        return len(events), finished

    def deliver_once(self) -> tuple[int, int, int, int]:
        """Lease up to ``batch`` due deliveries, POST them, record the outcomes. Returns
        (delivered, failed, dead, leased)."""
        assert self.webhook is not None
        hook = self.webhook
        lease = timedelta(seconds=2 * hook.timeout + 30)
        if self._nothing((Event.delivery_state == PENDING) & (Event.next_delivery_at <= utcnow())):
            return 0, 0, 0, 0
        with unit_of_work(self.db) as s:
            now = utcnow()
            events = list(
                s.scalars(
                    select(Event)
                    .where(Event.delivery_state == PENDING, Event.next_delivery_at <= now)
                    .order_by(Event.next_delivery_at, Event.id)
                    .limit(self.batch)
                    .with_for_update(skip_locked=True)
                )
            )
            if not events:
                return 0, 0, 0, 0
            s.execute(
                update(Event)
                .where(Event.id.in_([e.id for e in events]))
                .values(next_delivery_at=now + lease)
                .execution_options(synchronize_session=False)
            )
            bodies = self._bodies(s, events)
            work = [
                (e.id, e.event_id, e.delivery_attempts, _dumps(bodies[e.id][0]).encode())
                for e in events
            ]
        outcomes = self._post_all(hook, [(eid, body) for _, eid, _, body in work])
        failed = dead = 0
        ok = [row_id for (row_id, *_), error in zip(work, outcomes, strict=True) if error is None]
        with unit_of_work(self.db) as s:
            now = utcnow()
            if ok:  # one statement for every delivery that went through
                s.execute(
                    update(Event)
                    .where(Event.id.in_(ok), Event.delivery_state == PENDING)
                    .values(
                        delivery_state=DELIVERED,
                        delivery_attempts=Event.delivery_attempts + 1,
                        delivered_at=now,
                        next_delivery_at=None,
                        last_error=None,
                    )
                    .execution_options(synchronize_session=False)
                )
            for (row_id, _eid, attempts, _body), error in zip(work, outcomes, strict=True):
                if error is None:
                    continue
                n = attempts + 1
                values: dict[str, Any]
                if hook.gives_up(n):
                    dead += 1
                    values = dict(delivery_state=DEAD, next_delivery_at=None, last_error=error)
                else:
                    failed += 1
                    wait = hook.wait(n) * random.uniform(0.8, 1.2)
                    values = dict(next_delivery_at=now + timedelta(seconds=wait), last_error=error)
                s.execute(
                    update(Event)
                    .where(Event.id == row_id, Event.delivery_state == PENDING)
                    .values(delivery_attempts=n, **values)
                    .execution_options(synchronize_session=False)
                )
        if dead:
            log.warning(
                "webhook: %d events dead after retrying (`idocr events replay --dead`)", dead
            )
        return len(ok), failed, dead, len(work)

    # -- building the public shape -------------------------------------------------------------
    def _bodies(
        self, s: Session, events: Sequence[Event]
    ) -> dict[int, tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]]:
        """Each event's public body, and the (idempotency key, body) of its requests."""
        item_ids = [e.item_id for e in events if e.kind == ITEM_FINISHED and e.item_id is not None]
        recs = records_of_items(s, item_ids) if item_ids else {}
        by_item: dict[int, list[Request]] = {}
        by_id: dict[int, Request] = {}
        request_ids = [e.request_id for e in events if e.request_id is not None]
        if item_ids or request_ids:
            conds = []
            if item_ids:
                conds.append(Request.item_id.in_(item_ids))
            if request_ids:
                conds.append(Request.id.in_(request_ids))
            for r in s.scalars(select(Request).where(or_(*conds)).order_by(Request.id)):
                by_id[r.id] = r
                if r.item_id is not None:
                    by_item.setdefault(r.item_id, []).append(r)
        out: dict[int, tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]] = {}
        for ev in events:
            body = event_body(ev, recs.get(ev.item_id) if ev.item_id is not None else None)
            if ev.request_id is not None:
                reqs = [by_id[ev.request_id]] if ev.request_id in by_id else []
            elif ev.kind == ITEM_FINISHED and ev.item_id is not None:
                reqs = by_item.get(ev.item_id, [])
            else:
                reqs = []
            per: list[tuple[str, dict[str, Any]]] = []
            for r in reqs:
                per.append((r.idempotency_key, {**body, "request": request_view(r)}))
            if per:
                body = per[0][1]
            # only an item's final answer is a request's result; a rejection is too
            keyed = [(k, b) for k, b in per if ev.kind in (ITEM_FINISHED, "request.rejected")]
            out[ev.id] = (body, keyed)
        return out

    # -- HTTP --------------------------------------------------------------------------------
    def _post_all(self, hook: Webhook, work: list[tuple[str, bytes]]) -> list[str | None]:
        if len(work) == 1 or hook.parallel <= 1:
            return [self._post_one(hook, eid, body) for eid, body in work]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(hook.parallel, thread_name_prefix="idocr-webhook")
        return list(self._pool.map(lambda w: self._post_one(hook, *w), work))

    def _post_one(self, hook: Webhook, event_id: str, body: bytes) -> str | None:
        """POST one event; None when the receiver took it (2xx), else a short reason that
        holds neither the URL, the secret nor anything of the body."""
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "idocr-webhook/1",
            "X-Idocr-Event-Id": event_id,
            "X-Idocr-Timestamp": str(ts),
            "X-Idocr-Signature": sign(hook.secret, ts, body),
        }
        try:
            if self._post is not None:
                status = int(self._post(hook.url, body, headers, hook.timeout))
            else:
                status = self._http().post(hook.url, content=body, headers=headers).status_code
        except Exception as exc:
            return f"{type(exc).__name__} while posting"
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            assert self.webhook is not None
            self._client = httpx.Client(
                timeout=self.webhook.timeout,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=max(1, self.webhook.parallel)),
            )
        return self._client

    # -- running -------------------------------------------------------------------------------
    def wake(self) -> None:
        """Look at the outbox now rather than at the end of the interval."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Pass after pass until ``stop`` is set; a failing pass (the database or Redis away)
        is logged by its class and tried again."""
        failures = 0
        while not stop.is_set():
            try:
                rep = self.run_once()
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning("event relay pass failed (%s)", type(exc).__name__)
                stop.wait(min(30.0, self.interval * 2**failures))
                continue
            # run_once stops at a chunk that was not full: what is left is fresh. Woken by a
            # finished task, a quiet relay goes at once (one event's latency); one that just
            # published waits the interval, so a steady stream goes out in chunks rather than a
            # pass (half a dozen statements) per event.
            woken = self._wake.wait(self.interval)
            self._wake.clear()
            if woken:
                stop.wait(self.interval if rep.busy else min(0.05, self.interval / 4))

    def drain(self, timeout: float = 30.0) -> bool:
        """Publish until nothing is waiting for the stream (``idocr run`` before it exits);
        False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.run_once()
                with unit_of_work(self.db, read_only=True) as s:
                    waiting = s.scalar(
                        select(Event.id).where(Event.published_at.is_(None)).limit(1)
                    )
            except Exception as exc:
                log.warning("event relay pass failed (%s)", type(exc).__name__)
                waiting = -1
            if waiting is None:
                return True
            time.sleep(min(self.interval, 0.1))
        return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None


def finish_batch_if_done(
    s: Session, batch_id: str, outbox: Outbox, *, allow_empty: bool = False
) -> int:
    """``batch.finished`` for ``batch_id`` if none of its items is left unfinished and the
    event for its present size does not exist yet (1 if written now). First a one-row look-up
    on ``(batch_id, status)``: the counts are taken only for a batch that is done.
    ``allow_empty``: a batch with no items at all finishes too (a scheduled scan of an empty
    folder)."""
    unfinished = s.scalar(
        select(Item.id)
        # the statuses still to finish, named: an index range each on (batch_id, status),
        # where NOT IN would walk every finished item of a large batch
        .where(Item.batch_id == batch_id, Item.status.in_(UNFINISHED))
        .limit(1)
    )
    if unfinished is not None:
        return 0
    # the size (an index-only count), then the event's existence by its unique id: the counts by
    # status and code only for a batch finishing now
    total = s.scalar(select(func.count()).select_from(Item).where(Item.batch_id == batch_id)) or 0
    if not total and not allow_empty:
        return 0
    eid = batch_finished_id(batch_id, total)
    if s.scalar(select(exists().where(Event.event_id == eid))):
        return 0
    label = func.coalesce(Item.code, Item.reason, literal_column("''"))
    rows = s.execute(
        select(Item.status, label, func.count())
        .where(Item.batch_id == batch_id)
        .group_by(Item.status, label)
    ).all()
    by_status: dict[str, int] = {}
    by_code: dict[str, dict[str, int]] = {}
    for status, code, n in rows:
        by_status[status] = by_status.get(status, 0) + n
        if code:
            codes = by_code.setdefault(status, {})
            codes[code] = codes.get(code, 0) + n
    data = {"total": total, "statuses": by_status, "codes": by_code}
    try:
        with s.begin_nested():
            outbox.emit(s, BATCH_FINISHED, batch_id=batch_id, data=data, event_id=eid)
    except IntegrityError:  # another relay wrote it meanwhile
        return 0
    log.info("batch %s finished (%d items)", batch_id, total)
    return 1


_events = cast("Table", Event.__table__)
#: the relay's next chunk of events not on the stream yet (rows other relays hold are skipped)
_UNPUBLISHED = (
    select(_events)
    .where(_events.c.published_at.is_(None))
    .order_by(_events.c.id)
    .limit(bindparam("n"))
    .with_for_update(skip_locked=True)
)
_PUBLISHED = (
    update(_events)
    .where(_events.c.id.in_(bindparam("ids", expanding=True)))
    .values(published_at=bindparam("now"))
)
#: PostgreSQL: the ids as one array parameter
_PUBLISHED_POSTGRES = (
    update(_events)
    .where(_events.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
    .values(published_at=bindparam("now"))
)


def event_body(ev: Event, record: dict[str, Any] | None) -> dict[str, Any]:
    """The public JSON of one event (docs/events.md). ``record``: the item's export record,
    for an ``item.finished`` event."""
    data = dict(ev.data or {})
    body: dict[str, Any] = {
        "event_id": ev.event_id,
        "kind": ev.kind,
        "created_at": utc_iso(ev.created_at),
        "batch": ev.batch_id,
    }
    if ev.item_id is not None:
        body["item_id"] = ev.item_id
    if ev.kind != ITEM_FINISHED:
        return {**data, **body}  # the common keys win over anything of the same name
    rec = record or {}
    body.update(
        status=data.get("status"),
        reason=data.get("reason"),
        code=data.get("code"),
        ocrid=data.get("ocrid") or rec.get("ocrid"),
        provider=rec.get("provider"),
        source=rec.get("source"),
        key=rec.get("key"),
        sha256=rec.get("sha256"),
        duplicate_of=rec.get("duplicate_of"),
        attempts=rec.get("attempts"),
        fields={f: rec.get(f) for f in RECORD_FIELDS},
        quality=rec.get("quality"),
        checks=rec.get("checks"),
        record=record,
    )
    return body


def request_view(r: Request) -> dict[str, Any]:
    return {
        "idempotency_key": r.idempotency_key,
        "channel": r.channel,
        "status": r.status,
        "reason": r.reason,
        "meta": r.meta,
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc_iso(value)
    raise TypeError(type(value).__name__)


# -- wiring ----------------------------------------------------------------------------------


def webhook_of(settings: Settings) -> Webhook | None:
    if not settings.webhook_url or settings.webhook_secret is None:
        return None
    return Webhook(
        url=settings.webhook_url,
        secret=settings.webhook_secret.get_secret_value().encode(),
        timeout=settings.webhook_timeout,
        retry_for=settings.webhook_retry_for,
        initial=settings.webhook_retry_initial,
        max_wait=settings.webhook_retry_max,
    )


def build_relay(settings: Settings) -> Relay:
    from pipeline.coordination.redisconn import redis_client

    return Relay(
        database_url=settings.resolved_database_url,
        redis_client=redis_client(settings),
        stream=settings.results_stream,
        maxlen=settings.results_maxlen or None,
        result_ttl=settings.result_ttl,
        batch=settings.relay_batch,
        interval=settings.relay_interval,
        webhook=webhook_of(settings),
        outbox=Outbox.from_settings(settings),
    )


class RelayThread:
    """The relay in a daemon thread of this process (a worker, `idocr run`)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=relay.run, args=(self.stop_event,), name="idocr-relay", daemon=True
        )

    def start(self) -> RelayThread:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.relay.wake()
        self.thread.join(timeout)
        self.relay.close()

    def drain_and_stop(self, timeout: float = 30.0) -> bool:
        """Stop the thread, then publish what is still waiting (False: ``timeout`` passed)."""
        self.stop_event.set()
        self.relay.wake()
        self.thread.join(timeout)
        try:
            return self.relay.drain(timeout)
        finally:
            self.relay.close()


# -- the command line's views and replays ----------------------------------------------------

STATES = ("unpublished", "pending", "dead", "delivered")


def _state_filter(state: str | None) -> Any:
    if state is None:
        return None
    if state == "unpublished":
        return Event.published_at.is_(None)
    if state in (PENDING, DEAD, DELIVERED):
        return Event.delivery_state == state
    raise ValueError(f"unknown state {state!r} (one of {', '.join(STATES)})")


def list_events(
    s: Session,
    *,
    kind: str | None = None,
    batch: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[Event]:
    """The newest events first, filtered."""
    q = select(Event).order_by(Event.id.desc()).limit(limit)
    if kind:
        q = q.where(Event.kind == kind)
    if batch:
        q = q.where(Event.batch_id == batch)
    cond = _state_filter(state)
    if cond is not None:
        q = q.where(cond)
    return list(s.scalars(q))


def replay(
    s: Session,
    *,
    event_ids: Iterable[str] = (),
    batch: str | None = None,
    dead: bool = False,
    webhook: bool = False,
) -> int:
    """Publish the chosen events again (same ids) and, with a webhook, deliver them again
    (a dead delivery starts a fresh round of retries). Returns how many were chosen."""
    ids = list(event_ids)
    conds: list[Any] = []
    if ids:
        conds.append(Event.event_id.in_(ids))
    if batch:
        conds.append(Event.batch_id == batch)
    if dead:
        conds.append(Event.delivery_state == DEAD)
    if not conds:
        raise ValueError("choose events to replay: --event-id, --batch or --dead")
    chosen = or_(*conds)
    values: dict[str, Any] = {"published_at": None}
    if webhook:
        values.update(
            delivery_state=PENDING,
            delivery_attempts=0,
            next_delivery_at=utcnow(),
            delivered_at=None,
        )
    res = s.execute(
        update(Event).where(chosen).values(**values).execution_options(synchronize_session=False)
    )
    return int(getattr(res, "rowcount", 0) or 0)
