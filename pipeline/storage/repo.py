"""Queries and state changes on the schema. Functions take a Session and never commit: the unit
of work around them does (``pipeline.storage.db.unit_of_work``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    BigInteger,
    Connection,
    Text,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased

if TYPE_CHECKING:
    from sqlalchemy import CursorResult, Table

from pipeline.domain.pairing import PAIR_CHECK, SideRecord, pair_checks, pair_key
from pipeline.storage.crypto import active_ring
from pipeline.storage.models import (
    FINAL_STATUSES,
    Attempt,
    BalanceReading,
    Batch,
    Event,
    Item,
    ItemStatus,
    Pause,
    Result,
    utcnow,
)

#: statuses of an item that will (or did) produce a result other items may share
_CANONICAL = (ItemStatus.QUEUED, ItemStatus.SUBMITTING, ItemStatus.SUCCEEDED, ItemStatus.PAUSED)


# -- batches -----------------------------------------------------------------------------------


def get_or_create_batch(
    session: Session, batch_id: str, source: str, provider: str, via: str = "bytes"
) -> tuple[Batch, bool]:
    """The batch, and whether it was created now."""
    batch = session.get(Batch, batch_id)
    if batch is not None:
        return batch, False
    batch = Batch(id=batch_id, source=source, provider=provider, via=via)
    session.add(batch)
    session.flush()
    return batch, True


def refresh_statistics(session: Session) -> None:
    """PostgreSQL: let the planner see how big the items table has grown (a backfill adds
    millions of rows faster than autovacuum analyses them, and stale statistics make it
    choose the wrong index for the rescan lookups)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE items"))


def latest_batch_id(session: Session) -> str | None:
    return session.scalar(
        select(Batch.id).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(1)
    )


# -- scanning ----------------------------------------------------------------------------------


@dataclass(slots=True)
class NewItem:
    source_key: str
    source_uri: str
    fingerprint: str
    sha256: str | None = None
    size: int | None = None
    etag: str | None = None
    status: str = ItemStatus.QUEUED
    reason: str | None = None
    msg: str | None = None


def _conn(s: Session | Connection) -> Connection:
    """The connection a Core statement runs on: a session's, or one of
    :func:`pipeline.storage.db.one_statement`."""
    return s if isinstance(s, Connection) else s.connection()


def one_of(session: Session, column: Any, values: Iterable[Any]) -> Any:
    """``column IN values``; on PostgreSQL ``= ANY(array)``: one parameter instead of hundreds,
    so the statement is the same for every chunk and the driver does not re-parse it."""
    vals = list(values)
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, vals, type_=ARRAY(column.type)))
    return column.in_(vals)


def name_in(session: Session, column: Any, names: Iterable[str]) -> Any:
    """``column IN names`` for a sealed name column (:mod:`pipeline.storage.names`): matches a
    name sealed under any key of the ring, or written before there was one, so a new key put
    first (before ``idocr keys rotate``) or a key added later never makes a rescan take its
    files again."""
    ring = active_ring()
    vals = list(names)
    if not ring.enabled:
        return one_of(session, column, vals)
    context = column.type.context
    stored = [t for v in vals for t in ring.seal_fixed_all(v, context)] + vals
    # compared as stored: the tokens are already sealed
    return one_of(session, type_coerce(column, Text), stored)


def existing_keys(session: Session, batch_id: str, keys: Sequence[str]) -> set[tuple[str, str]]:
    rows = session.execute(
        select(Item.source_key, Item.fingerprint).where(
            Item.batch_id == batch_id, name_in(session, Item.source_key, keys)
        )
    )
    return {(k, f) for k, f in rows}


def canonical_items(session: Session, sha256s: Iterable[str]) -> dict[str, int]:
    """For each sha256, an item (any batch) whose result it can share: a succeeded one first,
    else one still on its way. Failed and rejected items are not canonical: the image may be
    submitted again."""
    shas = list(set(sha256s))
    if not shas:
        return {}
    rows = session.execute(
        select(Item.sha256, Item.id, Item.status).where(
            one_of(session, Item.sha256, shas),
            Item.status.in_(_CANONICAL),
            Item.duplicate_of.is_(None),
            Item.purged_at.is_(None),  # its result was purged: nothing left to share
        )
    )
    best: dict[str | None, tuple[int, int]] = {}
    for sha, item_id, status in rows:
        rank = 0 if status == ItemStatus.SUCCEEDED else 1
        if sha not in best or (rank, item_id) < best[sha]:
            best[sha] = (rank, item_id)
    return {sha: item_id for sha, (_, item_id) in best.items() if sha is not None}


#: rejections that depend only on the bytes: the same object is rejected again without a look
CONTENT_REJECTIONS = frozenset(
    {
        "empty",
        "not_image",
        "unsupported_format",
        "corrupt",
        "too_small",
        "grayscale",
        "too_large",
        "pdf_error",
    }
)


@dataclass(slots=True)
class Judged:
    item_id: int
    status: str
    reason: str | None
    msg: str | None
    duplicate_of: int | None


def judged_at_location(
    session: Session, pairs: Iterable[tuple[str, str | None]]
) -> dict[tuple[str, str | None], Judged]:
    """(source_uri, etag) → an earlier item (any batch) of that very object whose outcome
    carries over: succeeded, a duplicate of one that is, or rejected for its content."""
    wanted = set(pairs)
    if not wanted:
        return {}
    rows = session.execute(
        select(
            Item.source_uri,
            Item.etag,
            Item.id,
            Item.status,
            Item.reason,
            Item.msg,
            Item.duplicate_of,
        )
        .where(
            name_in(session, Item.source_uri, {u for u, _ in wanted}),
            Item.status.in_((ItemStatus.SUCCEEDED, ItemStatus.DUPLICATE, ItemStatus.REJECTED)),
        )
        .order_by(Item.id)
    )
    found: dict[tuple[str, str | None], Judged] = {}
    for uri, etag, item_id, status, reason, msg, dup in rows:
        if (uri, etag) not in wanted:
            continue
        if status == ItemStatus.REJECTED and reason not in CONTENT_REJECTIONS:
            continue
        prev = found.get((uri, etag))
        if prev is None or (prev.status != ItemStatus.SUCCEEDED and status == ItemStatus.SUCCEEDED):
            found[(uri, etag)] = Judged(item_id, status, reason, msg, dup)
    return found


#: why an item is a duplicate
SAME_CONTENT = "same_content"  # identical bytes (sha256) to another item
ALREADY_SUCCEEDED = "already_succeeded"  # the same object (location + ETag) was answered before


@dataclass(slots=True)
class Added:
    id: int
    source_key: str
    status: str
    reason: str | None


def add_items(
    session: Session, batch_id: str, rows: Sequence[NewItem], *, new_batch: bool = False
) -> list[Added]:
    """Insert rows not yet in the batch; identical bytes, or an object already answered,
    become duplicates of that item. Returns what was inserted, in order.

    Core bulk inserts, not ORM objects: a backfill inserts millions of rows. ``new_batch``:
    the batch was created by this scan, so none of the rows can be in it yet."""
    present = set() if new_batch else existing_keys(session, batch_id, [r.source_key for r in rows])
    fresh: list[NewItem] = []
    seen: set[tuple[str, str]] = set()
    for r in rows:
        k = (r.source_key, r.fingerprint)
        if k not in present and k not in seen:
            seen.add(k)
            fresh.append(r)
    if not fresh:
        return []
    canon = canonical_items(
        session, [r.sha256 for r in fresh if r.sha256 and r.status == ItemStatus.QUEUED]
    )
    judged = judged_at_location(
        session, [(r.source_uri, r.etag) for r in fresh if r.etag and not r.sha256]
    )
    now = utcnow()
    values: list[dict[str, Any]] = []
    first_here: dict[str, int] = {}  # sha256 → index in values
    later_copies: list[tuple[int, str]] = []
    for r in fresh:
        v: dict[str, Any] = {
            "batch_id": batch_id,
            "source_key": r.source_key,
            "source_uri": r.source_uri,
            "pair_key": pair_key(r.source_key),
            "fingerprint": r.fingerprint,
            "sha256": r.sha256,
            "size": r.size,
            "etag": r.etag,
            "status": r.status,
            "reason": r.reason,
            "msg": r.msg,
            "attempts": 0,
            "duplicate_of": None,
            "created_at": now,
            "updated_at": now,
        }
        if r.status == ItemStatus.QUEUED and r.sha256:
            if r.sha256 in canon:
                v.update(
                    status=ItemStatus.DUPLICATE, reason=SAME_CONTENT, duplicate_of=canon[r.sha256]
                )
            elif r.sha256 in first_here:
                v.update(status=ItemStatus.DUPLICATE, reason=SAME_CONTENT)
                later_copies.append((len(values), r.sha256))
            else:
                first_here[r.sha256] = len(values)
        elif r.status == ItemStatus.QUEUED and (j := judged.get((r.source_uri, r.etag))):
            if j.status == ItemStatus.REJECTED:
                v.update(status=ItemStatus.REJECTED, reason=j.reason, msg=j.msg)
            else:
                v.update(
                    status=ItemStatus.DUPLICATE,
                    reason=ALREADY_SUCCEEDED,
                    duplicate_of=j.duplicate_of or j.item_id,
                )
        values.append(v)
    ids = list(
        session.scalars(insert(Item).returning(Item.id, sort_by_parameter_order=True), values)
    )
    if later_copies:
        # copies of an image first seen in this chunk point at it now that it has an id
        for index, sha in later_copies:
            session.execute(
                update(Item)
                .where(Item.id == ids[index])
                .values(duplicate_of=ids[first_here[sha]])
                .execution_options(synchronize_session=False)
            )
    return [
        Added(i, v["source_key"], v["status"], v["reason"])
        for i, v in zip(ids, values, strict=True)
    ]


# -- processing --------------------------------------------------------------------------------


def _claimable(stale_before: datetime | None) -> Any:
    cond = Item.status == ItemStatus.QUEUED
    if stale_before is not None:
        # claimed by a worker that has not been heard of since: it died mid-task
        cond = or_(cond, and_(Item.status == ItemStatus.SUBMITTING, Item.claimed_at < stale_before))
    return cond


@dataclass(slots=True)
class Claimed:
    """What a worker needs of the item it has just claimed."""

    batch_id: str
    source_uri: str
    sha256: str | None
    size: int | None
    attempts: int
    pair_key: str | None


# The worker's hot path runs prebuilt Core statements with bound parameters on the session's
# connection: no ORM bulk-update machinery and no statement building per image; SQLAlchemy
# compiles each of them once per process (its compiled cache is keyed on the statement object).
_items = cast("Table", Item.__table__)
_attempts = cast("Table", Attempt.__table__)
_results = cast("Table", Result.__table__)


def _claim_statement(stale: bool) -> Any:
    cond = _items.c.status == ItemStatus.QUEUED.value
    if stale:
        cond = or_(
            cond,
            and_(
                _items.c.status == ItemStatus.SUBMITTING.value,
                _items.c.claimed_at < bindparam("p_stale_before"),
            ),
        )
    return (
        update(_items)
        .where(_items.c.id == bindparam("p_id"), cond)
        .values(
            status=ItemStatus.SUBMITTING.value,
            claimed_at=bindparam("p_now"),
            claimed_by=bindparam("p_worker"),
            updated_at=bindparam("p_now"),
        )
        .returning(
            _items.c.batch_id,
            _items.c.source_uri,
            _items.c.sha256,
            _items.c.size,
            _items.c.attempts,
            _items.c.pair_key,
        )
    )


_CLAIM = _claim_statement(stale=False)
_CLAIM_STALE = _claim_statement(stale=True)


def claim_row(
    session: Session, item_id: int, worker: str, stale_before: datetime | None = None
) -> Claimed | None:
    """Compare-and-set queued → submitting, in one statement (UPDATE … RETURNING). A second
    delivery of the same message finds the item taken and gets None: it must not call the
    provider.

    ``stale_before``: an item claimed before then whose worker never renewed its claim since (a
    crash, a killed container) may be claimed again; what its calls left is settled by the
    taker (:meth:`pipeline.workflows.processing.Processor._claim`)."""
    params: dict[str, Any] = {"p_id": item_id, "p_now": utcnow(), "p_worker": worker[:128]}
    if stale_before is not None:
        params["p_stale_before"] = stale_before
    stmt = _CLAIM if stale_before is None else _CLAIM_STALE
    row = session.connection().execute(stmt, params).first()
    return None if row is None else Claimed(*row)


def _claim_with_attempt_statement(many: bool = False) -> Any:
    c = _items.c
    before = _items.alias("before")
    which = (
        c.id == any_(bindparam("p_ids", type_=ARRAY(BigInteger)))
        if many
        else c.id == bindparam("p_id")
    )
    claim = (
        update(_items)
        .where(
            which,
            or_(
                c.status == ItemStatus.QUEUED.value,
                and_(
                    c.status == ItemStatus.SUBMITTING.value,
                    c.claimed_at < bindparam("p_stale_before"),
                ),
            ),
        )
        .values(
            status=ItemStatus.SUBMITTING.value,
            claimed_at=bindparam("p_now"),
            claimed_by=bindparam("p_worker"),
            updated_at=bindparam("p_now"),
            attempts=case((c.attempts == 0, 1), else_=c.attempts),
        )
        .returning(
            c.id,
            c.batch_id,
            c.source_uri,
            c.sha256,
            c.size,
            # the count before this statement (a sub-select sees the statement's snapshot):
            # calls made by a predecessor
            select(before.c.attempts)
            .where(before.c.id == c.id)
            .scalar_subquery()
            .label("attempts"),
            c.pair_key,
        )
        .cte("c")
    )
    attempt = (
        insert(_attempts)
        .from_select(
            ["item_id", "number", "provider", "started_at"],
            select(
                claim.c.id,
                literal_column("1"),
                bindparam("p_provider", type_=_attempts.c.provider.type),
                bindparam("p_now", type_=_attempts.c.started_at.type),
            ).where(claim.c.attempts == 0),
        )
        .returning(_attempts.c.id, _attempts.c.item_id)
        .cte("a")
    )
    return select(
        *([claim.c.id] if many else []),
        claim.c.batch_id,
        claim.c.source_uri,
        claim.c.sha256,
        claim.c.size,
        claim.c.attempts,
        claim.c.pair_key,
        attempt.c.id,
    ).select_from(claim.outerjoin(attempt, attempt.c.item_id == claim.c.id))


_CLAIM_WITH_ATTEMPT = _claim_with_attempt_statement()
_CLAIM_MANY_WITH_ATTEMPTS = _claim_with_attempt_statement(many=True)


def claim_with_attempt(
    session: Session | Connection,
    item_id: int,
    worker: str,
    *,
    stale_before: datetime,
    provider: str,
) -> tuple[Claimed, int | None] | None:
    """PostgreSQL: :func:`claim_row` and, where no predecessor made calls, the first call's
    attempt row (:func:`insert_attempt`) in one statement. None: not claimable; an attempt id
    of None: a predecessor made calls (``Claimed.attempts``), whose leftovers the caller
    settles before any attempt of its own."""
    row = (
        _conn(session)
        .execute(
            _CLAIM_WITH_ATTEMPT,
            {
                "p_id": item_id,
                "p_now": utcnow(),
                "p_worker": worker[:128],
                "p_stale_before": stale_before,
                "p_provider": provider,
            },
        )
        .first()
    )
    if row is None:
        return None
    *claimed, attempt_id = row
    return Claimed(*claimed), attempt_id


def claim_many_with_attempts(
    session: Session | Connection,
    item_ids: Sequence[int],
    worker: str,
    *,
    stale_before: datetime,
    provider: str,
) -> dict[int, tuple[Claimed, int | None]]:
    """:func:`claim_with_attempt` for several items in one statement (PostgreSQL): the claims
    made, by item id; an item missing was not claimable (another worker has it, or it is
    final)."""
    rows = _conn(session).execute(
        _CLAIM_MANY_WITH_ATTEMPTS,
        {
            "p_ids": [int(i) for i in item_ids],
            "p_now": utcnow(),
            "p_worker": worker[:128],
            "p_stale_before": stale_before,
            "p_provider": provider,
        },
    )
    return {item_id: (Claimed(*claimed), attempt_id) for item_id, *claimed, attempt_id in rows}


def unclaim(session: Session, claims: Sequence[tuple[int, int]], worker: str) -> list[int]:
    """Give back claims ``worker`` made and never sent anything for: ``claims`` are (item id,
    the attempt row recorded with the claim). Each item ``worker`` still holds goes back to
    ``queued`` with no attempt counted, as before its claim, and its attempt row is dropped;
    returns those items' ids. The caller makes sure no call was made (no sent mark)."""
    attempt_of = dict(claims)
    if not attempt_of:
        return []
    back = list(
        session.scalars(
            update(Item)
            .where(
                one_of(session, Item.id, attempt_of),
                Item.status == ItemStatus.SUBMITTING,
                Item.claimed_by == worker[:128],
            )
            .values(
                status=ItemStatus.QUEUED,
                attempts=0,
                claimed_by=None,
                claimed_at=None,
                updated_at=utcnow(),
            )
            .returning(Item.id)
            .execution_options(synchronize_session=False)
        )
    )
    if back:
        session.execute(
            delete(Attempt)
            .where(
                one_of(session, Attempt.id, [attempt_of[i] for i in back]),
                Attempt.outcome.is_(None),
            )
            .execution_options(synchronize_session=False)
        )
    return sorted(back)


def renew_claims(session: Session, item_ids: Sequence[int], worker: str) -> int:
    """The heartbeat: ``claimed_at`` = now for the claims ``worker`` still holds."""
    res = session.execute(
        update(Item)
        .where(
            one_of(session, Item.id, item_ids),
            Item.status == ItemStatus.SUBMITTING,
            Item.claimed_by == worker[:128],
        )
        .values(claimed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return cast("CursorResult[Any]", res).rowcount or 0


#: why an item failed when its worker died while the provider had the image
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Guard:
    """Where a final status may still be written (see :func:`answerable`, :func:`held_by`)."""

    #: the claim this worker holds
    worker: str | None = None
    #: also claims abandoned before then, and items waiting for a message or parked
    stale_before: datetime | None = None
    #: also an item failed ``unknown`` whose answer turns up later
    unknown: bool = False

    def shape(self) -> tuple[bool, bool, bool]:
        return (self.worker is not None, self.stale_before is not None, self.unknown)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if self.worker is not None:
            p["g_worker"] = self.worker[:128]
        if self.stale_before is not None:
            p["g_stale_before"] = self.stale_before
        return p


def _guard_clause(shape: tuple[bool, bool, bool]) -> Any:
    worker, stale, unknown = shape
    c = _items.c
    conds = []
    if unknown:
        # a purged item takes no answer back (its personal data was removed on purpose)
        conds.append(
            and_(c.status == ItemStatus.FAILED.value, c.reason == UNKNOWN, c.purged_at.is_(None))
        )
    if worker:
        conds.append(
            and_(c.status == ItemStatus.SUBMITTING.value, c.claimed_by == bindparam("g_worker"))
        )
    if stale:
        conds.append(c.status == ItemStatus.QUEUED.value)
        conds.append(
            and_(
                c.status == ItemStatus.SUBMITTING.value,
                c.claimed_at < bindparam("g_stale_before"),
            )
        )
        conds.append(c.status == ItemStatus.PAUSED.value)
    return or_(*conds)


def answerable(worker: str | None = None, stale_before: datetime | None = None) -> Guard:
    """Items a paid answer may still be written to: the claim ``worker`` holds; with
    ``stale_before``, also claims abandoned since and items waiting for a message; and an item
    failed as ``unknown`` (its answer was lost with its worker) whose answer turns up later."""
    return Guard(worker=worker, stale_before=stale_before, unknown=True)


def held_by(worker: str) -> Guard:
    """The claim ``worker`` holds."""
    return Guard(worker=worker)


_settle_statements: dict[tuple[Any, ...], Any] = {}


def settle(session: Session, item_id: int, status: str, guard: Guard, **values: Any) -> bool:
    """Set a final (or parked) status only where ``guard`` still holds; False if it did not
    (the claim was taken over meanwhile). One prebuilt statement per guard shape and set of
    columns."""
    key = (guard.shape(), tuple(sorted(values)))
    stmt = _settle_statements.get(key)
    if stmt is None:
        stmt = (
            update(_items)
            .where(_items.c.id == bindparam("p_id"), _guard_clause(guard.shape()))
            .values(
                status=bindparam("p_status"),
                updated_at=bindparam("p_now"),
                **{k: bindparam(f"v_{k}") for k in values},
            )
        )
        _settle_statements[key] = stmt
    params = {"p_id": item_id, "p_status": str(status), "p_now": utcnow(), **guard.params()}
    params.update({f"v_{k}": v for k, v in values.items()})
    res = session.connection().execute(stmt, params)
    return cast("CursorResult[Any]", res).rowcount == 1


_events = cast("Table", Event.__table__)
_answer_statements: dict[tuple[Any, ...], Any] = {}


def _answer_statement(
    item_keys: tuple[str, ...], result_keys: tuple[str, ...] | None, pair: bool = False
) -> Any:
    """PostgreSQL: a paid answer in one statement (data-modifying WITHs). The item's final
    status where a worker's claim (or a lost ``unknown``) still holds it; the attempt closed in
    any case; the result (``result_keys``) and the ``item.finished`` event only where the item
    was settled. Returns the number of items settled (0 or 1) and, with ``pair``, how many
    other items of the batch share the item's pair key (in any status)."""
    c = _items.c
    settled = (
        update(_items)
        .where(c.id == bindparam("p_id"), _guard_clause((True, False, True)))
        .values(
            status=bindparam("p_status"),
            updated_at=bindparam("p_now"),
            **{k: bindparam(f"v_{k}") for k in item_keys},
        )
        .returning(c.id, c.batch_id)
        .cte("s")
    )
    closed = (
        update(_attempts)
        .where(_attempts.c.id == bindparam("a_id"))
        .values(
            outcome=bindparam("a_outcome"),
            code=bindparam("a_code"),
            msg=bindparam("a_msg"),
            http_status=bindparam("a_http_status"),
            elapsed_ms=bindparam("a_elapsed_ms"),
            ocrid=bindparam("a_ocrid"),
            finished_at=bindparam("p_now"),
        )
        .returning(_attempts.c.id)
        .cte("f")
    )
    e = _events.c
    event = (
        insert(_events)
        .from_select(
            [
                e.event_id,
                e.kind,
                e.item_id,
                e.batch_id,
                e.data,
                e.created_at,
                e.delivery_state,
                e.delivery_attempts,
                e.next_delivery_at,
            ],
            select(
                bindparam("e_id", type_=e.event_id.type),
                bindparam("e_kind", type_=e.kind.type),
                settled.c.id,
                settled.c.batch_id,
                bindparam("e_data", type_=e.data.type),
                bindparam("p_now", type_=e.created_at.type),
                bindparam("e_state", type_=e.delivery_state.type),
                literal_column("0"),
                bindparam("e_next", type_=e.next_delivery_at.type),
            ),
        )
        .returning(e.id)
        .cte("e")
    )
    columns: list[Any] = [func.count()]
    if pair:
        other = _items.alias("other")
        columns.append(
            select(func.count())
            .where(
                other.c.batch_id == bindparam("p_batch"),
                other.c.pair_key == bindparam("p_pair", type_=other.c.pair_key.type),
                other.c.id != bindparam("p_id"),
            )
            .scalar_subquery()
        )
    stmt = select(*columns).select_from(settled).add_cte(closed, event)
    if result_keys is not None:
        r = _results.c
        result = (
            insert(_results)
            .from_select(
                ["item_id", *result_keys],
                select(
                    settled.c.id,
                    *(bindparam(f"r_{k}", type_=r[k].type) for k in result_keys),
                ),
            )
            .returning(r.item_id)
            .cte("r")
        )
        stmt = stmt.add_cte(result)
    return stmt


def settle_answer(
    session: Session | Connection,
    *,
    item_id: int,
    worker: str,
    status: str,
    values: dict[str, Any],
    attempt: dict[str, Any],
    event: dict[str, Any],
    result: dict[str, Any] | None = None,
    pair: tuple[str, str] | None = None,
) -> tuple[bool, int | None]:
    """A paid answer in one statement (PostgreSQL; see :func:`_answer_statement`): whether the
    item was settled (False: it was no longer ``worker``'s; the attempt is closed all the same)
    and, given ``pair`` (batch, pair key), how many other items of the batch have that pair
    key, read in the statement's snapshot (None without ``pair``).
    ``attempt``: the attempt's id and outcome columns; ``event``: the event row's ``event_id``,
    ``kind``, ``data``, ``delivery_state``, ``next_delivery_at``; ``result``: the result's
    columns but ``item_id``."""
    now = utcnow()
    if result is not None:
        result = {
            **result,
            "id_number_index": active_ring().blind_index(result.get("id_number")),
            "created_at": now,
            "updated_at": now,
        }
        result.pop("item_id", None)
    item_keys = tuple(sorted(values))
    result_keys = None if result is None else tuple(sorted(result))
    key = (item_keys, result_keys, pair is not None)
    stmt = _answer_statements.get(key)
    if stmt is None:
        stmt = _answer_statements[key] = _answer_statement(item_keys, result_keys, pair is not None)
    params: dict[str, Any] = {
        "p_id": item_id,
        "p_status": str(status),
        "p_now": now,
        "g_worker": worker[:128],
        "a_id": attempt["id"],
        "e_id": event["event_id"],
        "e_kind": event["kind"],
        "e_data": event["data"],
        "e_state": event["delivery_state"],
        "e_next": event["next_delivery_at"],
    }
    params.update({f"v_{k}": v for k, v in values.items()})
    params.update({f"a_{k}": v for k, v in attempt.items() if k != "id"})
    if result is not None:
        params.update({f"r_{k}": v for k, v in result.items()})
    if pair is not None:
        params["p_batch"], params["p_pair"] = pair
    row = _conn(session).execute(stmt, params).one()
    return bool(row[0]), (int(row[1]) if pair is not None else None)


def open_attempts(session: Session, item_id: int) -> list[int]:
    """Attempts of the item with no outcome: calls a lost worker had under way."""
    return list(
        session.scalars(
            select(Attempt.id)
            .where(Attempt.item_id == item_id, Attempt.outcome.is_(None))
            .order_by(Attempt.id)
        )
    )


def close_attempts_unknown(session: Session, attempt_ids: Sequence[int]) -> None:
    if attempt_ids:
        session.execute(
            update(Attempt)
            .where(Attempt.id.in_(attempt_ids), Attempt.outcome.is_(None))
            .values(
                outcome="unknown",
                finished_at=utcnow(),
                msg="the worker was lost during this call; it may have been billed",
            )
            .execution_options(synchronize_session=False)
        )


def stale_claims(
    session: Session, stale_before: datetime, touched_before: datetime, limit: int
) -> list[int]:
    """Claims nobody has renewed since ``stale_before`` (their worker died), not re-sent since
    ``touched_before``."""
    return list(
        session.scalars(
            select(Item.id)
            .where(
                Item.status == ItemStatus.SUBMITTING,
                Item.claimed_at < stale_before,
                Item.updated_at < touched_before,
            )
            .order_by(Item.updated_at)
            .limit(limit)
        )
    )


def queued_untouched(session: Session, touched_before: datetime, limit: int) -> list[int]:
    """Queued items whose last message was sent before ``touched_before``."""
    return list(
        session.scalars(
            select(Item.id)
            .where(Item.status == ItemStatus.QUEUED, Item.updated_at < touched_before)
            .order_by(Item.updated_at)
            .limit(limit)
        )
    )


def touch(session: Session, item_ids: Sequence[int]) -> None:
    """Note that a message was sent for these items now."""
    if item_ids:
        session.execute(
            update(Item)
            .where(one_of(session, Item.id, item_ids))
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def requeue_failed(
    session: Session, batch_id: str, reasons: Sequence[str] = ("transient",)
) -> list[int]:
    """failed → queued for items that failed for one of ``reasons`` (by default: retries ran
    out on transient errors; an image the provider refused stays failed)."""
    ids = list(
        session.scalars(
            select(Item.id).where(
                Item.batch_id == batch_id,
                Item.status == ItemStatus.FAILED,
                Item.reason.in_(reasons),
                Item.purged_at.is_(None),  # its file name is gone: it cannot be read again
            )
        )
    )
    if ids:
        session.execute(
            update(Item)
            .where(Item.id.in_(ids))
            .values(status=ItemStatus.QUEUED, reason=None, code=None, msg=None, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return ids


def batch_via(session: Session, batch_id: str) -> str:
    return session.scalar(select(Batch.via).where(Batch.id == batch_id)) or "bytes"


def set_status(session: Session, item_id: int, status: str, **values: Any) -> None:
    session.execute(
        update(Item)
        .where(Item.id == item_id)
        .values(status=status, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )


_INSERT_ATTEMPT = (
    insert(_attempts)
    .values(
        item_id=bindparam("p_item"),
        number=bindparam("p_number"),
        provider=bindparam("p_provider"),
        started_at=bindparam("p_now"),
    )
    .returning(_attempts.c.id)
)
_COUNT_ATTEMPTS = (
    update(_items)
    .where(_items.c.id == bindparam("p_item"))
    .values(attempts=bindparam("p_number"), updated_at=bindparam("p_now"))
)


# PostgreSQL: both in one statement (a data-modifying WITH), one round trip instead of two.
_INSERT_ATTEMPT_PG = select(_INSERT_ATTEMPT.cte("a").c.id).add_cte(
    _COUNT_ATTEMPTS.returning(_items.c.id).cte("u")
)


def insert_attempt(session: Session, item_id: int, number: int, provider: str) -> int:
    """An attempt row before its call (Core: the hot path); the item counts ``number`` calls."""
    conn = session.connection()
    params = {"p_item": item_id, "p_number": number, "p_provider": provider, "p_now": utcnow()}
    if conn.dialect.name == "postgresql":
        return int(conn.execute(_INSERT_ATTEMPT_PG, params).scalar_one())
    attempt_id = conn.execute(_INSERT_ATTEMPT, params).scalar_one()
    conn.execute(_COUNT_ATTEMPTS, params)
    return int(attempt_id)


def drop_unsent_attempt(session: Session, attempt_id: int) -> None:
    """The attempt recorded for a call that was not made after all (the image was rejected,
    a duplicate, a pause): gone, and the item counts one call less."""
    item_id = session.scalar(
        delete(Attempt)
        .where(Attempt.id == attempt_id, Attempt.outcome.is_(None))
        .returning(Attempt.item_id)
    )
    if item_id is not None:
        session.execute(
            update(Item)
            .where(Item.id == item_id, Item.attempts > 0)
            .values(attempts=Item.attempts - 1)
            .execution_options(synchronize_session=False)
        )


def delete_attempt(session: Session, attempt_id: int) -> None:
    """An attempt that was never sent: it did not happen."""
    attempt = session.get(Attempt, attempt_id)
    if attempt is not None:
        session.delete(attempt)
        session.execute(
            update(Item)
            .where(Item.id == attempt.item_id, Item.attempts > 0)
            .values(attempts=Item.attempts - 1)
            .execution_options(synchronize_session=False)
        )


_FINISH_ATTEMPT = (
    update(_attempts)
    .where(_attempts.c.id == bindparam("p_id"))
    .values(
        outcome=bindparam("p_outcome"),
        code=bindparam("p_code"),
        msg=bindparam("p_msg"),
        http_status=bindparam("p_http_status"),
        elapsed_ms=bindparam("p_elapsed_ms"),
        ocrid=bindparam("p_ocrid"),
        finished_at=bindparam("p_now"),
    )
)


def finish_attempt(
    session: Session,
    attempt_id: int,
    *,
    outcome: str,
    code: str | None,
    msg: str | None,
    http_status: int | None,
    elapsed_ms: int,
    ocrid: str | None,
) -> None:
    session.connection().execute(
        _FINISH_ATTEMPT,
        {
            "p_id": attempt_id,
            "p_outcome": outcome,
            "p_code": code,
            "p_msg": msg,
            "p_http_status": http_status,
            "p_elapsed_ms": elapsed_ms,
            "p_ocrid": ocrid,
            "p_now": utcnow(),
        },
    )


def save_result(session: Session, values: dict[str, Any]) -> None:
    """The item's result (Core INSERT: an item is settled once, guarded by its claim). The
    personal fields are sealed by their column types; the ID number's blind index is added."""
    index = active_ring().blind_index(values.get("id_number"))
    session.connection().execute(insert(_results), {**values, "id_number_index": index})


_PAIR_FIELDS = (Result.date_of_birth, Result.id_number, Result.valid_from, Result.valid_to)


def _side_records(
    session: Session, batch_id: str, keys: Sequence[str | None]
) -> dict[str | None, list[SideRecord]]:
    rows = session.execute(
        select(Item.pair_key, Item.id, Item.source_key, Result.side, *_PAIR_FIELDS)
        .join(Result, Result.item_id == Item.id)
        .where(Item.batch_id == batch_id, one_of(session, Item.pair_key, keys))
    )
    groups: dict[str | None, list[SideRecord]] = {}
    for pair, item_id, key, side, *values in rows:
        fields = {c.key: v for c, v in zip(_PAIR_FIELDS, values, strict=True) if v is not None}
        groups.setdefault(pair, []).append(SideRecord(item_id, key, side, fields))
    return groups


def _store_pair_checks(session: Session, groups: Iterable[list[SideRecord]]) -> int:
    checks: dict[int, dict[str, Any]] = {}
    pairs = 0
    for group in groups:
        found = pair_checks(group)
        pairs += bool(found)
        checks.update(found)
    for result in session.scalars(select(Result).where(one_of(session, Result.item_id, checks))):
        if (result.checks or {}).get(PAIR_CHECK) != checks[result.item_id]:
            # a new dict: the JSON column notices assignment, not changes inside the old one
            result.checks = {**(result.checks or {}), PAIR_CHECK: checks[result.item_id]}
    return pairs


#: the recognised images of a batch sharing a pair key: what pairing counts, then reads
_RECOGNISED_SIDES = _items.join(_results, _results.c.item_id == _items.c.id)
_SAME_PAIR = (_items.c.batch_id == bindparam("p_batch"), _items.c.pair_key == bindparam("p_pair"))
_PAIR_GROUP = (
    select(
        _items.c.pair_key,
        _items.c.id,
        _items.c.source_key,
        _results.c.side,
        *(_results.c[c.key] for c in _PAIR_FIELDS),
    )
    .select_from(_RECOGNISED_SIDES)
    .where(*_SAME_PAIR)
)
_PAIR_COUNT = select(func.count()).select_from(_RECOGNISED_SIDES).where(*_SAME_PAIR)


def pair_count(session: Session, batch_id: str, pair_key: str) -> int:
    """How many recognised images of the batch share the name ``pair_key``: the look-up before
    :func:`pair_group_of`, which reads (and opens) their fields only when there are two."""
    return int(
        session.connection()
        .execute(_PAIR_COUNT, {"p_batch": batch_id, "p_pair": pair_key})
        .scalar_one()
    )


def pair_group_of(session: Session, batch_id: str, pair_key: str) -> list[SideRecord]:
    """The recognised images of the batch sharing the name ``pair_key`` (one prebuilt query:
    every successful image with a side word in its name asks it)."""
    rows = session.connection().execute(_PAIR_GROUP, {"p_batch": batch_id, "p_pair": pair_key})
    group = []
    for _, item_id, key, side, *values in rows:
        fields = {c.key: v for c, v in zip(_PAIR_FIELDS, values, strict=True) if v is not None}
        group.append(SideRecord(item_id, key, side, fields))
    return group


def store_pair_checks(session: Session, group: list[SideRecord]) -> bool:
    """Store the pair check in both results if ``group`` is one front and one back."""
    return _store_pair_checks(session, [group]) > 0


def pair_batch(session: Session, batch_id: str, chunk: int = 500) -> int:
    """Check every front/back pair of the batch (a worker may have died between its result and
    its pairing); returns the pairs checked. Items scanned before migration 0003 have no
    ``pair_key`` and are not paired."""
    pairs, last = 0, None
    while True:  # keyset pages: a backfill's batch holds millions of names
        q = (
            select(Item.pair_key)
            .join(Result, Result.item_id == Item.id)
            .where(Item.batch_id == batch_id, Item.pair_key.is_not(None))
            .group_by(Item.pair_key)
            .having(func.count() == 2)
            .order_by(Item.pair_key)
            .limit(chunk)
        )
        keys = list(session.scalars(q if last is None else q.where(Item.pair_key > last)))
        if not keys:
            return pairs
        pairs += _store_pair_checks(session, _side_records(session, batch_id, keys).values())
        last = keys[-1]


# -- pauses and balance --------------------------------------------------------------------------


def open_pause(session: Session, provider: str, account: str) -> Pause | None:
    return session.scalar(
        select(Pause)
        .where(Pause.provider == provider, Pause.account == account, Pause.resumed_at.is_(None))
        .order_by(Pause.paused_at.desc())
        .limit(1)
    )


def park_if_paused(
    session: Session, item_id: int, provider: str, account: str, **values: Any
) -> bool:
    """Set the item ``paused`` if a pause is open, holding a share lock on the pause row until
    the commit: a resume (which updates that row) waits for us, then finds the item parked."""
    pause_id = session.scalar(
        select(Pause.id)
        .where(Pause.provider == provider, Pause.account == account, Pause.resumed_at.is_(None))
        .limit(1)
        .with_for_update(read=True)
    )
    if pause_id is None:
        return False
    set_status(session, item_id, ItemStatus.PAUSED, **values)
    return True


def add_pause(session: Session, provider: str, account: str, kind: str, reason: str) -> Pause:
    existing = open_pause(session, provider, account)
    if existing is not None:
        return existing
    pause = Pause(provider=provider, account=account, kind=kind, reason=reason, paused_at=utcnow())
    session.add(pause)
    session.flush()
    return pause


def close_pauses(session: Session, provider: str, account: str, by: str) -> int:
    res = session.execute(
        update(Pause)
        .where(Pause.provider == provider, Pause.account == account, Pause.resumed_at.is_(None))
        .values(resumed_at=utcnow(), resumed_by=by)
        .execution_options(synchronize_session=False)
    )
    return cast("CursorResult[Any]", res).rowcount or 0


def unpause_items(session: Session, provider: str, limit: int | None = None) -> list[int]:
    """paused → queued for the provider's batches; returns the ids to enqueue again."""
    q = (
        select(Item.id)
        .join(Batch, Batch.id == Item.batch_id)
        .where(Item.status == ItemStatus.PAUSED, Batch.provider == provider)
        .order_by(Item.id)
    )
    if limit:
        q = q.limit(limit)
    ids = list(session.scalars(q))
    if ids:
        session.execute(
            update(Item)
            .where(Item.id.in_(ids), Item.status == ItemStatus.PAUSED)
            .values(status=ItemStatus.QUEUED, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return ids


def add_balance_reading(session: Session, provider: str, account: str, remaining: int) -> None:
    session.add(
        BalanceReading(provider=provider, account=account, remaining=remaining, taken_at=utcnow())
    )


def last_balance(session: Session, provider: str, account: str) -> BalanceReading | None:
    return session.scalar(
        select(BalanceReading)
        .where(BalanceReading.provider == provider, BalanceReading.account == account)
        .order_by(BalanceReading.taken_at.desc(), BalanceReading.id.desc())
        .limit(1)
    )


# -- reporting ---------------------------------------------------------------------------------


def status_counts(session: Session, batch_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Item.status, func.count()).where(Item.batch_id == batch_id).group_by(Item.status)
    )
    return {status: n for status, n in rows}


def code_counts(session: Session, batch_id: str) -> dict[tuple[str, str], int]:
    """(status, code-or-reason) → count, for the summary."""
    # a literal, not a bound parameter: PostgreSQL must see the same expression in GROUP BY
    label = func.coalesce(Item.code, Item.reason, literal_column("''"))
    rows = session.execute(
        select(Item.status, label, func.count())
        .where(Item.batch_id == batch_id)
        .group_by(Item.status, label)
    )
    return {(s, c): n for s, c, n in rows}


def pending_count(session: Session, batch_id: str) -> int:
    """Items of the batch not in a final state, counting duplicates whose original is not."""
    canon = aliased(Item)
    own = (
        session.scalar(
            select(func.count()).where(
                Item.batch_id == batch_id, Item.status.not_in(FINAL_STATUSES)
            )
        )
        or 0
    )
    via = (
        session.scalar(
            select(func.count())
            .select_from(Item)
            .join(canon, and_(canon.id == Item.duplicate_of))
            .where(
                Item.batch_id == batch_id,
                Item.status == ItemStatus.DUPLICATE,
                canon.status.not_in(FINAL_STATUSES),
            )
        )
        or 0
    )
    return own + via


def claimable_ids(
    session: Session,
    batch_id: str,
    stale_before: datetime | None = None,
    after_id: int = 0,
    limit: int = 1000,
) -> list[int]:
    """Items of the batch a message may be (re)sent for: queued, or stale claims."""
    return list(
        session.scalars(
            select(Item.id)
            .where(Item.batch_id == batch_id, _claimable(stale_before), Item.id > after_id)
            .order_by(Item.id)
            .limit(limit)
        )
    )
