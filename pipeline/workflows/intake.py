"""Work handed over by other systems: one request, one item, once per idempotency key.

Every way in (the intake stream, :mod:`pipeline.client` through it, ``idocr submit``) ends in
:meth:`Intake.submit` or :meth:`Intake.reject`:

* the request is checked (:mod:`pipeline.domain.intake`), its image located (a path under an
  intake root, read and fingerprinted here; ``s3://``; ``https://`` on a public address, fetched
  by the worker), and recorded in ``requests`` under its key together with its item (the
  producer's insert: de-duplicated by content, judged without decoding), in one transaction;
  the item is enqueued after the commit;
* a key seen before makes nothing new: the first request's item stands (queued again if it still
  waits for a worker), and a request already answered is answered again (its result event
  re-published, so the caller reading the result key or the results stream hears it);
* a refused request is recorded ``rejected`` with its reason and a ``request.rejected`` event.

Two consumers meeting one key at once are told apart by the unique key: the loser's transaction
fails on it, is rolled back whole, and finds the winner's request when it looks again.

:class:`StreamConsumer` reads the stream as a consumer group: new entries, its own entries that
failed on the infrastructure (read again after a back-off, never acknowledged before they are
recorded), and entries a dead consumer left pending (``XAUTOCLAIM`` once idle for
``IDOCR_INTAKE_CLAIM_IDLE``). Nothing here logs an image location, a key or metadata.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.config import Settings
from pipeline.coordination.resilience import OutageTooLong, is_infra_error
from pipeline.domain import intake as contract
from pipeline.domain.images import SNIFF_BYTES, ImageLimits, sniff
from pipeline.domain.intake import BadRequest, IntakeRequest
from pipeline.outputs.events import ITEM_FINISHED, REQUEST_REJECTED, Outbox
from pipeline.sources.base import SourceError, SourceRef
from pipeline.sources.https import AddressRefused, Resolver, check_url, system_resolver
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import FINAL_STATUSES, Event, Item, ItemStatus, Request
from pipeline.workflows.producer import to_new_item

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
REJECTED = "rejected"
#: the largest file a request may name by path (the size an S3 object may have)
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a request: ``accepted`` or ``rejected``; ``repeat`` when the key was
    seen before (then the first request's status and item)."""

    key: str
    status: str
    request_id: int
    item_id: int | None = None
    reason: str | None = None
    repeat: bool = False


def intake_batch_id(now: datetime | None = None) -> str:
    return f"intake-{(now or datetime.now(UTC)):%Y%m%d}"


class Intake:
    def __init__(
        self,
        *,
        database_url: str,
        provider: str,
        enqueue: Callable[[Sequence[int]], None] | None,
        intake_roots: Sequence[Path] = (),
        allow_private: bool = False,
        stream: str = "idocr:intake",
        outbox: Outbox | None = None,
        limits: ImageLimits | None = None,
        resolver: Resolver = system_resolver,
        attempts: int = 5,
    ) -> None:
        self.db = database_url
        self.provider = provider
        self.enqueue = enqueue
        self.roots = [Path(os.path.realpath(r)) for r in intake_roots]
        self.allow_private = allow_private
        self.stream = stream
        self.outbox = outbox or Outbox()
        self.allowed = (limits or ImageLimits()).allowed
        self.resolver = resolver
        self.attempts = attempts
        #: batches known to exist and send bytes (their look-up is skipped)
        self._batches: set[str] = set()
        #: item ids waiting for :meth:`release` (None: enqueued at once)
        self._held: list[int] | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, enqueue: Callable[[Sequence[int]], None] | None
    ) -> Intake:
        return cls(
            database_url=settings.resolved_database_url,
            provider=settings.resolved_provider,
            enqueue=enqueue,
            intake_roots=settings.intake_roots,
            allow_private=settings.intake_allow_private,
            stream=settings.intake_stream,
            outbox=Outbox.from_settings(settings),
        )

    # -- the image ------------------------------------------------------------------------------

    def locate(self, request: IntakeRequest) -> SourceRef:
        """The image as a source reference; :class:`BadRequest` when it may not be taken."""
        image = request.image
        key = f"{request.key}/{_name_of(image)}"
        lowered = image[:8].lower()
        if lowered.startswith("s3://"):
            from pipeline.s3 import parse_s3_uri

            try:
                bucket, _ = parse_s3_uri(image)  # checks the bucket's name
                obj = image[5:].partition("/")[2]
            except ValueError:
                raise BadRequest(contract.LOCATION, "image: not an s3://bucket/key URI") from None
            if not obj or obj.endswith("/"):
                raise BadRequest(contract.LOCATION, "image: an s3:// URI must name one object")
            return SourceRef(key=key, uri=f"s3://{bucket}/{obj}")
        if lowered.startswith("https://"):
            try:
                check_url(image, allow_private=self.allow_private, resolver=self.resolver)
            except AddressRefused as exc:
                raise BadRequest(contract.PRIVATE_ADDRESS, f"image: {exc}") from None
            except SourceError as exc:
                raise BadRequest(contract.LOCATION, f"image: {exc}") from None
            return SourceRef(key=key, uri=image)
        if "://" in image:
            raise BadRequest(
                contract.LOCATION,
                "image: give s3://bucket/key, an https:// URL or a path under an intake root",
            )
        return self._local(image, key)

    def _local(self, image: str, key: str) -> SourceRef:
        if not self.roots:
            raise BadRequest(
                contract.LOCATION, "image: paths are refused (no IDOCR_INTAKE_ROOTS configured)"
            )
        if not os.path.isabs(image):
            raise BadRequest(contract.LOCATION, "image: a path must be absolute")
        real = Path(os.path.realpath(image))
        if not any(real.is_relative_to(root) for root in self.roots):
            raise BadRequest(
                contract.LOCATION, "image: the path is outside the intake roots (after links)"
            )
        if not real.is_file():  # not a folder, fifo or device (a fifo would block the read)
            raise BadRequest(contract.LOCATION, "image: no regular file at the path")
        try:
            with real.open("rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        except OSError:
            raise BadRequest(contract.LOCATION, "image: no readable file at the path") from None
        if len(data) > MAX_FILE_BYTES:
            raise BadRequest(contract.TOO_LARGE, f"image: larger than {MAX_FILE_BYTES} bytes")
        return SourceRef(
            key=key,
            uri=real.as_uri(),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            media=sniff(data[:SNIFF_BYTES]) or "unknown" if data else None,
        )

    # -- requests -------------------------------------------------------------------------------

    def submit(self, request: IntakeRequest, channel: str = "stream") -> Outcome:
        """Record ``request`` (or find the first one under its key) and enqueue its item."""
        try:
            ref = self.locate(request)
        except BadRequest as bad:
            bad.key = request.key
            return self.reject(bad, channel, meta=request.metadata)
        # sealed at rest by the column (requests.meta, the key ring of IDOCR_DATA_KEYS)
        meta = request.metadata or {}
        batch_id = request.batch or intake_batch_id()
        for attempt in range(self.attempts):
            try:
                with unit_of_work(self.db) as s:
                    found = _find(s, request.key)
                    if found is not None:
                        outcome, to_send = self._repeat(s, found)
                    else:
                        outcome, to_send = self._record(s, request, ref, batch_id, channel, meta)
            except IntegrityError:
                # another consumer recorded this key (or created this batch) meanwhile
                self._batches.discard(batch_id)
                if attempt == self.attempts - 1:
                    raise
                continue
            if outcome.status == ACCEPTED and not outcome.repeat:
                self._batches.add(batch_id)
            self._send(to_send)
            return outcome
        raise AssertionError("unreachable")

    def reject(
        self,
        bad: BadRequest,
        channel: str = "stream",
        entry_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Outcome:
        """Record a refused request (under a key derived from ``entry_id`` when it has none of
        its own) with a ``request.rejected`` event; ``meta``: its metadata, when it could be
        read (echoed back like an accepted request's)."""
        key = bad.key or contract.synthetic_key(self.stream, entry_id or _now_id())
        for attempt in range(self.attempts):
            try:
                with unit_of_work(self.db) as s:
                    found = _find(s, key)
                    if found is not None:
                        outcome, to_send = self._repeat(s, found)
                    else:
                        req = Request(
                            idempotency_key=key,
                            channel=channel,
                            status=REJECTED,
                            reason=bad.text[:2000],
                            meta=meta or {},
                        )
                        s.add(req)
                        s.flush()
                        self._rejected_event(s, req, key, bad.reason, bad.detail)
                        outcome, to_send = Outcome(key, REJECTED, req.id, reason=bad.text), []
            except IntegrityError:
                if attempt == self.attempts - 1:
                    raise
                continue
            self._send(to_send)
            return outcome
        raise AssertionError("unreachable")

    def _record(
        self,
        s: Session,
        request: IntakeRequest,
        ref: SourceRef,
        batch_id: str,
        channel: str,
        meta: Any,
    ) -> tuple[Outcome, list[int]]:
        if batch_id not in self._batches:  # a batch, once seen sending bytes, stays so
            batch, _ = repo.get_or_create_batch(s, batch_id, "intake", self.provider)
            if batch.via != "bytes":
                conflict = BadRequest(
                    contract.BATCH_CONFLICT,
                    "batch: it sends images to the provider by URL; name another batch",
                    request.key,
                )
                return self._reject_in(s, conflict, channel, meta), []
        row = to_new_item(ref, self.allowed)
        if ref.sha256 is None:
            # not read here (S3, https): the worker finds identical bytes when it reads them
            row.fingerprint = "uri:" + hashlib.sha256(ref.uri.encode()).hexdigest()
        # The item's key holds the request's key, which has no request yet: no item can have it
        # (new_batch skips that look-up). One that does (a concurrent consumer's) fails on the
        # unique constraint, and the retry finds that consumer's request.
        item = repo.add_items(s, batch_id, [row], new_batch=True)[0]
        answered_by = item.id
        if item.status == ItemStatus.DUPLICATE:
            # The same bytes as an item still on its way: the request waits for that item's
            # answer (its item.finished event is what answers the request), not for this
            # duplicate's, which is settled now, before the original has an answer to share.
            original = s.scalar(select(Item.duplicate_of).where(Item.id == item.id))
            status = s.scalar(select(Item.status).where(Item.id == original)) if original else None
            if original is not None and status not in FINAL_STATUSES:
                answered_by = original
        req = Request(
            idempotency_key=request.key,
            channel=channel,
            status=ACCEPTED,
            item_id=answered_by,
            batch_id=batch_id,
            side=request.side,
            meta=meta,
        )
        s.add(req)
        s.flush()  # the unique key decides here between two consumers
        if item.status != ItemStatus.QUEUED:
            # settled at once (rejected without decoding, a duplicate of known bytes)
            self.outbox.items_finished(s, batch_id, [(item.id, item.status, item.reason)])
        to_send = [item.id] if item.status == ItemStatus.QUEUED else []
        return Outcome(request.key, ACCEPTED, req.id, item_id=answered_by), to_send

    def _reject_in(self, s: Session, bad: BadRequest, channel: str, meta: Any) -> Outcome:
        assert bad.key is not None
        req = Request(
            idempotency_key=bad.key,
            channel=channel,
            status=REJECTED,
            reason=bad.text[:2000],
            meta=meta,
        )
        s.add(req)
        s.flush()
        self._rejected_event(s, req, bad.key, bad.reason, bad.detail)
        return Outcome(bad.key, REJECTED, req.id, reason=bad.text)

    def _rejected_event(self, s: Session, req: Request, key: str, reason: str, detail: str) -> None:
        self.outbox.emit(
            s,
            REQUEST_REJECTED,
            request_id=req.id,
            data={"key": key, "reason": reason, "detail": detail, "channel": req.channel},
        )

    def _repeat(self, s: Session, req: Request) -> tuple[Outcome, list[int]]:
        """A key seen before: nothing new is made. An answered request is answered again (its
        last event published anew); an item still waiting for a worker is sent again (harmless:
        a second message finds it claimed)."""
        outcome = Outcome(
            req.idempotency_key,
            req.status,
            req.id,
            item_id=req.item_id,
            reason=req.reason,
            repeat=True,
        )
        if req.status == REJECTED or req.item_id is None:
            last = _last_event(s, REQUEST_REJECTED, request_id=req.id)
            if last is not None:
                self.outbox.emit(s, REQUEST_REJECTED, request_id=req.id, data=dict(last.data))
            return outcome, []
        item = s.get(Item, req.item_id)
        if item is None:
            return outcome, []
        if item.status in FINAL_STATUSES:
            last = _last_event(s, ITEM_FINISHED, item_id=item.id)
            data = dict(last.data) if last is not None else {"status": item.status}
            self.outbox.emit(
                s,
                ITEM_FINISHED,
                item_id=item.id,
                batch_id=item.batch_id,
                request_id=req.id,
                data=data,
            )
            return outcome, []
        if item.status == ItemStatus.QUEUED:
            return outcome, [item.id]
        return outcome, []

    def _send(self, ids: list[int]) -> None:
        if not ids:
            return
        if self._held is not None:
            self._held.extend(ids)
        elif self.enqueue is not None:
            self.enqueue(ids)

    def hold(self) -> None:
        """From now on, keep the ids to enqueue until :meth:`release` (one message batch for
        many requests: a stream consumer's read)."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Enqueue what is held (and go on holding)."""
        ids, self._held = self._held or [], []
        if ids and self.enqueue is not None:
            self.enqueue(ids)


def _find(s: Session, key: str) -> Request | None:
    return s.scalar(select(Request).where(Request.idempotency_key == key))


def _last_event(s: Session, kind: str, **where: Any) -> Event | None:
    q = select(Event).where(Event.kind == kind)
    for column, value in where.items():
        q = q.where(getattr(Event, column) == value)
    return s.scalar(q.order_by(Event.id.desc()).limit(1))


def _name_of(image: str) -> str:
    """The image's file name (the last path segment, without a query), for the item's key."""
    name = image.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return name[-120:] or "image"


def _now_id() -> str:
    return f"{time.time_ns()}"


# -- the stream ------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: a consumer name idle this long and holding nothing is removed from the group (seconds)
FORGET_IDLE = 24 * 3600.0
FORGET_EVERY = 3600.0


class StreamConsumer:
    """One consumer of the intake stream's group (one per worker process)."""

    #: entries per read
    COUNT = 50
    #: requests recorded before their items are enqueued (one message batch) and their entries
    #: acknowledged: at most this many wait on each other
    SETTLE_EVERY = 10
    #: attempts at an entry that fails on something other than the infrastructure before it is
    #: refused as an internal error (answered, acknowledged)
    MAX_FAILURES = 3

    def __init__(
        self,
        intake: Intake,
        client: redis.Redis,
        *,
        stream: str,
        group: str = "idocr",
        consumer: str | None = None,
        claim_idle: float = 60.0,
        block: float = 2.0,
    ) -> None:
        self.intake = intake
        self.intake.hold()
        self.redis = client
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.claim_idle_ms = max(1, int(claim_idle * 1000))
        self.claim_every = max(0.5, min(claim_idle / 2, 10.0))
        self.block_ms = max(1, int(block * 1000))
        self._next_claim = 0.0
        self._next_forget = 0.0
        self._claim_cursor = "0-0"
        self._retry_own = True  # after a start: entries this consumer name holds
        self._failures: dict[str, int] = {}
        self._group_ready = False
        self.handled = 0

    def ensure_group(self) -> None:
        try:
            # from the stream's beginning: requests added before any worker started count
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def poll_once(self) -> int:
        """Handle one read's worth of entries; the number handled."""
        if not self._group_ready:
            self.ensure_group()
        try:
            entries = self._next_entries()
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted (a Redis restarted empty)
                self._group_ready = False
                return 0
            raise
        done: list[str] = []
        handled = 0
        try:
            for entry_id, fields in entries:
                eid = _text(entry_id)
                if fields:
                    try:
                        self.handle(eid, fields)
                        self._failures.pop(eid, None)
                    except Exception as exc:
                        if is_infra_error(exc) or isinstance(exc, OutageTooLong):
                            self._retry_own = True
                            raise
                        if not self._failed(eid, exc, fields):
                            self._retry_own = True
                            continue
                done.append(eid)
                if len(done) >= self.SETTLE_EVERY:
                    handled += self._settle(done)
                    done = []
        finally:
            # what was recorded is enqueued, then acknowledged (an entry is never acknowledged
            # before its item is on the queue; a failure here leaves it to be read again)
            if done:
                handled += self._settle(done)
        return handled

    def _settle(self, entry_ids: list[str]) -> int:
        self.intake.release()
        self.ack(*entry_ids)
        self.handled += len(entry_ids)
        return len(entry_ids)

    def _next_entries(self) -> list[tuple[Any, Any]]:
        if self._retry_own:
            resp: Any = self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: "0"}, count=self.COUNT
            )
            own = resp[0][1] if resp else []
            if own:
                return list(own)
            self._retry_own = False
        now = time.monotonic()
        if now >= self._next_claim:
            claimed: Any = self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=self._claim_cursor,
                count=self.COUNT,
            )
            cursor = _text(claimed[0])
            self._claim_cursor = cursor
            if cursor == "0-0":
                self._next_claim = now + self.claim_every
                if now >= self._next_forget:
                    self._next_forget = now + FORGET_EVERY
                    self.forget_idle_consumers()
            taken = list(claimed[1])
            if taken:
                log.info("intake: took over %d entries left by another consumer", len(taken))
                return taken
        fresh: Any = self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.COUNT, block=self.block_ms
        )
        return list(fresh[0][1]) if fresh else []

    def forget_idle_consumers(self, idle: float = FORGET_IDLE) -> int:
        """Remove from the group the names of consumers gone for ``idle`` seconds that hold
        no entry (every worker process that ever ran left one); the number removed."""
        gone = 0
        consumers: Any = self.redis.xinfo_consumers(self.stream, self.group)
        for c in consumers:
            name = _text(c["name"])
            if name != self.consumer and not c["pending"] and c["idle"] > idle * 1000:
                # DELCONSUMER drops a consumer's pending entries: only empty ones are removed
                gone += int(self.redis.xgroup_delconsumer(self.stream, self.group, name) == 0)
        return gone

    def handle(self, entry_id: str, fields: Mapping[Any, Any]) -> Outcome:
        try:
            request, channel = contract.parse_message(fields)
        except BadRequest as bad:
            return self.intake.reject(bad, "stream", entry_id=entry_id)
        return self.intake.submit(request, channel)

    def _failed(self, entry_id: str, exc: Exception, fields: Mapping[Any, Any]) -> bool:
        """An entry failed on something that is not the infrastructure (a bug): tried again a
        few times, then refused as an internal error. True when it is answered."""
        n = self._failures[entry_id] = self._failures.get(entry_id, 0) + 1
        log.error(
            "intake: entry %s failed (%s), attempt %d of %d",
            entry_id,
            type(exc).__name__,
            n,
            self.MAX_FAILURES,
        )
        if n < self.MAX_FAILURES:
            return False
        self._failures.pop(entry_id, None)
        key = None
        try:
            key = contract.parse_message(fields)[0].key
        except BadRequest as bad:
            key = bad.key
        self.intake.reject(
            BadRequest(contract.INTERNAL, "the request could not be processed", key),
            "stream",
            entry_id=entry_id,
        )
        return True

    def ack(self, *entry_ids: str) -> None:
        # the requests are recorded in SQL: the entries are acknowledged and removed
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.xdel(self.stream, *entry_ids)
        pipe.execute()

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; the infrastructure's errors are waited out."""
        wait = 0.0
        while not stop.is_set():
            try:
                self.poll_once()
                wait = 0.0
            except Exception as exc:
                if not (is_infra_error(exc) or isinstance(exc, OutageTooLong)):
                    log.error("intake consumer: %s; going on", type(exc).__name__)
                wait = min(10.0, max(0.2, wait * 2))
                log.warning("intake consumer: %s, trying again in %.1f s", type(exc).__name__, wait)
                stop.wait(wait)


def start_consumer(
    settings: Settings, enqueue: Callable[[Sequence[int]], None], client: redis.Redis
) -> tuple[threading.Thread, threading.Event]:
    """The intake consumer of this process, in a daemon thread; set the event to stop it."""
    consumer = StreamConsumer(
        Intake.from_settings(settings, enqueue),
        client,
        stream=settings.intake_stream,
        group=settings.intake_group,
        claim_idle=settings.intake_claim_idle,
    )
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), name="idocr-intake", daemon=True)
    thread.start()
    return thread, stop
