"""Key rotation and look-ups by ID number over the sealed columns of the schema.

**Rotation** (``idocr keys rotate``). After a new key is put first in ``IDOCR_DATA_KEYS`` (and
the workers restarted with it), every stored value not sealed under it is re-sealed: each sealed
column of the schema (found from the models: :mod:`pipeline.storage.sealed`,
:mod:`pipeline.storage.names`), values written without a key included, and the blind index of
``results``. Rows are found in SQL by their token prefix, never by decrypting the table, and
re-sealed in small transactions (``batch_size`` rows each), in primary-key order.

It is safe while workers write: on PostgreSQL a batch locks its rows (``FOR UPDATE SKIP
LOCKED``: a row a worker holds is skipped and picked up by a later pass), on SQLite the batch
holds the write lock; either way a value is read and rewritten with no other writer in between,
so a concurrent update is never overwritten with stale data. It can be stopped and run again:
what is already under the current key is not selected again. Passes repeat until nothing is
left, or until what is left stops shrinking (workers still writing under an older key).

**Find** (``idocr find --id-number``): the ID number's blind index under every key of the ring
(a look-up during a rotation finds rows of either key); nothing is decrypted to search.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Column, Table, Text, and_, cast, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from pipeline.storage.crypto import (
    AEAD_PREFIX,
    FIXED_PREFIX,
    CryptoError,
    KeyRing,
    UnknownKeyError,
    active_ring,
    is_token,
)
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Base, Item, Result

log = logging.getLogger(__name__)

#: the blind index column and the column it is computed from
INDEXES = {"results": ("id_number_index", "id_number")}


@dataclass(frozen=True)
class SealedColumn:
    table: Table
    column: Column[Any]
    context: str
    #: aead (``seal``), fixed (``seal_fixed``) or json (``seal_json``)
    kind: str

    @property
    def label(self) -> str:
        return f"{self.table.name}.{self.column.name}"


def sealed_columns() -> list[SealedColumn]:
    """Every column of the schema whose type seals its values."""
    found = []
    for table in Base.metadata.sorted_tables:
        for col in table.columns:
            context = getattr(col.type, "context", None)
            if not isinstance(context, str):
                continue
            kind = getattr(col.type, "kind", None)
            if kind is None:
                kind = "json" if isinstance(getattr(col.type, "impl", None), JSON) else "aead"
            found.append(SealedColumn(table, col, context, kind))
    return found


def _current_prefix(sc: SealedColumn, kid: str) -> str:
    prefix = (FIXED_PREFIX if sc.kind == "fixed" else AEAD_PREFIX) + kid + ":"
    return '"' + prefix if sc.kind == "json" else prefix


#: a row whose personal data retention removed keeps placeholders written in clear on purpose
PURGED_COLUMN = "purged_at"


def _stale(sc: SealedColumn, kid: str) -> Any:
    """SQL: the column holds a value not sealed under ``kid`` (a value written without a key
    included, except a purged row's placeholders; JSON null excluded)."""
    text = cast(sc.column, Text)
    prefix = _current_prefix(sc, kid)
    cond = and_(sc.column.is_not(None), func.substr(text, 1, len(prefix)) != prefix)
    if sc.kind == "json":
        cond = and_(cond, text != "null")
    if PURGED_COLUMN in sc.table.c:
        token_start = func.substr(text, 1, len(prefix) - len(kid) - 1)
        cond = and_(
            cond,
            or_(
                sc.table.c[PURGED_COLUMN].is_(None),
                token_start.in_([AEAD_PREFIX, FIXED_PREFIX, '"' + AEAD_PREFIX]),
            ),
        )
    return cond


def _index_stale(table: Table, kid: str) -> Any | None:
    if table.name not in INDEXES:
        return None
    index_col, source_col = (table.c[n] for n in INDEXES[table.name])
    prefix = kid + ":"
    return and_(
        source_col.is_not(None),
        or_(index_col.is_(None), func.substr(index_col, 1, len(prefix)) != prefix),
    )


@dataclass
class RotationReport:
    kid: str
    #: values re-sealed, by "table.column" (blind indexes under "table.<index column>")
    resealed: dict[str, int] = field(default_factory=dict)
    #: rows left as they were: a unique name already taken under the new key, or a value that
    #: did not authenticate (by "table.column")
    skipped: dict[str, int] = field(default_factory=dict)
    #: values still not under the current key when the passes ended
    remaining: int = 0
    passes: int = 0

    @property
    def total(self) -> int:
        return sum(self.resealed.values())

    def add(self, counts: dict[str, int], into: dict[str, int]) -> None:
        for k, v in counts.items():
            into[k] = into.get(k, 0) + v


def _open_stored(sc: SealedColumn, ring: KeyRing, raw_text: str) -> Any:
    """The plain value of what the database holds, read as text."""
    if sc.kind == "json":
        return ring.open_json(json.loads(raw_text), sc.context)
    return ring.open(raw_text, sc.context)


class _Unreadable(Exception):
    def __init__(self, label: str) -> None:
        self.label = label


def _reseal_rows(
    s: Session, ring: KeyRing, table: Table, cols: list[SealedColumn], rows: list[Any]
) -> dict[str, int]:
    kid = ring.current_kid
    assert kid is not None
    pk = table.primary_key.columns.values()[0]
    index = INDEXES.get(table.name)
    counts: dict[str, int] = {}
    for row in rows:
        values: dict[str, Any] = {}
        plain: dict[str, Any] = {}
        purged = row._mapping.get(PURGED_COLUMN) is not None
        for sc in cols:
            raw = row._mapping[sc.column.name]
            if raw is None:
                continue
            stale = not raw.startswith(_current_prefix(sc, kid)) and not (
                sc.kind == "json" and raw == "null"
            )
            if stale and purged and not is_token(json.loads(raw) if sc.kind == "json" else raw):
                stale = False
            needed = stale or (index is not None and sc.column.name == index[1])
            if not needed:
                continue
            try:
                value = _open_stored(sc, ring, raw)
            except UnknownKeyError:
                raise
            except CryptoError:
                raise _Unreadable(sc.label) from None
            plain[sc.column.name] = value
            if stale:
                values[sc.column.name] = value  # the column type seals it under the current key
                counts[sc.label] = counts.get(sc.label, 0) + 1
        if index is not None:
            index_col, source_col = index
            current = row._mapping[index_col]
            source = plain.get(source_col)
            wanted = ring.blind_index(source) if source is not None else None
            if source is not None and current != wanted:
                values[index_col] = wanted
                label = f"{table.name}.{index_col}"
                counts[label] = counts.get(label, 0) + 1
        if values:
            if "updated_at" in table.c:  # re-sealing is not a change of the record
                values["updated_at"] = table.c.updated_at
            s.execute(update(table).where(pk == row._mapping["_pk"]).values(**values))
    return counts


def _rotate_pass(
    url: str,
    ring: KeyRing,
    table: Table,
    cols: list[SealedColumn],
    batch_size: int,
    report: RotationReport,
    on_batch: Callable[[RotationReport], None] | None,
) -> int:
    """One pass over ``table`` in primary-key order; returns the values re-sealed."""
    kid = ring.current_kid
    assert kid is not None
    pk = table.primary_key.columns.values()[0]
    conds = [_stale(sc, kid) for sc in cols]
    index_cond = _index_stale(table, kid)
    if index_cond is not None:
        conds.append(index_cond)
    extra = [table.c[INDEXES[table.name][0]]] if table.name in INDEXES else []
    if PURGED_COLUMN in table.c:
        extra.append(table.c[PURGED_COLUMN])
    done = 0
    last: Any = None
    while True:
        q = (
            select(
                pk.label("_pk"),
                *[cast(sc.column, Text).label(sc.column.name) for sc in cols],
                *extra,
            )
            .where(or_(*conds))
            .order_by(pk)
            .limit(batch_size)
        )
        if last is not None:
            q = q.where(pk > last)
        with unit_of_work(url) as s:
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True, of=table)
            rows = list(s.execute(q))
            if not rows:
                return done
            last = rows[-1]._mapping["_pk"]
            try:
                with s.begin_nested():
                    counts = _reseal_rows(s, ring, table, cols, rows)
            except (IntegrityError, _Unreadable):
                counts = {}
                for row in rows:  # one at a time, leaving the rows that cannot be re-sealed
                    try:
                        with s.begin_nested():
                            counts_row = _reseal_rows(s, ring, table, cols, [row])
                        report.add(counts_row, counts)
                    except IntegrityError:
                        label = f"{table.name}.{cols[0].column.name}"
                        report.skipped[label] = report.skipped.get(label, 0) + 1
                    except _Unreadable as exc:
                        report.skipped[exc.label] = report.skipped.get(exc.label, 0) + 1
        report.add(counts, report.resealed)
        done += sum(counts.values())
        if on_batch is not None:
            on_batch(report)


def count_stale(url: str, ring: KeyRing) -> dict[str, int]:
    """Values (and blind indexes) not under the current key, by "table.column"."""
    kid = ring.current_kid
    assert kid is not None
    out: dict[str, int] = {}
    with unit_of_work(url, read_only=True) as s:
        for table, cols in _by_table().items():
            for sc in cols:
                n = s.scalar(select(func.count()).select_from(table).where(_stale(sc, kid))) or 0
                if n:
                    out[sc.label] = n
            index_cond = _index_stale(table, kid)
            if index_cond is not None:
                n = s.scalar(select(func.count()).select_from(table).where(index_cond)) or 0
                if n:
                    out[f"{table.name}.{INDEXES[table.name][0]}"] = n
    return out


def _by_table() -> dict[Table, list[SealedColumn]]:
    tables: dict[Table, list[SealedColumn]] = {}
    for sc in sealed_columns():
        if len(sc.table.primary_key.columns) == 1:
            tables.setdefault(sc.table, []).append(sc)
    return tables


def rotate(
    url: str,
    *,
    batch_size: int = 500,
    max_passes: int = 20,
    settle: float = 0.5,
    on_batch: Callable[[RotationReport], None] | None = None,
) -> RotationReport:
    """Re-seal every value of the database not under the current key of the process's ring."""
    ring = active_ring()
    if not ring.enabled or ring.current_kid is None:
        raise CryptoError("IDOCR_DATA_KEYS is not set: there is no key to rotate to")
    report = RotationReport(ring.current_kid)
    tables = _by_table()
    previous: int | None = None
    stuck = 0
    while report.passes < max_passes:
        report.passes += 1
        for table, cols in tables.items():
            _rotate_pass(url, ring, table, cols, batch_size, report, on_batch)
        skipped = sum(report.skipped.values())
        report.remaining = max(0, sum(count_stale(url, ring).values()) - skipped)
        if report.remaining == 0:
            break
        # rows a worker held (skipped by the locks) or rows still being written under an older
        # key: look again after a moment, until what is left stops shrinking
        if previous is not None and report.remaining >= previous:
            stuck += 1
            if stuck >= 3:
                break
        previous = report.remaining
        time.sleep(settle)
    return report


# -- look-ups ------------------------------------------------------------------------------------


@dataclass
class Found:
    item: Item
    result: Result
    #: items with the same bytes, answered by this one's result
    duplicates: list[Item]


def find_by_id_number(s: Session, id_number: str, limit: int = 1000) -> list[Found]:
    """The recognised cards whose ID number is ``id_number`` (blind index under every key)."""
    ring = active_ring()
    indexes = ring.blind_indexes(id_number)
    if not indexes:
        raise CryptoError(
            "IDOCR_DATA_KEYS is not set: look-ups by ID number use the blind index, which is "
            "only kept with a key"
        )
    rows = s.execute(
        select(Item, Result)
        .join(Result, Result.item_id == Item.id)
        .where(Result.id_number_index.in_(indexes))
        .order_by(Item.id)
        .limit(limit)
    ).all()
    found = [Found(item, result, []) for item, result in rows]
    if found:
        dup = aliased(Item)
        by_id = {f.item.id: f for f in found}
        for d in s.scalars(
            select(dup).where(dup.duplicate_of.in_(list(by_id))).order_by(dup.id).limit(limit)
        ):
            if d.duplicate_of is not None:
                by_id[d.duplicate_of].duplicates.append(d)
    return found
