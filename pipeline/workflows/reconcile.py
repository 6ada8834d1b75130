"""The reconciler: the database is the record of work, the queue only a hint.

Anything the broker can lose is found again from SQL, one indexed query per kind per pass
(``ix_items_status_updated_at``; no table scans at millions of items):

1. **Journaled answers** (:mod:`pipeline.coordination.journal`): a paid answer its worker could
   not write is
   written now, if the item is still waiting for it (its claim abandoned, or failed as
   ``unknown``); entries for items already settled are dropped.
2. **A broker that lost its data** (a Redis restarted empty): the producer leaves an epoch
   token in Redis before its first message; when the token is gone, or changed since the last
   pass, every ``queued`` item is sent again.
3. **Abandoned claims**: ``submitting`` items whose lease ran out (the heartbeat stopped: the
   worker died) get a message; the claim's compare-and-set lets one delivery take them over.
4. **Lost messages**: when the queue is empty, ``queued`` items untouched for two passes have
   no message left anywhere (a message acknowledged without its work recorded, a producer that
   died between its commit and its enqueue) and are sent again.
5. **Items parked by a pause that is no longer open** (a resume whose enqueue was lost) are
   queued again.

Every message sent is noted on the item (``updated_at``), so a pass sends one message per item
at most every two passes. A second message for an item is harmless: the claim is a
compare-and-set. One pass at a time runs in the whole cluster (a Redis lock).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis

from pipeline.coordination.journal import AnswerJournal
from pipeline.outputs.events import Outbox
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import FINAL_STATUSES, Item, ItemStatus, utcnow
from pipeline.workflows.processing import apply_answer

log = logging.getLogger(__name__)

Enqueue = Callable[[Sequence[int]], None]

CHUNK = 5000


def epoch_key(queue: str) -> str:
    return f"idocr:broker-epoch:{queue}"


def ensure_epoch(client: redis.Redis, queue: str) -> str:
    """The broker's epoch token, created if missing. The producer calls this before its first
    message: a token that disappears later means the broker lost what it held."""
    client.set(epoch_key(queue), uuid.uuid4().hex, nx=True)
    token = client.get(epoch_key(queue))
    return token.decode() if isinstance(token, bytes) else str(token)


@dataclass(slots=True)
class Report:
    ran: bool = True
    replayed: int = 0
    broker_reset: bool = False
    resent_all: int = 0
    stale_claims: int = 0
    lost_messages: int = 0
    unparked: int = 0

    def __str__(self) -> str:
        if not self.ran:
            return "another reconciler pass is running"
        parts = [f"{self.replayed} journaled answers written"] if self.replayed else []
        if self.broker_reset:
            parts.append(f"the broker lost its messages: {self.resent_all} queued items sent again")
        if self.stale_claims:
            parts.append(f"{self.stale_claims} abandoned claims sent for takeover")
        if self.lost_messages:
            parts.append(f"{self.lost_messages} queued items with no message sent again")
        if self.unparked:
            parts.append(f"{self.unparked} items parked by a closed pause queued again")
        return "; ".join(parts) or "nothing to do"

    @property
    def acted(self) -> bool:
        return bool(
            self.replayed
            or self.resent_all
            or self.stale_claims
            or self.lost_messages
            or self.unparked
        )


class Reconciler:
    def __init__(
        self,
        *,
        database_url: str,
        redis_client: redis.Redis,
        queue: str,
        enqueue: Enqueue,
        queue_depth: Callable[[], int],
        claim_lease: float,
        interval: float,
        provider: str,
        account: str,
        journal: AnswerJournal | None = None,
        today: Callable[[], datetime] = lambda: datetime.now(UTC),
        outbox: Outbox | None = None,
    ) -> None:
        self.db = database_url
        self.outbox = outbox
        self.redis = redis_client
        self.queue = queue
        self.enqueue = enqueue
        self.queue_depth = queue_depth
        self.lease = timedelta(seconds=claim_lease)
        self.interval = interval
        #: an item is sent again at most once per this long
        self.grace = timedelta(seconds=2 * interval)
        self.provider = provider
        self.account = account
        self.journal = journal
        self.today = today
        self._epoch: str | None = None

    def run_once(self) -> Report:
        lock = self.redis.lock(
            "idocr:reconcile-lock", timeout=max(60.0, 4 * self.interval), blocking=False
        )
        if not lock.acquire():
            return Report(ran=False)
        try:
            rep = Report()
            rep.replayed = self._replay_journal()
            rep.broker_reset = self._broker_reset()
            if rep.broker_reset:
                rep.resent_all = self._resend(repo.queued_untouched, utcnow())
            rep.stale_claims = self._resend(
                lambda s, before, limit: repo.stale_claims(s, utcnow() - self.lease, before, limit),
                utcnow() - self.grace,
            )
            if not rep.broker_reset and self.queue_depth() == 0:
                rep.lost_messages = self._resend(repo.queued_untouched, utcnow() - self.grace)
            rep.unparked = self._unpark()
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:  # it expired: a pass longer than its timeout
                pass
        if rep.acted:
            log.warning("reconciler: %s", rep)
        return rep

    # -- the steps ---------------------------------------------------------------------------
    def _replay_journal(self) -> int:
        if self.journal is None:
            return 0
        written = 0
        for entry in self.journal.entries():
            with unit_of_work(self.db) as s:
                status = apply_answer(
                    s,
                    entry,
                    repo.answerable(stale_before=utcnow() - self.lease),
                    self.today(),
                    self.outbox,
                )
                item = s.get(Item, entry.item_id)
                settled = (
                    item is None
                    or item.purged_at is not None  # retention removed its data: the answer too
                    or (
                        item.status in FINAL_STATUSES
                        and not (item.status == ItemStatus.FAILED and item.reason == repo.UNKNOWN)
                    )
                )
            if status is not None:
                written += 1
                log.info("item %s: journaled answer written (%s)", entry.item_id, status)
            if status is not None or settled:
                self.journal.drop(entry.item_id)
        return written

    def _broker_reset(self) -> bool:
        token = self.redis.get(epoch_key(self.queue))
        current = token.decode() if isinstance(token, bytes) else token
        lost = current is None or (self._epoch is not None and current != self._epoch)
        if current is None:
            current = ensure_epoch(self.redis, self.queue)
        self._epoch = current
        return lost

    def _resend(self, find: Callable[..., list[int]], before: datetime) -> int:
        """Send a message for every item ``find`` returns, noting it on the item, page by page
        (a noted item drops out of the next page's query)."""
        sent = 0
        while True:
            with unit_of_work(self.db, read_only=True) as s:
                ids = find(s, before, CHUNK)
            if not ids:
                return sent
            self.enqueue(ids)  # first: a crash before the note only sends it once more
            with unit_of_work(self.db) as s:
                repo.touch(s, ids)
            sent += len(ids)

    def _unpark(self) -> int:
        with unit_of_work(self.db, read_only=True) as s:
            if repo.open_pause(s, self.provider, self.account) is not None:
                return 0
        total = 0
        while True:
            with unit_of_work(self.db) as s:
                ids = repo.unpause_items(s, self.provider, limit=1000)
            if not ids:
                return total
            self.enqueue(ids)
            total += len(ids)
