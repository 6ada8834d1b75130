"""Sealed columns and key rotation on real databases (SQLite and PostgreSQL): what is stored is
sealed, readers get plain values, `rotate` moves every value and blind index to the new key in
small transactions, leaves purged placeholders alone, does not touch updated_at, and loses no
update made while it runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Text, cast, select, text, update

from pipeline.coordination.journal import AnswerJournal, Entry
from pipeline.providers.base import Outcome, ProviderResult
from pipeline.storage import repo
from pipeline.storage.crypto import KeyRing, UnknownKeyError, new_key_entry
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Batch, Item, Result
from pipeline.workflows.keys import count_stale, find_by_id_number, rotate, sealed_columns

FIELDS = {
    "name": "司马相如",
    "gender": "男",
    "ethnicity": "汉",
    "date_of_birth": "1990-03-07",
    "domicile": "四川省成都市锦江区春熙路1号",
    "id_number": "51010419900307123X",
}


def add_items(url: str, n: int, batch: str = "b") -> list[int]:
    with unit_of_work(url) as s:
        if s.get(Batch, batch) is None:
            s.add(Batch(id=batch, source="/scans/张三", provider="sandbox"))
            s.flush()
        items = [
            Item(batch_id=batch, source_key=f"{i} 正面.jpg", source_uri=f"/scans/{i} 正面.jpg",
                 fingerprint=f"sha256:{batch}{i}", status="succeeded")
            for i in range(n)
        ]
        s.add_all(items)
        s.flush()
        ids = [it.id for it in items]
        for n_, item_id in enumerate(ids):
            fields = {**FIELDS, "id_number": FIELDS["id_number"][:-4] + f"{n_:04d}"}
            repo.save_result(s, {
                "item_id": item_id, "provider": "sandbox", "side": "front", **fields,
                "quality": ["ok"], "checks": {"id_number": {"ok": True}, "with": f"{n_} 背面.jpg"},
                "raw": {"data": fields},
            })
    return ids


def stored(url: str, column: str) -> list[str]:
    with unit_of_work(url, read_only=True) as s:
        return [v for v in s.scalars(text(f"SELECT CAST({column} AS TEXT) FROM results ORDER BY item_id"))]


def test_results_are_sealed_at_rest_and_read_in_clear(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = new_key_entry("a")
    monkeypatch.setenv("IDOCR_DATA_KEYS", a)
    (item_id,) = add_items(db_url, 1)
    for col in ("name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number"):
        (v,) = stored(db_url, col)
        assert v.startswith("enc1:a:") and FIELDS[col] not in v, col
    for col in ("raw", "checks"):
        (v,) = stored(db_url, col)
        assert v.startswith('"enc1:a:') and "司马" not in v and "背面" not in v
    (idx,) = stored(db_url, "id_number_index")
    assert idx.startswith("a:") and "5101" not in idx
    with unit_of_work(db_url, read_only=True) as s:
        r = s.get(Result, item_id)
        assert r is not None
        assert {k: getattr(r, k) for k in FIELDS} == {**FIELDS, "id_number": FIELDS["id_number"][:-4] + "0000"}
        assert r.checks == {"id_number": {"ok": True}, "with": "0 背面.jpg"}
        assert r.raw["data"]["name"] == FIELDS["name"]
        # find by the number, in another spelling
        (found,) = find_by_id_number(s, FIELDS["id_number"][:-4].lower() + "0000 ")
        assert found.item.id == item_id
        assert find_by_id_number(s, "110101199001010011") == []
    # another key cannot read them, and says which key it lacks
    monkeypatch.setenv("IDOCR_DATA_KEYS", new_key_entry("b"))
    with pytest.raises(UnknownKeyError, match="'a'"), unit_of_work(db_url, read_only=True) as s:
        s.get(Result, item_id)


def test_every_personal_column_is_sealed() -> None:
    labels = {sc.label for sc in sealed_columns()}
    for f in ("name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number",
              "issue_authority", "valid_from", "valid_to", "checks", "raw"):
        assert f"results.{f}" in labels


def test_rotation_moves_everything_to_the_new_key(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = new_key_entry("a"), new_key_entry("b")
    # rows written before there was a key, then rows under key a
    monkeypatch.setenv("IDOCR_DATA_KEYS", "")
    legacy = add_items(db_url, 3, batch="legacy")
    assert stored(db_url, "name")[0] == FIELDS["name"]
    monkeypatch.setenv("IDOCR_DATA_KEYS", a)
    sealed = add_items(db_url, 4, batch="sealed")
    with unit_of_work(db_url, read_only=True) as s:
        before = {r.item_id: r.updated_at for r in s.scalars(select(Result))}

    monkeypatch.setenv("IDOCR_DATA_KEYS", f"{b},{a}")
    ring = KeyRing.parse(f"{b},{a}")
    assert count_stale(db_url, ring)["results.name"] == 7
    batches: list[int] = []
    report = rotate(db_url, batch_size=2, on_batch=lambda r: batches.append(r.total))
    assert report.remaining == 0 and report.skipped == {}
    assert report.resealed["results.name"] == 7
    assert report.resealed["results.raw"] == 7
    assert report.resealed["results.id_number_index"] == 7
    assert len(batches) >= 4  # small transactions, not one
    assert count_stale(db_url, ring) == {}
    assert all(v.startswith("enc1:b:") for v in stored(db_url, "name"))
    assert all(v.startswith("b:") for v in stored(db_url, "id_number_index"))

    # with key b alone everything opens, fields intact, look-ups work, updated_at kept
    monkeypatch.setenv("IDOCR_DATA_KEYS", b)
    with unit_of_work(db_url, read_only=True) as s:
        rows = {r.item_id: r for r in s.scalars(select(Result))}
        assert {r.name for r in rows.values()} == {FIELDS["name"]}
        assert {r.raw["data"]["domicile"] for r in rows.values()} == {FIELDS["domicile"]}
        assert {i: r.updated_at for i, r in rows.items()} == before
        found = find_by_id_number(s, FIELDS["id_number"][:-4] + "0002")
        assert sorted(f.item.id for f in found) == sorted([legacy[2], sealed[2]])
        keys = {it.source_key for it in s.scalars(select(Item))}
        assert "0 正面.jpg" in keys
    # a second run finds nothing to do
    again = rotate(db_url, batch_size=2)
    assert again.total == 0 and again.remaining == 0


def test_rotation_loses_no_concurrent_update(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stores a pair check in a result the rotation has just read: the worker's update
    must survive the rotation's write of that row."""
    from pipeline.workflows import keys

    a, b = new_key_entry("a"), new_key_entry("b")
    monkeypatch.setenv("IDOCR_DATA_KEYS", a)
    ids = add_items(pg_url, 12)
    monkeypatch.setenv("IDOCR_DATA_KEYS", f"{b},{a}")
    real = keys._reseal_rows
    writers: list[threading.Thread] = []

    def store_pair(item_id: int) -> None:
        with unit_of_work(pg_url) as s:
            r = s.get(Result, item_id)
            assert r is not None
            r.checks = {**(r.checks or {}), "pair": {"item": item_id}}

    def racing(s, ring, table, cols, rows):  # type: ignore[no-untyped-def]
        if table.name == "results":
            t = threading.Thread(target=store_pair, args=(rows[0]._mapping["_pk"],))
            t.start()
            writers.append(t)
            t.join(0.3)  # done at once unless the row is locked against it
        return real(s, ring, table, cols, rows)

    monkeypatch.setattr(keys, "_reseal_rows", racing)
    report = rotate(pg_url, batch_size=2, settle=0.05)
    for t in writers:
        t.join()
    assert report.total > 0 and len(writers) == len(ids) // 2
    monkeypatch.setattr(keys, "_reseal_rows", real)
    rotate(pg_url, batch_size=50)
    monkeypatch.setenv("IDOCR_DATA_KEYS", b)
    raced = set(ids[::2])
    with unit_of_work(pg_url, read_only=True) as s:
        lost = []
        for item_id in ids:
            r = s.get(Result, item_id)
            assert r is not None and r.name == FIELDS["name"]
            assert r.checks is not None and r.checks["id_number"] == {"ok": True}
            if item_id in raced and r.checks.get("pair") != {"item": item_id}:
                lost.append(item_id)
        assert lost == []
        assert s.scalar(
            select(cast(Result.name, Text)).where(cast(Result.name, Text).not_like("enc1:b:%")).limit(1)
        ) is None


def test_purged_placeholders_stay_as_they_are(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = new_key_entry("a"), new_key_entry("b")
    monkeypatch.setenv("IDOCR_DATA_KEYS", a)
    ids = add_items(db_url, 2)
    if "purged_at" not in Item.__table__.c:
        pytest.skip("no retention columns in this schema")
    with unit_of_work(db_url) as s:
        s.execute(text("UPDATE items SET source_key = 'purged:' || id, purged_at = CURRENT_TIMESTAMP WHERE id = :i"),
                  {"i": ids[0]})
    monkeypatch.setenv("IDOCR_DATA_KEYS", f"{b},{a}")
    rotate(db_url, batch_size=5)
    with unit_of_work(db_url, read_only=True) as s:
        keys = dict(s.execute(text("SELECT id, source_key FROM items")).all())
    assert keys[ids[0]] == f"purged:{ids[0]}"
    assert keys[ids[1]].startswith("det1:b:")


def test_journal_entries_are_sealed(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    monkeypatch.setenv("IDOCR_DATA_KEYS", new_key_entry("j"))
    client = redis.Redis.from_url(redis_url)
    journal = AnswerJournal(client, tmp_path / "journal", "w1", key="idocr:test:journal")
    result = ProviderResult(outcome=Outcome.OK, code="2", msg="ok", side="front",
                            fields=dict(FIELDS), raw={"data": dict(FIELDS)})
    entry = Entry(7, 9, "sandbox", None, result, "w1", 12)
    journal.put(entry)
    stored_value = client.hget("idocr:test:journal", "7")
    assert stored_value is not None
    text_value = stored_value.decode()
    assert FIELDS["name"] not in text_value and FIELDS["id_number"] not in text_value
    assert '"enc1:j:' in text_value
    got = journal.get(7)
    assert got is not None and got.result.fields == FIELDS and got.result.raw == {"data": FIELDS}
    # the file fallback too
    journal._append_file(entry)
    content = (tmp_path / "journal" / "w1.jsonl").read_text(encoding="utf-8")
    assert FIELDS["name"] not in content and "enc1:j:" in content
    assert journal.move_files_to_redis() == 1
    client.delete("idocr:test:journal")
