"""The transactional outbox: events written in the transaction of what they report.

:func:`emit` inserts one ``events`` row in the caller's session (it never commits: the unit of
work around it does) and returns the event's stable id. :mod:`pipeline.workflows.relay` publishes
the rows later, at least once, under that id (the results stream, the result keys of requests
and the optional webhook).

``data`` never holds personal data: ids, statuses, codes, the provider's ``ocrid``, a batch name.
An item's recognised fields are read (and decrypted) when its event is published, so the outbox
keeps no plain-text copy of them.

Whether a webhook delivery is owed is decided when the row is written: ``delivery_state`` is
``pending`` when a webhook is configured then, else ``none``. Callers say so with ``webhook=``
or through an :class:`Outbox` built from the settings (no global state).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.orm import Session

from pipeline.storage.models import Event, Item, utcnow

if TYPE_CHECKING:
    from pipeline.config import Settings

ITEM_FINISHED = "item.finished"
BATCH_FINISHED = "batch.finished"
REQUEST_REJECTED = "request.rejected"
QUEUE_PAUSED = "queue.paused"
QUEUE_RESUMED = "queue.resumed"
KINDS = (ITEM_FINISHED, BATCH_FINISHED, REQUEST_REJECTED, QUEUE_PAUSED, QUEUE_RESUMED)

#: delivery_state values
NO_DELIVERY = "none"
PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"


def new_event_id() -> str:
    return str(uuid.uuid4())


def emit(
    session: Session,
    kind: str,
    *,
    item_id: int | None = None,
    batch_id: str | None = None,
    request_id: int | None = None,
    data: dict[str, Any] | None = None,
    webhook: bool = False,
    event_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """Insert one event row in the caller's transaction; returns its ``event_id``.

    ``item_id`` without ``batch_id``: the batch is read from the item in the same statement
    (``INSERT … SELECT``), so the caller needs no extra query. ``webhook``: a webhook is
    configured (the row owes a delivery). ``event_id``: a deterministic id (a uuid string) when
    the event must exist at most once (``batch.finished`` per batch and size)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    eid = event_id or new_event_id()
    when = now or utcnow()
    params = {
        "event_id": eid,
        "kind": kind,
        "item_id": item_id,
        "batch_id": batch_id,
        "request_id": request_id,
        "data": dict(data or {}),
        "created_at": when,
        "delivery_state": PENDING if webhook else NO_DELIVERY,
        "delivery_attempts": 0,
        "next_delivery_at": when if webhook else None,
    }
    if item_id is not None and batch_id is None:
        session.execute(_from_item(), params)
    else:
        session.execute(_plain(), params)
    return eid


# The two statements, built once per process (compiling them per event cost more than the
# INSERT itself); every value is a bound parameter.
_COLUMNS = (
    "event_id",
    "kind",
    "item_id",
    "batch_id",
    "request_id",
    "data",
    "created_at",
    "delivery_state",
    "delivery_attempts",
    "next_delivery_at",
)


def _events_table() -> Table:
    # Core, not the ORM's bulk insert: the statements are executed with one dict of parameters
    return cast(Table, Event.__table__)


@lru_cache(maxsize=1)
def _plain() -> Any:
    return insert(_events_table()).values(
        {c: bindparam(c, type_=Event.__table__.c[c].type) for c in _COLUMNS}
    )


@lru_cache(maxsize=1)
def _from_item() -> Any:
    """``INSERT … SELECT``: the batch read from the item in the same statement."""
    table = _events_table()
    picked = [
        Item.id
        if c == "item_id"
        else Item.batch_id
        if c == "batch_id"
        else bindparam(c, type_=table.c[c].type)
        for c in _COLUMNS
    ]
    sel = select(*picked).where(Item.id == bindparam("item_id", type_=Item.__table__.c.id.type))
    return insert(table).from_select([table.c[c] for c in _COLUMNS], sel)


@dataclass(frozen=True, slots=True)
class Outbox:
    """Where a workflow writes its events: knows whether a webhook is configured."""

    webhook: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Outbox:
        return cls(webhook=webhook_configured(settings))

    def emit(self, session: Session, kind: str, **kwargs: Any) -> str:
        kwargs.setdefault("webhook", self.webhook)
        return emit(session, kind, **kwargs)

    def item_finished(
        self,
        session: Session,
        item_id: int,
        status: str,
        *,
        reason: Any = None,
        code: Any = None,
        ocrid: Any = None,
        batch_id: str | None = None,
    ) -> str:
        """``item.finished`` for one item reaching a final status (one INSERT)."""
        return self.emit(
            session,
            ITEM_FINISHED,
            item_id=item_id,
            batch_id=batch_id,
            data=item_data(status, reason=reason, code=code, ocrid=ocrid),
        )

    def item_finished_row(
        self, status: str, *, reason: Any = None, code: Any = None, ocrid: Any = None
    ) -> dict[str, Any]:
        """The columns of an ``item.finished`` row for a writer that inserts it itself (the
        worker's one-statement answer write): ``event_id``, ``kind``, ``data``,
        ``delivery_state``, ``next_delivery_at``."""
        return {
            "event_id": new_event_id(),
            "kind": ITEM_FINISHED,
            "data": item_data(status, reason=reason, code=code, ocrid=ocrid),
            "delivery_state": PENDING if self.webhook else NO_DELIVERY,
            "next_delivery_at": utcnow() if self.webhook else None,
        }

    def items_finished(
        self, session: Session, batch_id: str, finished: list[tuple[int, str, str | None]]
    ) -> list[str]:
        """``item.finished`` for many items of one batch settled together (the scan's
        rejections and duplicates): ``(item id, status, reason)`` each, one executemany."""
        if not finished:
            return []
        when = utcnow()
        rows = [
            {
                "event_id": new_event_id(),
                "kind": ITEM_FINISHED,
                "item_id": item_id,
                "batch_id": batch_id,
                "request_id": None,
                "data": item_data(status, reason=reason),
                "created_at": when,
                "delivery_state": PENDING if self.webhook else NO_DELIVERY,
                "delivery_attempts": 0,
                "next_delivery_at": when if self.webhook else None,
            }
            for item_id, status, reason in finished
        ]
        session.execute(insert(Event), rows)
        return [str(r["event_id"]) for r in rows]


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def item_data(
    status: str, *, reason: Any = None, code: Any = None, ocrid: Any = None
) -> dict[str, Any]:
    """What an ``item.finished`` row keeps: the status and codes, never the item's fields."""
    return {
        "status": str(status),
        "reason": _text(reason),
        "code": _text(code),
        "ocrid": _text(ocrid),
    }


def pause_data(provider: str, account: str, kind: str, reason: str) -> dict[str, Any]:
    """What ``queue.paused`` keeps: the provider account, the kind of pause and why."""
    return {"provider": provider, "account": account, "pause": kind, "reason": reason}


def webhook_configured(settings: Settings) -> bool:
    return bool(getattr(settings, "webhook_url", None))
