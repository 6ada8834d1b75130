"""The schema: batches, items, attempts, results, and the pause and balance records.

Created only by Alembic migrations (``migrations/``); these models are the source the
migrations are written from. The naming convention keeps autogenerate deterministic.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from pipeline.storage.names import RedactedText, SealedName
from pipeline.storage.sealed import SealedJSON, SealedText

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT keys on PostgreSQL (millions of items per backfill); SQLite only autoincrements INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ItemStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting for a worker (also: put back by a pause)
    SUBMITTING = "submitting"  # claimed by a worker; provider calls under way
    PAUSED = "paused"  # found the provider paused: waits, without a message, for the resume
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the provider refused it, or retries ran out
    REJECTED = "rejected"  # never sent: bad or out-of-limit input
    DUPLICATE = "duplicate"  # same bytes as another item: never sent, shares its result


FINAL_STATUSES = frozenset(
    {ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.REJECTED, ItemStatus.DUPLICATE}
)


class Batch(TimestampMixin, Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(SealedName("batches.source"))
    provider: Mapped[str] = mapped_column(String(32))
    #: how images reach the provider: "bytes" (the worker sends them) or "url" (a presigned
    #: URL the provider fetches; the bytes never pass through the worker)
    via: Mapped[str] = mapped_column(String(8), default="bytes", server_default="bytes")

    items: Mapped[list[Item]] = relationship(back_populates="batch", lazy="raise")


class Item(TimestampMixin, Base):
    __tablename__ = "items"
    __table_args__ = (
        # An object is keyed by its path within the source and its content: rescanning adds
        # nothing, a changed file at the same path is a new item.
        UniqueConstraint("batch_id", "source_key", "fingerprint"),
        Index("ix_items_batch_id_status", "batch_id", "status"),
        # the reconciler: stale claims and queued items whose message was lost, oldest first
        Index("ix_items_status_updated_at", "status", "updated_at"),
        # rescans look up what already succeeded by location (key + ETag)
        Index("ix_items_source_uri", "source_uri"),
        # the other side of a card is looked up by its shared name; most names have none
        Index(
            "ix_items_batch_id_pair_key",
            "batch_id",
            "pair_key",
            postgresql_where=text("pair_key IS NOT NULL"),
            sqlite_where=text("pair_key IS NOT NULL"),
        ),
        # retention: final items not yet purged, oldest first
        Index(
            "ix_items_unpurged_updated_at",
            "updated_at",
            "id",
            postgresql_where=text("purged_at IS NULL"),
            sqlite_where=text("purged_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    #: names are personal data: sealed at rest, searchable by equality (pipeline.storage.names)
    source_key: Mapped[str] = mapped_column(SealedName("items.source_key"))
    source_uri: Mapped[str] = mapped_column(SealedName("items.source_uri"))
    #: the name front and back of one card share (:func:`pipeline.domain.pairing.pair_key`)
    pair_key: Mapped[str | None] = mapped_column(SealedName("items.pair_key"))
    #: "sha256:<hex>" when the bytes were read at scan time, "etag:<etag>" otherwise
    fingerprint: Mapped[str] = mapped_column(String(160))
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    size: Mapped[int | None] = mapped_column(BigInteger)
    etag: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.QUEUED)
    #: why it is not succeeded: a rejection reason ("corrupt", "too_small"…) or an outcome class
    reason: Mapped[str | None] = mapped_column(String(32))
    code: Mapped[str | None] = mapped_column(String(32))
    msg: Mapped[str | None] = mapped_column(RedactedText)
    ocrid: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("items.id"))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    #: when retention removed its personal data (names, result fields); the audit columns stay
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    batch: Mapped[Batch] = relationship(back_populates="items", lazy="raise")


class Attempt(Base):
    """One provider call. ``outcome`` is NULL while the call is in flight: a row left that
    way by a crash is an attempt whose outcome is unknown (it may have been billed)."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(String(16))
    http_status: Mapped[int | None] = mapped_column(Integer)
    code: Mapped[str | None] = mapped_column(String(32))
    msg: Mapped[str | None] = mapped_column(Text)
    elapsed_ms: Mapped[int | None] = mapped_column(Integer)
    ocrid: Mapped[str | None] = mapped_column(String(64))


class Result(TimestampMixin, Base):
    """The normalised record of a recognised card, one per succeeded item.

    Every personal field, the checks (they quote the partner's file name) and the provider's
    raw answer are sealed at rest with ``IDOCR_DATA_KEYS`` (:mod:`pipeline.storage.sealed`);
    ``id_number_index`` is the ID number's blind index, the only way to look a card up."""

    __tablename__ = "results"

    item_id: Mapped[int] = mapped_column(
        ForeignKey("items.id", ondelete="CASCADE"), primary_key=True
    )
    provider: Mapped[str] = mapped_column(String(32))
    side: Mapped[str | None] = mapped_column(String(8))
    name: Mapped[str | None] = mapped_column(SealedText("results.name"))
    gender: Mapped[str | None] = mapped_column(SealedText("results.gender"))
    ethnicity: Mapped[str | None] = mapped_column(SealedText("results.ethnicity"))
    date_of_birth: Mapped[str | None] = mapped_column(SealedText("results.date_of_birth"))
    domicile: Mapped[str | None] = mapped_column(SealedText("results.domicile"))
    id_number: Mapped[str | None] = mapped_column(SealedText("results.id_number"))
    issue_authority: Mapped[str | None] = mapped_column(SealedText("results.issue_authority"))
    valid_from: Mapped[str | None] = mapped_column(SealedText("results.valid_from"))
    valid_to: Mapped[str | None] = mapped_column(SealedText("results.valid_to"))
    #: ``<kid>:<hex HMAC-SHA256>`` of the normalised ID number (None without a key)
    id_number_index: Mapped[str | None] = mapped_column(String(100), index=True)
    quality: Mapped[list[str] | None] = mapped_column(JsonType)
    checks: Mapped[dict[str, Any] | None] = mapped_column(SealedJSON("results.checks"))
    raw: Mapped[Any] = mapped_column(SealedJSON("results.raw"))


class Pause(Base):
    """A pause of submissions to one provider account; open while ``resumed_at`` is NULL."""

    __tablename__ = "pauses"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    account: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # quota | auth | clock | operator
    reason: Mapped[str] = mapped_column(Text)
    paused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resumed_by: Mapped[str | None] = mapped_column(String(64))


class BalanceReading(Base):
    __tablename__ = "balance_readings"
    __table_args__ = (
        Index("ix_balance_readings_account_taken", "provider", "account", "taken_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    account: Mapped[str] = mapped_column(String(128))
    remaining: Mapped[int] = mapped_column(BigInteger)
    taken_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Request(Base):
    """Work another system handed over (intake stream, Python client, ``idocr submit``), keyed
    by the caller's idempotency key: the same key never makes a second item or provider call."""

    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    #: how it came in: stream | client | cli
    channel: Mapped[str] = mapped_column(String(16))
    #: accepted (an item exists) | rejected (``reason`` says why; no item)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    item_id: Mapped[int | None] = mapped_column(
        ForeignKey("items.id", ondelete="SET NULL"), index=True
    )
    batch_id: Mapped[str | None] = mapped_column(String(64))
    side: Mapped[str | None] = mapped_column(String(8))
    #: the caller's metadata, echoed back in its events; it may hold personal data, so it is
    #: sealed at rest with the key ring (the same JSON/JSONB column: no migration)
    meta: Mapped[Any] = mapped_column(SealedJSON("requests.meta"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Event(Base):
    """The transactional outbox: one row per event, written in the transaction of what it
    reports, published at least once (results stream, webhooks) under its stable ``event_id``.

    ``data`` holds no personal data: an item's fields are read (and decrypted) when the event is
    published, so the outbox never keeps a plain-text copy of them."""

    __tablename__ = "events"
    __table_args__ = (
        # the relay's look-ups: not yet on the stream; webhook deliveries due
        Index(
            "ix_events_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
        Index(
            "ix_events_delivery_due",
            "next_delivery_at",
            postgresql_where=text("delivery_state = 'pending'"),
            sqlite_where=text("delivery_state = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    #: item.finished | batch.finished | request.rejected | queue.paused | queue.resumed
    kind: Mapped[str] = mapped_column(String(32))
    item_id: Mapped[int | None] = mapped_column(BigInteger)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[int | None] = mapped_column(BigInteger)
    data: Mapped[Any] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: on the results stream since
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: webhook delivery: none (no webhook configured when it was written) | pending | delivered
    #: | dead (retries ran out)
    delivery_state: Mapped[str] = mapped_column(String(16), default="none")
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_delivery_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
