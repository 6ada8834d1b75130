"""Retention on real databases (SQLite and PostgreSQL) and a real Redis: what a purge removes,
what it keeps for audit, its bounds (age, batch), the export and status of purged records, and
the beat task that applies IDOCR_RETENTION."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select, text, update

from pipeline.config import Settings
from pipeline.coordination.dedupe import ContentClaims
from pipeline.coordination.journal import AnswerJournal, Entry
from pipeline.outputs.records import records, write_csv, write_jsonl
from pipeline.providers.base import Outcome, ProviderResult
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Attempt, Item, ItemStatus, Request, Result, utcnow
from pipeline.workflows.relay import result_key
from pipeline.workflows.retention import PURGED_PREFIX, RedisCopies, purge
from pipeline.workflows.status import collect
from tests.conftest import ROOT, idocr_env

# synthetic, valid-shaped ID numbers (not real people's), in file names and in the fields
ID_A = "110101199003074514"
ID_B = "11010519491231002X"
ROOT_URI = "file:///data/scans/"
FIELDS = {
    "name": "张三",
    "gender": "男",
    "ethnicity": "汉",
    "date_of_birth": "1990-03-07",
    "domicile": "北京市东城区某街道1号",
    "id_number": ID_A,
    "issue_authority": "北京市公安局东城分局",
    "valid_from": "2010-01-01",
    "valid_to": "2030-01-01",
}
PERSONAL_COLUMNS = (*FIELDS, "checks")


def _age(url: str, item_ids: list[int], days: float) -> None:
    """Make these items final ``days`` ago."""
    with unit_of_work(url) as s:
        s.execute(
            update(Item)
            .where(Item.id.in_(item_ids))
            .values(updated_at=utcnow() - timedelta(days=days))
            .execution_options(synchronize_session=False)
        )


def _succeed(s: Any, item_id: int, ocrid: str, **fields: str) -> None:
    attempt = repo.insert_attempt(s, item_id, 1, "sandbox")
    repo.finish_attempt(
        s, attempt, outcome="ok", code="2", msg="ok", http_status=200, elapsed_ms=5, ocrid=ocrid
    )
    repo.set_status(s, item_id, ItemStatus.SUCCEEDED, code="2", ocrid=ocrid)
    repo.save_result(
        s,
        dict(
            item_id=item_id,
            provider="sandbox",
            side="front",
            quality=["blur"],
            checks={"id_number_checksum": {"ok": True}},
            raw={"code": 2, "data": dict(FIELDS, **fields)},
            **dict(FIELDS, **fields),
        ),
    )


def make_batch(url: str, batch: str, n: int = 4) -> dict[str, int]:
    """A succeeded item named by an ID number, a duplicate of it, a failure (3 attempts), a
    rejection, and ``n - 4`` more successes; key → id."""
    names = [f"{ID_A}_正面.jpg", f"copy/{ID_A}.jpg", "李四 反面.png", "bad/empty.jpg"]
    names += [f"more/{i:04d}.jpg" for i in range(n - 4)]
    with unit_of_work(url) as s:
        repo.get_or_create_batch(s, batch, ROOT_URI, "sandbox")
        rows = []
        for i, key in enumerate(names):
            sha = f"{batch}-{i if i != 1 else 0}".encode().hex().ljust(64, "0")[:64]
            row = repo.NewItem(key, ROOT_URI + key, "sha256:" + sha, sha256=sha)
            if key == "bad/empty.jpg":
                row.status, row.reason = ItemStatus.REJECTED, "empty"
            rows.append(row)
        ids = {a.source_key: a.id for a in repo.add_items(s, batch, rows)}
    with unit_of_work(url) as s:
        _succeed(s, ids[names[0]], f"ocr-{batch}-0")
        for key in names[4:]:
            _succeed(s, ids[key], f"ocr-{batch}-{key}", id_number=ID_B)
        failed = ids["李四 反面.png"]
        for number in (1, 2, 3):
            a = repo.insert_attempt(s, failed, number, "sandbox")
            repo.finish_attempt(
                s, a, outcome="image", code="4086", msg="blurred", http_status=200,
                elapsed_ms=5, ocrid=None,
            )
        repo.set_status(s, failed, ItemStatus.FAILED, code="4086", reason="image", msg="blurred")
        s.add(
            Request(
                idempotency_key=f"req-{batch}",
                channel="client",
                status="accepted",
                item_id=ids[names[0]],
                batch_id=batch,
                meta={"customer": "张三", "id": ID_A},
            )
        )
    return ids


def raw_rows(url: str, sql: str, **params: Any) -> list[Any]:
    with unit_of_work(url, read_only=True) as s:
        return list(s.execute(text(sql), params))


def journal(redis_url: str) -> AnswerJournal:
    return AnswerJournal(redis.Redis.from_url(redis_url), Path("/nonexistent"), "test")


def journal_entry(item_id: int) -> Entry:
    result = ProviderResult(Outcome.OK, "2", "ok", "ocr-x", "front", dict(FIELDS), raw={"code": 2})
    return Entry(item_id, 1, "sandbox", None, result, "w")


def test_purge_removes_personal_data_and_keeps_the_audit(db_url: str, redis_url: str) -> None:
    ids = make_batch(db_url, "old")
    young = make_batch(db_url, "young")
    old_ids = list(ids.values())
    _age(db_url, old_ids, 40)
    _age(db_url, list(young.values()), 5)
    j = journal(redis_url)
    first, young_first = ids[f"{ID_A}_正面.jpg"], young[f"{ID_A}_正面.jpg"]
    j.put(journal_entry(first))
    j.put(journal_entry(young_first))
    r = redis.Redis.from_url(redis_url)
    for key in ("req-old", "req-young"):
        r.set(result_key(key), json.dumps({"name": "张三"}, ensure_ascii=False))
    stream = "idocr:results"
    old_ms = int((utcnow() - timedelta(days=40)).timestamp() * 1000)
    r.xadd(stream, {"body": "old"}, id=f"{old_ms}-0")
    r.xadd(stream, {"body": "new"})
    claims = ContentClaims(r)
    with unit_of_work(db_url, read_only=True) as s:
        shas = {i.id: i.sha256 for i in s.scalars(select(Item))}
    assert claims.first(shas[first], first) == first
    assert claims.first(shas[young_first], young_first) == young_first
    copies = RedisCopies(r, j, stream, claims)
    with unit_of_work(db_url, read_only=True) as s:
        before = {i.id: (i.status, i.code, i.ocrid, i.attempts, i.sha256) for i in s.scalars(select(Item))}
        attempts_before = s.scalar(select(text("count(*)")).select_from(Attempt))

    rep = purge(db_url, older_than=timedelta(days=30), copies=copies, chunk=2)

    assert (rep.items, rep.results, rep.requests, rep.journal) == (4, 1, 1, 1)
    assert (rep.result_keys, rep.stream, rep.errors) == (1, 1, [])
    assert rep.transactions >= 2  # two items per transaction
    with unit_of_work(db_url, read_only=True) as s:
        after = {i.id: (i.status, i.code, i.ocrid, i.attempts, i.sha256) for i in s.scalars(select(Item))}
        assert after == before  # statuses, codes, ocrids, attempt counts: all kept
        assert s.scalar(select(text("count(*)")).select_from(Attempt)) == attempts_before == 8
        old_items = {i.id: i for i in s.scalars(select(Item).where(Item.batch_id == "old"))}
        assert all(i.purged_at is not None for i in old_items.values())
        assert {i.source_key for i in old_items.values()} == {f"{PURGED_PREFIX}{i}" for i in old_ids}
        assert all(i.source_uri == i.source_key and i.pair_key is None for i in old_items.values())
        result = s.get(Result, first)
        assert result is not None and result.provider == "sandbox" and result.quality == ["blur"]
        assert all(getattr(result, c) is None for c in PERSONAL_COLUMNS)
        assert getattr(result, "id_number_index", None) is None and result.raw == {}
        assert s.scalar(select(Request.meta).where(Request.item_id == first)) == {}
        # the young batch is untouched
        kept = s.get(Result, young_first)
        assert kept is not None and kept.name == "张三" and kept.id_number == ID_A
        assert s.scalar(select(Request.meta).where(Request.item_id == young_first))["id"] == ID_A
    # at rest: nothing of the old batch's people or names is left, in clear or sealed
    names = [*PERSONAL_COLUMNS, *(c for c in Result.__table__.c.keys() if c == "id_number_index")]
    for row in raw_rows(db_url, f"SELECT {', '.join(names)} FROM results WHERE item_id = :i", i=first):
        assert set(row) <= {None, "null"}  # checks: SQL NULL or JSON null
    for key, uri, pair in raw_rows(
        db_url, "SELECT source_key, source_uri, pair_key FROM items WHERE batch_id = 'old'"
    ):
        assert key.startswith(PURGED_PREFIX) and uri.startswith(PURGED_PREFIX) and pair is None
    assert j.get(first) is None and j.get(young_first) is not None
    assert r.get(result_key("req-old")) is None and r.get(result_key("req-young")) is not None
    assert [fields[b"body"] for _, fields in r.xrange(stream)] == [b"new"]
    # the bytes of a purged item, seen again, are not a duplicate of an answer that is gone
    assert claims.first(shas[first], 10_000) == 10_000
    assert claims.first(shas[young_first], 10_001) == young_first

    # a second pass finds nothing more to do
    again = purge(db_url, older_than=timedelta(days=30), copies=copies)
    assert again.items == 0


def test_purge_of_one_batch_touches_only_that_batch(db_url: str) -> None:
    a = make_batch(db_url, "a")
    b = make_batch(db_url, "b")
    _age(db_url, [*a.values(), *b.values()], 400)
    rep = purge(db_url, batch_id="b")
    assert rep.items == 4
    with unit_of_work(db_url, read_only=True) as s:
        by_batch = {
            i.batch_id + ":" + str(i.purged_at is not None) for i in s.scalars(select(Item))
        }
        assert by_batch == {"a:False", "b:True"}
        assert s.get(Result, a[f"{ID_A}_正面.jpg"]).name == "张三"  # type: ignore[union-attr]
        assert s.get(Result, b[f"{ID_A}_正面.jpg"]).name is None  # type: ignore[union-attr]


def test_purge_respects_the_age_and_never_takes_unfinished_items(db_url: str) -> None:
    ids = make_batch(db_url, "b1", n=6)
    more = [ids["more/0000.jpg"], ids["more/0001.jpg"]]
    _age(db_url, list(ids.values()), 31)
    _age(db_url, [more[0]], 29)  # younger than the cut-off
    with unit_of_work(db_url) as s:  # still on its way: its name is needed to read the file
        repo.set_status(s, more[1], ItemStatus.QUEUED)
    _age(db_url, [more[1]], 90)

    dry = purge(db_url, older_than=timedelta(days=30), dry_run=True)
    assert (dry.items, dry.results) == (4, 1)
    with unit_of_work(db_url, read_only=True) as s:
        assert s.scalar(select(text("count(*)")).select_from(Item).where(Item.purged_at.is_not(None))) == 0

    rep = purge(db_url, older_than=timedelta(days=30))
    assert rep.items == 4
    with unit_of_work(db_url, read_only=True) as s:
        items = {i.id: i for i in s.scalars(select(Item))}
    assert items[more[0]].purged_at is None and items[more[0]].source_key == "more/0000.jpg"
    assert items[more[1]].purged_at is None and items[more[1]].source_key == "more/0001.jpg"
    assert rep.cutoff is not None


def test_purged_records_export_as_purged(db_url: str) -> None:
    ids = make_batch(db_url, "b1")
    # a later batch holds a duplicate of the first image, whose answer it shares
    with unit_of_work(db_url) as s:
        repo.get_or_create_batch(s, "b2", ROOT_URI, "sandbox")
        sha = "b1-0".encode().hex().ljust(64, "0")[:64]
        (dup,) = repo.add_items(s, "b2", [repo.NewItem("later.jpg", ROOT_URI + "later.jpg", "sha256:" + sha, sha256=sha)])
    assert dup.status == ItemStatus.DUPLICATE
    _age(db_url, list(ids.values()), 60)
    purge(db_url, older_than=timedelta(days=30))

    with unit_of_work(db_url, read_only=True) as s:
        recs = list(records(s, "b1"))
        later = list(records(s, "b2"))
        out = io.StringIO()
        write_jsonl(iter(recs), out)
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        buf = io.StringIO()
        write_csv(iter(recs), buf)
    assert len(recs) == 4
    for rec in lines:
        assert rec["status"] == "purged" and rec["purged_at"], rec
        assert rec["source"] is None and rec["key"] is None
        assert not set(PERSONAL_COLUMNS) & set(rec)
        assert ID_A not in json.dumps(rec, ensure_ascii=False)
    # the audit stays: the paid call's code, ocrid and attempt count
    assert any(r["ocrid"] == "ocr-b1-0" and r["code"] == "2" and r["attempts"] == 1 for r in lines)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert {r["status"] for r in rows} == {"purged"}
    assert all(r["purged_at"] and r["name"] == "" and r["id_number"] == "" for r in rows)
    # the duplicate keeps its own name, but its shared answer is gone: purged, not empty
    (rec,) = later
    assert rec["status"] == "purged" and rec["key"] == "later.jpg" and "name" not in rec
    assert rec["duplicate_of"] is None


def test_batch_output_of_a_purged_batch(db_url: str, tmp_path: Path) -> None:
    from pipeline.outputs.files import FolderOutput, write_batch_output

    ids = make_batch(db_url, "b1", n=5)
    _age(db_url, [i for k, i in ids.items() if k != "more/0000.jpg"], 60)
    purge(db_url, older_than=timedelta(days=30))
    with unit_of_work(db_url) as s:
        rep = write_batch_output(s, "b1", FolderOutput(tmp_path / "out"))
    assert rep.records == 5 and rep.counts == {"purged": 4, "succeeded": 1}
    lines = [json.loads(x) for x in (tmp_path / "out" / "b1" / "manifest.jsonl").read_text().splitlines()]
    assert [e["key"] for e in lines if e["status"] == "succeeded"] == ["more/0000.jpg"]
    assert all(e["source"] is None and e["key"] is None for e in lines if e["status"] == "purged")
    written = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").rglob("*.json*"))
    assert ID_A not in written  # the young item carries ID_B


def test_status_counts_purged_items(db_url: str, clean_env: Path) -> None:
    ids = make_batch(db_url, "b1")
    _age(db_url, list(ids.values()), 60)
    purge(db_url, older_than=timedelta(days=30))
    settings = Settings(database_url=db_url, provider="sandbox")
    with unit_of_work(db_url, read_only=True) as s:
        st = collect(settings, s, "b1", live_quota=False)
    assert st.purged == 4 and st.to_dict()["items"]["purged"] == 4
    assert st.by_status == {"succeeded": 1, "duplicate": 1, "failed": 1, "rejected": 1}


def test_a_purged_item_takes_no_journaled_answer_back(db_url: str, redis_url: str) -> None:
    """An answer a lost worker journaled for an item failed as unknown is written by the
    reconciler later, unless retention purged the item meanwhile: then the entry is dropped."""
    ids = make_batch(db_url, "b1")
    failed = ids["李四 反面.png"]
    with unit_of_work(db_url) as s:
        repo.set_status(s, failed, ItemStatus.FAILED, reason=repo.UNKNOWN)
    _age(db_url, [failed], 60)
    purge(db_url, older_than=timedelta(days=30))
    from pipeline.workflows.processing import apply_answer

    entry = journal_entry(failed)
    with unit_of_work(db_url) as s:
        assert apply_answer(s, entry, repo.answerable(stale_before=utcnow()), utcnow()) is None
    with unit_of_work(db_url, read_only=True) as s:
        assert s.get(Result, failed) is None
    # an entry left behind (Redis was away during the purge) is refused, then dropped
    from pipeline.workflows.reconcile import Reconciler

    j = journal(redis_url)
    j.put(entry)
    rec = Reconciler(
        database_url=db_url, redis_client=j.redis, queue="ocr", enqueue=lambda ids: None,
        queue_depth=lambda: 0, claim_lease=60, interval=15, provider="sandbox",
        account="sandbox", journal=j,
    )
    assert rec._replay_journal() == 0
    assert j.get(failed) is None
    with unit_of_work(db_url, read_only=True) as s:
        assert s.get(Result, failed) is None


def _worker_python(code: str, env: dict[str, str]) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_beat_task_applies_the_configured_retention(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    ids = make_batch(pg_url, "b1")
    young = make_batch(pg_url, "b2")
    _age(pg_url, list(ids.values()), 100)
    _age(pg_url, list(young.values()), 10)
    j = journal(redis_url)
    j.put(journal_entry(ids[f"{ID_A}_正面.jpg"]))
    env = idocr_env(
        IDOCR_DATABASE_URL=pg_url,
        IDOCR_REDIS_URL=redis_url,
        IDOCR_DATA_DIR=str(tmp_path / "data"),
    )
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "from workers.app import app; from workers.tasks import retention; "
        "print('retention' in app.conf.beat_schedule, "
        "app.conf.task_routes['idocr.retention']['queue']); print(retention())"
    )
    # unset: nothing scheduled, nothing purged
    assert _worker_python(code, env).splitlines() == ["False ocr.control", "retention not configured"]
    with unit_of_work(pg_url, read_only=True) as s:
        assert s.scalar(select(text("count(*)")).select_from(Item).where(Item.purged_at.is_not(None))) == 0

    out = _worker_python(code, {**env, "IDOCR_RETENTION": "90d"}).splitlines()
    assert out == ["True ocr.control", "4 items purged"]
    with unit_of_work(pg_url, read_only=True) as s:
        purged = {i.batch_id for i in s.scalars(select(Item).where(Item.purged_at.is_not(None)))}
    assert purged == {"b1"}
    assert j.get(ids[f"{ID_A}_正面.jpg"]) is None


def test_purge_command(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    ids = make_batch(pg_url, "b1")
    make_batch(pg_url, "b2")
    _age(pg_url, list(ids.values()), 45)
    env = idocr_env(IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url, IDOCR_DATA_DIR=str(tmp_path / "d"))
    cli = [sys.executable, "-m", "pipeline.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    res = run("purge")
    assert res.returncode == 2 and "--older-than" in res.stderr
    res = run("purge", "--older-than", "soon")
    assert res.returncode == 2 and "--older-than" in res.stderr
    res = run("purge", "--older-than", "30d", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["items"] == 4 and "would purge 4 items" in res.stderr
    res = run("purge", "--older-than", "30d", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["items"] == 4 and "purged 4 items" in res.stderr
    res = run("status", "b1")
    assert res.returncode == 0 and "4 items purged" in res.stdout
    res = run("purge", "--batch", "b2")
    assert res.returncode == 0 and "purged 4 items of batch b2" in res.stderr
    res = run("purge", "--batch", "nope")
    assert res.returncode == 1 and "no batch" in res.stderr
