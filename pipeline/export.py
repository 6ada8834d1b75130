"""Export: the normalised result record of every item of a batch, streamed (JSONL or CSV).

A duplicate (the same bytes as another item) carries its original's status and fields, with
``duplicate_of`` naming the original's source: every file gets its answer, paid for once.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import IO, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from pipeline.storage.models import Batch, Item, ItemStatus, Result

FIELDS = (
    "source", "key", "sha256", "batch", "status", "reason", "provider", "code", "msg", "ocrid",
    "side", "name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number",
    "issue_authority", "valid_from", "valid_to", "quality", "checks", "attempts",
    "duplicate_of", "updated_at",
)
_RESULT_FIELDS = ("side", "name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number",
                  "issue_authority", "valid_from", "valid_to", "quality", "checks")


def records(session: Session, batch_id: str, chunk: int = 1000) -> Iterator[dict[str, Any]]:
    orig = aliased(Item)
    q = (
        select(Item, orig, Result, Batch.provider)
        .join(Batch, Batch.id == Item.batch_id)
        .outerjoin(orig, orig.id == Item.duplicate_of)
        # the result is the item's own, or its original's for a duplicate
        .outerjoin(Result, Result.item_id == func.coalesce(Item.duplicate_of, Item.id))
        .where(Item.batch_id == batch_id)
        .order_by(Item.id)
        .execution_options(yield_per=chunk)
    )
    for item, original, result, provider in session.execute(q):
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
            "updated_at": src.updated_at.isoformat() if src.updated_at else None,
        }
        for f in _RESULT_FIELDS:
            rec[f] = getattr(result, f) if result is not None else None
        yield {k: rec[k] for k in FIELDS}


def write_jsonl(rows: Iterator[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for rec in rows:
        out.write(json.dumps(rec, ensure_ascii=False, sort_keys=False))
        out.write("\n")
        n += 1
    return n


def write_csv(rows: Iterator[dict[str, Any]], out: IO[str]) -> int:
    w = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    n = 0
    for rec in rows:
        flat = dict(rec)
        flat["quality"] = "|".join(rec["quality"]) if rec["quality"] else ""
        flat["checks"] = json.dumps(rec["checks"], ensure_ascii=False) if rec["checks"] else ""
        w.writerow({k: ("" if v is None else v) for k, v in flat.items()})
        n += 1
    return n
