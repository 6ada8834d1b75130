"""Producer and processor on real databases (SQLite and PostgreSQL), real Redis and the sandbox
over real HTTP; no Celery here (tests/e2e runs the workers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import redis
from sqlalchemy import select

from pipeline.coordination.gate import PauseSignal
from pipeline.domain.images import ImageLimits
from pipeline.workflows.processing import Processor, RetryPolicy
from pipeline.workflows.producer import scan
from pipeline.providers.ihuyi import IhuyiClient
from pipeline.coordination.quota import QuotaExhausted, QuotaLedger
from pipeline.coordination.ratelimit import RateLimiter, rate_key
from idocr_sandbox.server import FaultPlan
from pipeline.sources.local import LocalSource
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Attempt, Item, Result
from tests.conftest import EXAMPLES

TRUTH = json.loads((EXAMPLES / "truth.json").read_text(encoding="utf-8"))["images"]


def copy_examples(dst: Path) -> Path:
    shutil.copytree(EXAMPLES / "images", dst)
    return dst


def make_processor(db_url: str, sandbox, redis_url: str, *, key: str = "sandbox-key",  # type: ignore[no-untyped-def]
                   max_attempts: int = 3, low_watermark: int = 0) -> Processor:
    provider = IhuyiClient("sandbox", key, sandbox.url, name="sandbox", timeout=5)
    r = redis.Redis.from_url(redis_url)
    return Processor(
        database_url=db_url,
        provider=provider,
        limits=ImageLimits(),
        retry=RetryPolicy(max_attempts, 0.01, 0.02),
        worker_id="test",
        limiter=RateLimiter(r, rate_key("sandbox", "sandbox"), 1000, 10),
        quota=QuotaLedger(r, "sandbox", "sandbox", low_watermark=low_watermark),
        quota_exhausted=QuotaExhausted,
        pause_signal=PauseSignal(r, "sandbox", "sandbox"),
    )


def scan_into(db_url: str, folder: Path, batch: str = "b1") -> tuple[list[int], object]:
    sent: list[int] = []
    report = scan(LocalSource(folder), database_url=db_url, batch_id=batch, provider="sandbox", enqueue=sent.extend)
    return sent, report


def items(db_url: str) -> dict[str, Item]:
    with unit_of_work(db_url) as s:
        return {i.source_key: i for i in s.scalars(select(Item))}


def test_scan_records_every_file_and_rescan_adds_nothing(db_url: str, tmp_path: Path) -> None:
    folder = copy_examples(tmp_path / "in")
    # the same bytes under another odd name: a duplicate, never sent
    shutil.copy(folder / "高娟 正面.jpg", folder / "copy of 高娟 (2) #.jpg")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    sent, report = scan_into(db_url, folder)
    assert report.seen == 14 and report.added == 14
    assert report.duplicates == 1
    assert report.rejected == 2  # empty.jpg and notes.txt are judged without decoding
    assert len(sent) == 11
    rows = items(db_url)
    assert ".DS_Store" not in rows
    assert rows["bad/empty.jpg"].status == "rejected" and rows["bad/empty.jpg"].reason == "empty"
    assert rows["bad/notes.txt"].reason == "not_image"
    # the first of the two in scan order is the original ("c" sorts before "高")
    dup, orig = rows["高娟 正面.jpg"], rows["copy of 高娟 (2) #.jpg"]
    assert orig.status == "queued"
    assert dup.status == "duplicate" and dup.duplicate_of == orig.id
    assert rows["2026-11 批次/国徽面 05.png"].fingerprint.startswith("sha256:")

    sent2, report2 = scan_into(db_url, folder)
    assert (report2.added, report2.queued, len(sent2), report2.already_present) == (0, 0, 0, 14)
    # a changed file at the same path is new content: a new item
    (folder / "bad" / "notes.txt").write_text("other notes")
    _, report3 = scan_into(db_url, folder)
    assert report3.added == 1


def test_every_good_image_is_billed_once_with_exact_fields(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    folder = copy_examples(tmp_path / "in")
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url)
    statuses = [proc.process(i) for i in sent]
    # a second delivery of every message finds its item taken: no second call
    assert all(proc.process(i) == "skipped" for i in sent)
    assert statuses.count("succeeded") == 8
    assert sandbox.stats.billed == 8
    assert set(sandbox.stats.billed_by_sha.values()) == {1}

    rows = items(db_url)
    with unit_of_work(db_url) as s:
        results = {r.item_id: r for r in s.scalars(select(Result))}
    for entry in TRUTH:
        item = rows[entry["file"].removeprefix("images/")]
        assert item.status == "succeeded" and item.attempts == 1 and item.ocrid
        got = results[item.id]
        assert got.side == entry["side"]
        for k, v in entry["fields"].items():
            assert getattr(got, k) == v, k
        assert got.raw["code"] == 2
        if got.side == "front":
            assert got.checks["id_number_checksum"]["ok"] is True
    reasons = {k: (v.status, v.reason) for k, v in rows.items() if k.startswith("bad/")}
    assert reasons == {
        "bad/empty.jpg": ("rejected", "empty"),
        "bad/notes.txt": ("rejected", "not_image"),
        "bad/truncated.jpg": ("rejected", "corrupt"),
        "bad/tiny.png": ("rejected", "too_small"),
        "bad/grayscale.jpg": ("rejected", "grayscale"),
    }


def test_front_and_back_of_one_card_are_checked_together(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """高娟 正面.jpg and 高娟 背面.jpg: born 1958, card issued 2024 (age 66) valid 长期 — the
    period agrees with the age. Whichever side finishes second checks the pair; an export
    pass checks it again after a worker that died in between."""
    sandbox = sandbox_factory()
    folder = copy_examples(tmp_path / "in")
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url)
    assert [proc.process(i) for i in sent].count("succeeded") == 8
    rows = items(db_url)
    front, back = rows["高娟 正面.jpg"], rows["高娟 背面.jpg"]
    with unit_of_work(db_url) as s:
        checks = {r.item_id: r.checks for r in s.scalars(select(Result))}
    assert checks[front.id]["valid_period_matches_age"] == {
        "ok": True, "level": "error", "detail": "age 66 at issue: 长期", "with": "高娟 背面.jpg"}
    assert checks[back.id]["valid_period_matches_age"]["with"] == "高娟 正面.jpg"
    # no partner: no pair check (front side 01 / back side 02 are two people's cards)
    assert "valid_period_matches_age" not in checks[rows["front side 01.png"].id]
    assert "valid_period_matches_age" not in checks[rows["back side 02.png"].id]

    with unit_of_work(db_url) as s:  # as if the worker died between its result and the pairing
        r = s.get(Result, back.id)
        r.checks = {k: v for k, v in r.checks.items() if k != "valid_period_matches_age"}
        s.get(Result, front.id).checks = {}
    with unit_of_work(db_url) as s:
        assert repo.pair_batch(s, "b1", chunk=1) == 1
    with unit_of_work(db_url) as s:
        assert s.get(Result, back.id).checks["valid_period_matches_age"]["ok"] is True
        assert s.get(Result, back.id).checks["valid_period_matches_age"]["with"] == "高娟 正面.jpg"
        assert set(s.get(Result, front.id).checks) == {"valid_period_matches_age"}


def test_transient_errors_are_retried_and_every_attempt_recorded(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory(faults=FaultPlan(codes={"4010": 0.5}, http_500=0.2), seed=7)
    folder = copy_examples(tmp_path / "in")
    shutil.rmtree(folder / "bad")
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url, max_attempts=12)
    assert [proc.process(i) for i in sent] == ["succeeded"] * 8
    with unit_of_work(db_url) as s:
        attempts = list(s.scalars(select(Attempt)))
        by_item = {i.id: i.attempts for i in s.scalars(select(Item))}
    assert len(attempts) > 8  # faults happened and were retried
    assert all(a.outcome is not None and a.finished_at is not None for a in attempts)
    assert {a.outcome for a in attempts} <= {"ok", "transient"}
    assert sum(by_item.values()) == len(attempts)
    assert sandbox.stats.billed == 8  # failed channel calls and 500s are not billed


def test_retries_are_bounded_then_the_item_fails(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory(faults=FaultPlan(codes={"1": 1.0}))
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES / "images" / "高娟 正面.jpg", folder / "a.jpg")
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url, max_attempts=3)
    assert proc.process(sent[0]) == "failed"
    item = items(db_url)["a.jpg"]
    assert (item.reason, item.code, item.attempts) == ("transient", "1", 3)
    assert "gave up after 3 attempts" in item.msg


def test_unknown_image_fails_without_retry(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    import random

    from idocr_sandbox.cards import encode, random_identity, render_card

    sandbox = sandbox_factory()
    folder = tmp_path / "in"
    folder.mkdir()
    fields = random_identity(random.Random(5), "front")
    (folder / "stranger.jpg").write_bytes(encode(render_card("front", fields), "JPEG"))
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url)
    assert proc.process(sent[0]) == "failed"
    item = items(db_url)["stranger.jpg"]
    assert (item.reason, item.code, item.attempts) == ("image", "4086", 1)


def test_wrong_key_pauses_and_fails_nothing(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    folder = copy_examples(tmp_path / "in")
    shutil.rmtree(folder / "bad")
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url, key="not-the-key")
    statuses = [proc.process(i) for i in sent]
    assert statuses == ["paused"] * 8
    assert sandbox.stats.billed == 0
    with unit_of_work(db_url) as s:
        pause = repo.open_pause(s, "sandbox", "sandbox")
        calls = s.scalar(select(repo.func.count()).select_from(Attempt))
    assert pause is not None and pause.kind == "auth" and "40502" in pause.reason
    assert calls == 1  # only the first item reached the provider; the others met the gate
    assert {i.status for i in items(db_url).values()} == {"paused"}


def test_quota_ledger_pauses_before_the_provider_refuses(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    from pipeline.workflows import control
    from pipeline.config import Settings

    sandbox = sandbox_factory(quota=3)
    folder = copy_examples(tmp_path / "in")
    shutil.rmtree(folder / "bad")
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url)
    settings = Settings(database_url=db_url, redis_url=redis_url)
    sent_again: list[int] = []
    control.check_balance(settings, proc.provider, enqueue=sent_again.extend, broadcast=None)
    statuses = [proc.process(i) for i in sent]
    assert statuses.count("succeeded") == 3 and statuses.count("paused") == 5
    assert sandbox.stats.billed == 3
    assert "4051" not in sandbox.stats.codes.get("ihuyi", {})  # never refused for quota
    with unit_of_work(db_url) as s:
        assert repo.open_pause(s, "sandbox", "sandbox").kind == "quota"

    # topped up on the provider side: the next reading resumes and re-enqueues the held items
    sandbox.add_quota(10)
    rep = control.check_balance(settings, proc.provider, enqueue=sent_again.extend, broadcast=None)
    assert rep.action == "resumed"
    assert sorted(sent_again) == sorted(i for i, st in zip(sent, statuses) if st == "paused")
    assert [proc.process(i) for i in sent_again] == ["succeeded"] * 5
    assert set(sandbox.stats.billed_by_sha.values()) == {1}


def test_a_claim_whose_worker_died_is_taken_over_after_the_lease(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from pipeline.coordination.journal import SentMarks

    sandbox = sandbox_factory()
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(EXAMPLES / "images" / f"高娟 {'正面' if name == 'a' else '背面'}.jpg", folder / f"{name}.jpg")
    sent, _ = scan_into(db_url, folder)
    marks = SentMarks(redis.Redis.from_url(redis_url))
    # a worker claimed both items and started a call on each, then vanished: the first call
    # had not left yet (waiting for its rate-limiter slot), the second had been sent
    with unit_of_work(db_url) as s:
        for item_id in sent:
            assert repo.claim_row(s, item_id, "dead-worker") is not None
        unsent = repo.insert_attempt(s, sent[0], 1, "sandbox")
        in_flight = repo.insert_attempt(s, sent[1], 1, "sandbox")
    marks.mark(in_flight)
    proc = make_processor(db_url, sandbox, redis_url)
    proc.sent_marks = marks
    assert proc.process(sent[0]) == "skipped"  # within the lease: somebody has it
    proc.claim_lease = timedelta(0)
    # never sent: the takeover sends it, and the unsent attempt is gone from the record
    assert proc.process(sent[0]) == "succeeded"
    # it may have been billed and its answer is lost: failed as unknown, never paid twice
    assert proc.process(sent[1]) == "failed"
    with unit_of_work(db_url) as s:
        rows = list(s.scalars(select(Attempt).order_by(Attempt.id)))
        a = [(x.item_id, x.outcome) for x in rows]
        lost = s.get(Item, sent[1])
        assert s.get(Item, sent[0]).attempts == 1
    assert a == [(sent[1], "unknown"), (sent[0], "ok")]
    assert (lost.status, lost.reason) == ("failed", "unknown")
    assert "--retry-unknown" in lost.msg
    assert sandbox.stats.billed == 1
    assert unsent not in [x.id for x in rows]


def test_a_resume_racing_a_parking_worker_loses_no_item_and_is_not_undone(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    from pipeline.workflows.processing import _Paused

    sandbox = sandbox_factory()
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(EXAMPLES / "images" / "高娟 正面.jpg", folder / "a.jpg")
    sent, _ = scan_into(db_url, folder)
    proc = make_processor(db_url, sandbox, redis_url)
    requeued: list[int] = []
    proc.enqueue = requeued.extend
    with unit_of_work(db_url) as s:
        repo.add_pause(s, "sandbox", "sandbox", "operator", "maintenance")

    def gate_then_resume(unsent_attempt: int | None = None, reserved: bool = False) -> None:
        # an operator pauses, the worker's gate reads it, the operator resumes at once (and
        # the resume re-enqueues what is parked) before the worker parks the item
        with unit_of_work(db_url) as s:
            repo.add_pause(s, "sandbox", "sandbox", "operator", "a short one")
        with unit_of_work(db_url) as s:
            repo.close_pauses(s, "sandbox", "sandbox", "operator")
            repo.unpause_items(s, "sandbox")
        raise _Paused("operator", "a short one")

    # the claim-time gate sees the pause: parked
    assert proc.process(sent[0]) == "paused"
    with unit_of_work(db_url) as s:
        repo.close_pauses(s, "sandbox", "sandbox", "operator")
        assert repo.unpause_items(s, "sandbox") == [sent[0]]
    proc._check_gate = gate_then_resume  # type: ignore[method-assign]
    assert proc.process(sent[0]) == "queued"
    assert requeued == [sent[0]]  # back in the queue with a message of its own
    with unit_of_work(db_url) as s:
        assert repo.open_pause(s, "sandbox", "sandbox") is None  # the resume was not undone
    assert sandbox.stats.billed == 0
