"""Export: the normalised result record of every item of a batch, streamed (JSONL or CSV).

A duplicate (the same bytes as another item) carries its original's status and fields, with
``duplicate_of`` naming the original's source: every file gets its answer, paid for once.

A record whose personal data retention purged (``pipeline.workflows.retention``) is exported
with the status ``purged`` and ``purged_at``: the recognised fields and checks are left out (in
CSV, their cells are empty), and so are its source and key when its own names were purged.
A duplicate of a purged original is purged the same way: its answer is gone.

Times are UTC in ISO 8601 with the offset (``2026-11-21T08:00:00.000000+00:00``) on both
backends: SQLite hands timestamps back without a zone, PostgreSQL in the session's zone.

Two CSV flavours. The plain one is RFC 4180 UTF-8 for programs. The Excel one (``excel=True``)
is for people who double-click the file: a UTF-8 byte-order mark, without which Excel reads the
file in the local ANSI code page and the Chinese fields turn into mojibake; and every value
Excel would take for a number written as the formula ``="…"``. Excel keeps only 15 significant
digits, so an 18-digit ID number opened as a number becomes ``1.10105E+17`` and its last three
digits are lost for good; a leading apostrophe is shown literally when a CSV is opened, and a
leading tab keeps the text but stays inside the cell (it travels into every copy, lookup and
re-export); ``="…"`` is evaluated on opening to exactly the text between the quotes. Recognised
text that starts like a formula (``=``, ``+``, ``-``, ``@``) is neutralised with a leading
apostrophe so a crafted card cannot put a live formula into the sheet.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Generator, Iterable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from types import SimpleNamespace
from typing import IO, Any

from sqlalchemy import BigInteger, any_, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from pipeline.storage.models import Batch, Item, ItemStatus, Result

FIELDS = (
    "source",
    "key",
    "sha256",
    "batch",
    "status",
    "reason",
    "provider",
    "code",
    "msg",
    "ocrid",
    "side",
    "name",
    "gender",
    "ethnicity",
    "date_of_birth",
    "domicile",
    "id_number",
    "issue_authority",
    "valid_from",
    "valid_to",
    "quality",
    "checks",
    "attempts",
    "duplicate_of",
    "updated_at",
    "purged_at",
)
#: what a card says of its holder and of itself: the result's recognised, personal fields
CARD_FIELDS = (
    "name",
    "gender",
    "ethnicity",
    "date_of_birth",
    "domicile",
    "id_number",
    "issue_authority",
    "valid_from",
    "valid_to",
)
#: what a purged record leaves out (pipeline.workflows.retention): the person, and the names
PURGED_FIELDS = frozenset({*CARD_FIELDS, "checks"})
#: the status a purged record is exported with (the item keeps its own in the database)
PURGED = "purged"
_RESULT_FIELDS = ("side", *CARD_FIELDS, "quality", "checks")


def utc_iso(value: datetime | None) -> str | None:
    """``value`` in UTC, ISO 8601 with the offset and microseconds, whatever the backend gave:
    a naive datetime (SQLite) is UTC already (every timestamp is written as UTC)."""
    if value is None:
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.isoformat(timespec="microseconds")


#: the item columns a record is made of (its own, or its original's for a duplicate)
_ITEM_COLUMNS = (
    "source_uri",
    "source_key",
    "sha256",
    "batch_id",
    "status",
    "reason",
    "code",
    "msg",
    "ocrid",
    "attempts",
    "updated_at",
    "purged_at",
)


def _record_query() -> Any:
    """Plain columns, not ORM entities (a record is read and dropped: no identity map, no
    instance state); the sealed ones are opened by their column types all the same. The
    provider's raw answer is not part of the record: never read (nor opened)."""
    items, batches, results = Item.__table__, Batch.__table__, Result.__table__
    orig = items.alias("orig")
    return (
        select(
            *(items.c[k].label(f"i_{k}") for k in _ITEM_COLUMNS),
            orig.c.id.label("o_id"),
            *(orig.c[k].label(f"o_{k}") for k in _ITEM_COLUMNS),
            results.c.item_id.label("r_item_id"),
            results.c.provider.label("r_provider"),
            *(results.c[k].label(f"r_{k}") for k in _RESULT_FIELDS),
            batches.c.provider.label("b_provider"),
        )
        .select_from(items)
        .join(batches, batches.c.id == items.c.batch_id)
        .outerjoin(orig, orig.c.id == items.c.duplicate_of)
        # the result is the item's own, or its original's for a duplicate
        .outerjoin(results, results.c.item_id == func.coalesce(items.c.duplicate_of, items.c.id))
    )


def _record_of_row(row: Any) -> dict[str, Any]:
    m = row._mapping
    item = SimpleNamespace(**{k: m[f"i_{k}"] for k in _ITEM_COLUMNS})
    original = (
        SimpleNamespace(**{k: m[f"o_{k}"] for k in _ITEM_COLUMNS})
        if m["o_id"] is not None
        else None
    )
    result = (
        SimpleNamespace(provider=m["r_provider"], **{k: m[f"r_{k}"] for k in _RESULT_FIELDS})
        if m["r_item_id"] is not None
        else None
    )
    return _record(item, original, result, m["b_provider"])  # type: ignore[arg-type]


def _record(
    item: Item, original: Item | None, result: Result | None, provider: str
) -> dict[str, Any]:
    src = original if item.status == ItemStatus.DUPLICATE and original is not None else item
    rec: dict[str, Any] = {
        "source": item.source_uri,
        "key": item.source_key,
        "sha256": item.sha256,
        "batch": item.batch_id,
        "status": src.status,
        "reason": src.reason,
        "provider": result.provider if result is not None else provider,
        "code": src.code,
        "msg": src.msg,
        "ocrid": src.ocrid,
        "attempts": item.attempts,
        "duplicate_of": original.source_uri if original is not None else None,
        "updated_at": utc_iso(src.updated_at),
    }
    for f in _RESULT_FIELDS:
        rec[f] = getattr(result, f) if result is not None else None
    # Retention removed the personal data of the item, or of the original whose answer a
    # duplicate shares: the record says so instead of passing for an empty answer.
    purged_at = item.purged_at or (src.purged_at if src is not item else None)
    rec["purged_at"] = utc_iso(purged_at)
    if purged_at is None:
        return {k: rec[k] for k in FIELDS}
    rec["status"] = PURGED
    if item.purged_at is not None:
        rec["source"] = rec["key"] = None
    if original is not None and original.purged_at is not None:
        rec["duplicate_of"] = None
    return {k: rec[k] for k in FIELDS if k not in PURGED_FIELDS}


def records(
    session: Session, batch_id: str, chunk: int = 1000
) -> Generator[dict[str, Any], None, None]:
    items = Item.__table__
    q = (
        _record_query()
        .where(items.c.batch_id == batch_id)
        .order_by(items.c.id)
        .execution_options(yield_per=chunk)
    )
    for row in session.execute(q):
        yield _record_of_row(row)


def records_of_items(session: Session, item_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The export's record of each of these items (any batches), by item id: what an
    ``item.finished`` event carries."""
    ids = sorted(set(item_ids))
    if not ids:
        return {}
    query = _records_of_items_query(session.get_bind().dialect.name == "postgresql")
    rows = session.execute(query, {"item_ids": ids})
    return {row.i_id: _record_of_row(row) for row in rows}


@lru_cache(maxsize=2)
def _records_of_items_query(array: bool) -> Any:
    # built once: the relay asks for a few records many times a second. On PostgreSQL the ids
    # are one array parameter, not a list rendered into the statement at every call.
    items = Item.__table__
    which = (
        items.c.id == any_(bindparam("item_ids", type_=ARRAY(BigInteger)))
        if array
        else items.c.id.in_(bindparam("item_ids", expanding=True))
    )
    return _record_query().add_columns(items.c.id.label("i_id")).where(which)


def write_jsonl(rows: Iterator[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for rec in rows:
        out.write(json.dumps(rec, ensure_ascii=False, sort_keys=False))
        out.write("\n")
        n += 1
    return n


#: columns that are identifiers, never quantities: always text in the Excel flavour
EXCEL_TEXT_COLUMNS = frozenset({"id_number", "sha256", "ocrid", "code"})
# What Excel's CSV reader would turn into a number: digits with separators, a sign, a decimal
# point, an exponent (a hex digest such as "12e45" reads as 1.2E+46), a percent sign.
_NUMBER_LIKE = re.compile(r"\s*[+-]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?%?\s*")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# Excel refuses a string constant longer than this inside a formula.
_EXCEL_CONSTANT_MAX = 255


def _mangled_as_number(value: str) -> bool:
    """Excel would read ``value`` as a number and show it differently: leading zeros dropped,
    digits beyond the 15th zeroed, an exponent or thousands separators interpreted. Plain small
    numbers (attempts) stay numbers."""
    if not _NUMBER_LIKE.fullmatch(value):
        return False
    digits = sum(c.isdigit() for c in value)
    v = value.strip().lstrip("+-")
    return (
        digits > 15
        or (len(v) > 1 and v[0] == "0" and v[1].isdigit())
        or any(c in v for c in "eE,%")
    )


def excel_cell(column: str, value: str) -> str:
    """``value`` as Excel should show it (see the module docstring)."""
    if not value:
        return value
    if column in EXCEL_TEXT_COLUMNS or _mangled_as_number(value):
        if len(value) <= _EXCEL_CONSTANT_MAX:
            return '="' + value.replace('"', '""') + '"'
    if value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(rows: Iterator[dict[str, Any]], out: IO[str], *, excel: bool = False) -> int:
    """Write the records as CSV; ``excel``: the flavour Excel opens right (module docstring)."""
    if excel:
        out.write("\ufeff")
    w = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    n = 0
    for rec in rows:
        flat = dict(rec)
        flat["quality"] = "|".join(rec["quality"]) if rec.get("quality") else ""
        flat["checks"] = json.dumps(rec["checks"], ensure_ascii=False) if rec.get("checks") else ""
        row = {k: ("" if v is None else str(v)) for k, v in flat.items()}
        if excel:
            row = {k: excel_cell(k, v) for k, v in row.items()}
        w.writerow(row)
        n += 1
    return n
