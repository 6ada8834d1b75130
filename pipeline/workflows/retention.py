"""Retention: personal data is kept only as long as it is needed, then purged.

What a purge removes from an item that reached a final status before the cut-off:

* its result's personal fields (name, gender, ethnicity, date of birth, address, ID number and
  its blind index, issuing authority, validity period), its checks (they quote the partner's
  file name) and the provider's raw answer;
* its file names: ``source_key`` and ``source_uri`` become ``purged:<item id>``, the pair name
  is cleared (names are personal: they are often a name or an ID number);
* the caller's metadata on the request that brought it in (``requests.meta``);
* its copies in Redis (:class:`RedisCopies`): its entry in the answer journal, if one was left
  behind, and the result key its request's caller reads (``idocr:result:<idempotency key>``);
  a purge by age also trims the results stream of every event older than the cut-off. The
  claim its content still holds (``idocr:sha:<sha256>``) goes too, so the same bytes seen again
  are sent again rather than pointed at an answer that is gone.

What it keeps, for billing and audit: the item (status, reason, code, message, ocrid, attempt
count, sha256, size, timestamps), its attempts, the result row's provider, side and quality
flags, batches, pauses and balance readings. ``items.purged_at`` records when; the export shows
such a record as ``purged`` and ``idocr status`` counts them.

Items not final yet (queued, claimed, paused) are never purged: their names are still needed to
read the file. Age is counted from the item's last change (when it became final).

The work goes in small transactions of ``chunk`` items, oldest first (keyset on the partial
index ``ix_items_unpurged_updated_at``), so a purge of millions of rows never holds long locks
and can be interrupted and run again: what was purged stays purged, the rest is found again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import redis
from sqlalchemy import Text, and_, func, literal, select, tuple_, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import Session

from pipeline.coordination.dedupe import ContentClaims
from pipeline.coordination.journal import AnswerJournal
from pipeline.outputs.records import CARD_FIELDS
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import FINAL_STATUSES, Item, Request, Result, utcnow
from pipeline.storage.repo import one_of
from pipeline.workflows.relay import result_key

log = logging.getLogger(__name__)

#: what replaces a purged file name (with the item id: the names stay unique in their batch)
PURGED_PREFIX = "purged:"
#: personal columns of ``results``, emptied by a purge (plus the ID number's blind index and
#: any other ``id_number*`` column the schema has)
PERSONAL_RESULT_FIELDS = (*CARD_FIELDS, "checks")
CHUNK = 1000


class Copies(Protocol):
    """Where personal copies of items live outside the database."""

    def forget(
        self, items: Sequence[tuple[int, str | None]], request_keys: Sequence[str]
    ) -> tuple[int, int]:
        """Remove what is kept for these (item id, sha256) and requests: (journal entries,
        result keys)."""
        ...

    def trim_before(self, cutoff: datetime) -> int:
        """Remove the published events older than ``cutoff``; how many there were."""
        ...


class RedisCopies:
    """The answer journal, the requests' result keys and the results stream, in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        journal: AnswerJournal,
        stream: str,
        claims: ContentClaims | None = None,
    ) -> None:
        self.redis = client
        self.journal = journal
        self.stream = stream
        self.claims = claims

    def forget(
        self, items: Sequence[tuple[int, str | None]], request_keys: Sequence[str]
    ) -> tuple[int, int]:
        entries = self.journal.forget([item_id for item_id, _ in items])
        keys = int(self.redis.delete(*map(result_key, request_keys))) if request_keys else 0
        if self.claims is not None:
            self.claims.release([(sha, item_id) for item_id, sha in items if sha])
        return entries, keys

    def trim_before(self, cutoff: datetime) -> int:
        # stream entry ids are the milliseconds they were added at
        return int(
            self.redis.xtrim(self.stream, minid=int(cutoff.timestamp() * 1000), approximate=False)
        )


@dataclass(slots=True)
class PurgeReport:
    cutoff: datetime | None
    batch_id: str | None
    dry_run: bool = False
    #: items purged (with --dry-run: that would be)
    items: int = 0
    #: results whose personal fields were emptied
    results: int = 0
    #: requests whose metadata was removed
    requests: int = 0
    #: answer journal entries removed
    journal: int = 0
    #: requests' result keys removed
    result_keys: int = 0
    #: results stream entries older than the cut-off removed
    stream: int = 0
    transactions: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "batch": self.batch_id,
            "dry_run": self.dry_run,
            "items": self.items,
            "results": self.results,
            "requests": self.requests,
            "journal": self.journal,
            "result_keys": self.result_keys,
            "stream": self.stream,
            "transactions": self.transactions,
            "seconds": round(self.seconds, 3),
        }


def _personal_values() -> dict[Any, Any]:
    cols = Result.__table__.c
    values: dict[Any, Any] = {getattr(Result, f): None for f in PERSONAL_RESULT_FIELDS}
    for c in cols:
        if c.key.startswith("id_number") and c.key not in PERSONAL_RESULT_FIELDS:
            values[getattr(Result, c.key)] = None  # the blind index
    # NOT NULL: an empty object stands where the provider's answer was
    values[Result.raw] = {}
    return values


def _eligible(cutoff: datetime | None, batch_id: str | None) -> Any:
    cond = and_(Item.purged_at.is_(None), Item.status.in_(FINAL_STATUSES))
    if cutoff is not None:
        cond = and_(cond, Item.updated_at < cutoff)
    if batch_id is not None:
        cond = and_(cond, Item.batch_id == batch_id)
    return cond


def purge_chunk(
    session: Session, item_ids: Sequence[int], now: datetime
) -> tuple[list[tuple[int, str | None]], int, list[str]]:
    """Purge these items (those still final and not purged): ((id, sha256) of the items purged,
    results emptied, the idempotency keys of the requests cleared). The caller commits."""
    if not item_ids:
        return [], 0, []
    placeholder = literal(PURGED_PREFIX) + sql_cast(Item.id, Text)
    purged = [
        (int(item_id), sha)
        for item_id, sha in session.execute(
            update(Item)
            .where(
                one_of(session, Item.id, item_ids),
                Item.purged_at.is_(None),
                Item.status.in_(FINAL_STATUSES),
            )
            .values(
                {
                    Item.source_key: placeholder,
                    Item.source_uri: placeholder,
                    Item.pair_key: None,
                    Item.purged_at: now,
                    # the item's own age and history stay as they were
                    Item.updated_at: Item.updated_at,
                }
            )
            .returning(Item.id, Item.sha256)
            .execution_options(synchronize_session=False)
        )
    ]
    if not purged:
        return [], 0, []
    done = [item_id for item_id, _ in purged]
    res = session.execute(
        update(Result)
        .where(one_of(session, Result.item_id, done))
        .values(_personal_values())
        .execution_options(synchronize_session=False)
    )
    keys = session.scalars(
        update(Request)
        .where(one_of(session, Request.item_id, done))
        .values(meta={})
        .returning(Request.idempotency_key)
        .execution_options(synchronize_session=False)
    )
    return purged, cast("Any", res).rowcount or 0, list(keys)


def count_eligible(
    session: Session, cutoff: datetime | None, batch_id: str | None
) -> tuple[int, int]:
    """(items, of which with a result) a purge with these bounds would take."""
    cond = _eligible(cutoff, batch_id)
    items = session.scalar(select(func.count()).select_from(Item).where(cond)) or 0
    results = (
        session.scalar(
            select(func.count())
            .select_from(Item)
            .join(Result, Result.item_id == Item.id)
            .where(cond)
        )
        or 0
    )
    return items, results


def purge(
    database_url: str,
    *,
    older_than: timedelta | None = None,
    batch_id: str | None = None,
    dry_run: bool = False,
    chunk: int = CHUNK,
    copies: Copies | None = None,
    now: datetime | None = None,
    on_chunk: Callable[[PurgeReport], None] | None = None,
) -> PurgeReport:
    """Purge the final items that last changed more than ``older_than`` ago (all final items of
    ``batch_id`` when no age is given), ``chunk`` per transaction. ``copies``: where the copies
    kept outside the database are removed (the answer journal, result keys, the results
    stream)."""
    if older_than is None and batch_id is None:
        raise ValueError("a purge needs an age (--older-than) or a batch (--batch)")
    started = time.monotonic()
    now = now or utcnow()
    cutoff = now - older_than if older_than is not None else None
    report = PurgeReport(cutoff=cutoff, batch_id=batch_id, dry_run=dry_run)
    if dry_run:
        with unit_of_work(database_url, read_only=True) as s:
            report.items, report.results = count_eligible(s, cutoff, batch_id)
        report.seconds = time.monotonic() - started
        return report
    cond = _eligible(cutoff, batch_id)
    last: tuple[datetime, int] | None = None
    while True:
        with unit_of_work(database_url) as s:
            q = select(Item.updated_at, Item.id).where(cond)
            if last is not None:
                q = q.where(tuple_(Item.updated_at, Item.id) > tuple_(*last))
            page = s.execute(q.order_by(Item.updated_at, Item.id).limit(chunk)).all()
            if not page:
                break
            last = (page[-1][0], page[-1][1])
            done, results, request_keys = purge_chunk(s, [row[1] for row in page], now)
        report.transactions += 1
        report.items += len(done)
        report.results += results
        report.requests += len(request_keys)
        if done and copies is not None:
            try:
                entries, keys = copies.forget(done, request_keys)
                report.journal += entries
                report.result_keys += keys
            except Exception as exc:  # Redis away: the entries are stale; the guard refuses them
                report.errors.append(f"Redis copies: {type(exc).__name__}")
        if on_chunk is not None:
            on_chunk(report)
        if len(page) < chunk:
            break
    if copies is not None and cutoff is not None and batch_id is None:
        try:
            report.stream = copies.trim_before(cutoff)
        except Exception as exc:
            report.errors.append(f"results stream: {type(exc).__name__}")
    report.seconds = time.monotonic() - started
    if report.items:
        log.info(
            "retention: %d items purged (%d results, %d requests) in %.1f s",
            report.items,
            report.results,
            report.requests,
            report.seconds,
        )
    return report


def purged_count(session: Session, batch_id: str) -> int:
    return (
        session.scalar(
            select(func.count()).where(Item.batch_id == batch_id, Item.purged_at.is_not(None))
        )
        or 0
    )
