"""What `idocr status` reports: one snapshot of a batch and of the provider account it uses.

Everything comes from SQL (counts, pause, last balance reading, recent attempts) except the live
quota ledger, read from Redis only when a Redis server is configured (an embedded Redis is
never started just to be read). Times are UTC, ISO 8601 with an offset, on both backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from pipeline.config import Settings, provider_identity
from pipeline.domain.masking import redact_text
from pipeline.outputs.records import utc_iso
from pipeline.storage.models import FINAL_STATUSES, Attempt, Batch, Item

__all__ = ["BatchStatus", "NoSuchBatch", "collect", "latest_batch_id", "recent_batch_ids"]

#: rate achieved and ETA are measured over the last this many seconds
RATE_WINDOW = 60.0


class NoSuchBatch(LookupError):
    """The batch named does not exist."""


def recent_batch_ids(session: Session, n: int) -> list[str]:
    """The ``n`` most recent batches that hold at least one item, newest first: a scan that
    failed before adding anything leaves an empty batch, which is nobody's "latest"."""
    has_items = exists().where(Item.batch_id == Batch.id)
    return list(
        session.scalars(
            select(Batch.id)
            .where(has_items)
            .order_by(Batch.created_at.desc(), Batch.id.desc())
            .limit(n)
        )
    )


def latest_batch_id(session: Session) -> str | None:
    """The most recent batch that holds at least one item."""
    ids = recent_batch_ids(session, 1)
    return ids[0] if ids else None


@dataclass(slots=True)
class BatchStatus:
    provider: str
    account: str
    rate_limit: float
    generated_at: datetime
    batch: str | None = None
    by_status: dict[str, int] = field(default_factory=dict)
    #: (status, code or reason, items)
    by_code: list[tuple[str, str, int]] = field(default_factory=list)
    pending: int = 0
    #: items whose personal data retention removed (counted in their status too)
    purged: int = 0
    pause: dict[str, Any] | None = None
    balance: dict[str, Any] | None = None
    quota: dict[str, Any] | None = None
    #: provider calls per second over the last RATE_WINDOW seconds
    rate_achieved: float = 0.0
    #: items workers finished per second over the same window
    finish_rate: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def final(self) -> bool:
        return self.batch is not None and self.pending == 0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until every item is final at the recent pace; None when nothing moves."""
        if self.batch is None:
            return None
        if self.pending == 0:
            return 0.0
        if self.finish_rate <= 0 or self.pause is not None:
            return None
        return self.pending / self.finish_rate

    @property
    def quota_left(self) -> int | None:
        if self.quota is not None and self.quota.get("available") is not None:
            return int(self.quota["available"])
        return None if self.balance is None else int(self.balance["remaining"])

    def to_dict(self) -> dict[str, Any]:
        eta = self.eta_seconds
        return {
            "batch": self.batch,
            "generated_at": utc_iso(self.generated_at),
            "provider": {"name": self.provider, "account": self.account},
            "paused": self.pause,
            "balance": self.balance,
            "quota": self.quota,
            "items": {
                "total": self.total,
                "pending": self.pending,
                "final": self.final,
                "purged": self.purged,
                "by_status": dict(sorted(self.by_status.items())),
                "by_code": [
                    {"status": s, "code": c or None, "items": n} for s, c, n in self.by_code
                ],
            },
            "rate": {
                "limit": self.rate_limit,
                "achieved": round(self.rate_achieved, 3),
                "window_seconds": RATE_WINDOW,
            },
            "eta_seconds": None if eta is None else round(eta, 1),
        }


def _quota_snapshot(settings: Settings, provider: str, account: str) -> dict[str, Any] | None:
    """The live ledger, if a Redis server is configured and answers; None otherwise."""
    if not settings.redis_url:
        return None
    import redis

    from pipeline.coordination.quota import QuotaLedger

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        snap = QuotaLedger(client, provider, account, settings.quota_low_watermark).snapshot()
    except (redis.RedisError, ValueError):
        return None
    finally:
        client.close()
    if snap.remaining is None:
        return None
    return {
        "remaining": snap.remaining,
        "reserved": snap.reserved,
        "available": snap.available,
        "reading_at": (
            utc_iso(datetime.fromtimestamp(snap.reading_at, UTC)) if snap.reading_at else None
        ),
    }


def collect(
    settings: Settings, session: Session, batch_id: str | None, *, live_quota: bool = True
) -> BatchStatus:
    """The status of ``batch_id`` (default: the latest batch with items). Raises NoSuchBatch."""
    from pipeline.storage import repo

    provider, account = provider_identity(settings)
    now = datetime.now(UTC)
    st = BatchStatus(provider, account, settings.rate_limit, now)
    pause = repo.open_pause(session, provider, account)
    if pause is not None:
        st.pause = {
            "kind": pause.kind,
            "reason": redact_text(pause.reason),
            "since": utc_iso(pause.paused_at),
        }
    reading = repo.last_balance(session, provider, account)
    if reading is not None:
        st.balance = {"remaining": reading.remaining, "taken_at": utc_iso(reading.taken_at)}
    if live_quota:
        st.quota = _quota_snapshot(settings, provider, account)

    if batch_id is None:
        batch_id = latest_batch_id(session)
        if batch_id is None:
            return st
    elif session.get(Batch, batch_id) is None:
        raise NoSuchBatch(batch_id)
    st.batch = batch_id
    st.by_status = repo.status_counts(session, batch_id)
    st.by_code = sorted(
        (s, c or "", n) for (s, c), n in repo.code_counts(session, batch_id).items()
    )
    st.pending = repo.pending_count(session, batch_id)
    st.purged = (
        session.scalar(
            select(func.count()).where(Item.batch_id == batch_id, Item.purged_at.is_not(None))
        )
        or 0
    )

    since = now - timedelta(seconds=RATE_WINDOW)
    calls = (
        session.scalar(
            select(func.count())
            .select_from(Attempt)
            .join(Item, Item.id == Attempt.item_id)
            .where(Item.batch_id == batch_id, Attempt.started_at >= since)
        )
        or 0
    )
    finished = (
        session.scalar(
            select(func.count()).where(
                Item.batch_id == batch_id,
                Item.status.in_(FINAL_STATUSES),
                # a worker's work: items rejected or deduplicated when scanned tell no pace
                Item.claimed_at.is_not(None),
                Item.updated_at >= since,
            )
        )
        or 0
    )
    st.rate_achieved = calls / RATE_WINDOW
    st.finish_rate = finished / RATE_WINDOW
    return st


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
