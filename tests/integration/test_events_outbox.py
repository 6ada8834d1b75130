"""The outbox's writer: one row per event, in the caller's transaction, with a stable id."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from pipeline.outputs.events import ITEM_FINISHED, QUEUE_PAUSED, Outbox, emit
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Event


def _item(url: str) -> int:
    with unit_of_work(url) as s:
        repo.get_or_create_batch(s, "b1", "/src", "local")
        added = repo.add_items(
            s, "b1", [repo.NewItem("a.jpg", "/src/a.jpg", "sha256:aa", sha256="aa")]
        )
    return added[0].id


def test_emit_reads_the_batch_of_the_item_in_the_same_statement(db_url: str) -> None:
    item_id = _item(db_url)
    with unit_of_work(db_url) as s:
        eid = Outbox(webhook=True).item_finished(s, item_id, "succeeded", code="2", ocrid="o1")
    uuid.UUID(eid)
    with unit_of_work(db_url, read_only=True) as s:
        ev = s.scalars(select(Event)).one()
    assert ev.event_id == eid and ev.kind == ITEM_FINISHED
    assert ev.item_id == item_id and ev.batch_id == "b1"
    assert ev.data == {"status": "succeeded", "reason": None, "code": "2", "ocrid": "o1"}
    assert ev.delivery_state == "pending" and ev.next_delivery_at is not None
    assert ev.published_at is None


def test_emit_is_part_of_the_callers_transaction(db_url: str) -> None:
    with pytest.raises(RuntimeError), unit_of_work(db_url) as s:
        emit(s, QUEUE_PAUSED, data={"provider": "p"})
        raise RuntimeError("rolled back")
    with unit_of_work(db_url) as s:
        eid = emit(s, QUEUE_PAUSED, data={"provider": "p"})
    with unit_of_work(db_url, read_only=True) as s:
        rows = s.scalars(select(Event)).all()
    assert [(e.event_id, e.delivery_state, e.batch_id) for e in rows] == [(eid, "none", None)]


def test_unknown_kind_refused(db_url: str) -> None:
    with pytest.raises(ValueError), unit_of_work(db_url) as s:
        emit(s, "item.exploded")
