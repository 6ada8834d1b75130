"""Names at rest on both backends: items' names are sealed (deterministic tokens) and every
look-up by name still works on the tokens; an item's message never keeps an ID number."""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy import select, text

from pipeline.storage import repo
from pipeline.storage.crypto import new_key_entry
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Item, ItemStatus

ID_A = "110101199003074514"
URI = "s3://scans/2026-11/"


def _raw(url: str, sql: str) -> list[Any]:
    with unit_of_work(url, read_only=True) as s:
        return list(s.execute(text(sql)))


def test_names_are_sealed_and_still_found(db_url: str) -> None:
    keys = [f"{ID_A}_正面.jpg", f"{ID_A}_反面.jpg", "张三.jpg"]
    with unit_of_work(db_url) as s:
        repo.get_or_create_batch(s, "b1", URI, "sandbox")
        rows = [repo.NewItem(k, URI + k, f"etag:{i}", etag=str(i)) for i, k in enumerate(keys)]
        added = {a.source_key: a.id for a in repo.add_items(s, "b1", rows, new_batch=True)}
    assert set(added) == set(keys)
    stored = _raw(db_url, "SELECT source_key, source_uri, pair_key FROM items ORDER BY id")
    flat = " ".join(str(v) for row in stored for v in row)
    assert ID_A not in flat and "张三" not in flat and "正面" not in flat
    assert all(row[0].startswith("det1:") for row in stored)
    # the two sides share one sealed pair name; the name without a side word has none
    assert stored[0][2] == stored[1][2] and stored[0][2].startswith("det1:") and stored[2][2] is None
    assert ID_A not in _raw(db_url, "SELECT source FROM batches")[0][0]

    with unit_of_work(db_url) as s:
        # a rescan finds every name already there and adds nothing
        assert repo.existing_keys(s, "b1", keys) == {(k, f"etag:{i}") for i, k in enumerate(keys)}
        assert repo.add_items(s, "b1", [repo.NewItem(keys[0], URI + keys[0], "etag:0", etag="0")]) == []
        for item_id in added.values():
            repo.set_status(s, item_id, ItemStatus.SUCCEEDED)
    with unit_of_work(db_url) as s:
        # the same object seen again in another batch is known by its (sealed) location
        judged = repo.judged_at_location(s, [(URI + keys[2], "2")])
        assert judged[(URI + keys[2], "2")].item_id == added[keys[2]]
        # a worker's claim reads the plain location back
        repo.set_status(s, added[keys[0]], ItemStatus.QUEUED)
        claimed = repo.claim_row(s, added[keys[0]], "w1")
    assert claimed is not None and claimed.source_uri == URI + keys[0]
    assert claimed.pair_key == ID_A


def test_an_items_message_never_keeps_an_id_number(db_url: str) -> None:
    with unit_of_work(db_url) as s:
        repo.get_or_create_batch(s, "b1", URI, "sandbox")
        (a, b) = repo.add_items(
            s, "b1",
            [repo.NewItem(f"{i}.jpg", f"{URI}{i}.jpg", f"etag:{i}", etag=str(i)) for i in (1, 2)],
        )
        repo.set_status(s, a.id, ItemStatus.REJECTED, msg=f"cannot read {URI}{ID_A}.jpg: NoSuchKey")
        repo.set_status(s, b.id, ItemStatus.SUBMITTING, claimed_by="w1")
    with unit_of_work(db_url) as s:  # the worker's own statement (prebuilt, bound parameters)
        assert repo.settle(
            s, b.id, ItemStatus.REJECTED, repo.held_by("w1"), reason="unreadable",
            msg=f"cannot read {URI}{ID_A}.jpg: AccessDenied",
        )
    msgs = [m for (m,) in _raw(db_url, "SELECT msg FROM items ORDER BY id")]
    assert len(msgs) == 2 and all(m and ID_A not in m and "cannot read" in m for m in msgs), msgs


def test_rescans_find_names_under_an_older_key_and_without_one(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new key put first (before `idocr keys rotate`), or a key added to a database written
    without one: a rescan still finds every name and adds nothing."""
    old = os.environ["IDOCR_DATA_KEYS"]
    monkeypatch.setenv("IDOCR_DATA_KEYS", "")  # the embedded database, without a key
    plain = [f"plain/{ID_A}.jpg"]
    with unit_of_work(db_url) as s:
        repo.get_or_create_batch(s, "b1", URI, "sandbox")
        repo.add_items(s, "b1", [repo.NewItem(plain[0], URI + plain[0], "etag:p", etag="p")])
    monkeypatch.setenv("IDOCR_DATA_KEYS", old)
    sealed = [f"old/{ID_A}.jpg"]
    with unit_of_work(db_url) as s:
        repo.add_items(s, "b1", [repo.NewItem(sealed[0], URI + sealed[0], "etag:o", etag="o")])
        for item_id in s.scalars(select(Item.id)):
            repo.set_status(s, item_id, ItemStatus.SUCCEEDED)
    monkeypatch.setenv("IDOCR_DATA_KEYS", f"{new_key_entry('next')},{old}")
    both = plain + sealed
    with unit_of_work(db_url) as s:
        assert repo.existing_keys(s, "b1", both) == {(plain[0], "etag:p"), (sealed[0], "etag:o")}
        rows = [repo.NewItem(k, URI + k, f"etag:{e}", etag=e) for k, e in zip(both, "po", strict=True)]
        assert repo.add_items(s, "b1", rows) == []
        judged = repo.judged_at_location(s, [(URI + k, e) for k, e in zip(both, "po", strict=True)])
        assert len(judged) == 2
