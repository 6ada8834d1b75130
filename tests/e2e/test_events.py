"""Events from real workers: a worker killed with SIGKILL after its results were committed and
before anything was published (its relay off) loses no event: a worker started afterwards
publishes every one, once per id, to a consumer in another process and to a signed webhook
whose receiver fails each event's first deliveries; the scheduled scan of a profile runs once
per due time with two schedulers racing, and ends with its batch.finished."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from idocr_sandbox.cardset import make_card_set
from idocr_sandbox.truth import TruthIndex
from pipeline.config import ScheduleSpec
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Batch, Event
from pipeline.workflows.schedules import Scheduler, due_time
from tests.conftest import IDOCR, idocr_env
from tests.faults import kill_group
from tests.integration.test_relay import CONSUMER, SECRET, Receiver

IMAGES = 12


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TruthIndex]:
    root = tmp_path_factory.mktemp("cards")
    truth = make_card_set(root / "in", IMAGES, seed=21)
    return root / "in", TruthIndex.load(truth)


class Procs:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def worker(self, name: str, **extra: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with log.open("ab") as fh:
            p = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-n", f"{name}@%h",
                 "-c", "4", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                env={**self.env, **extra}, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.tmp,
            )
        self.procs.append(p)
        return p

    def diagnose(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-20:])
            for p in self.logs if p.exists()
        )

    def stop(self) -> None:
        import signal

        for p in self.procs:
            kill_group(p, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_group(p)
                p.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    made: list[Procs] = []

    def make(env: dict[str, str]) -> Procs:
        p = Procs(tmp_path, env)
        made.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in made:
        p.stop()


def test_results_committed_by_a_killed_worker_are_published_by_the_next(
    tmp_path: Path, pg_url: str, redis_url: str, sandbox_factory, cards, procs  # type: ignore[no-untyped-def]
) -> None:
    folder, truth = cards
    sandbox = sandbox_factory(truth=truth)
    rx = Receiver(fail=2)
    try:
        env = idocr_env(
            IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url, IDOCR_IHUYI_ACCOUNT="sandbox",
            IDOCR_IHUYI_API_KEY="sandbox-key", IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url,
            IDOCR_DATA_DIR=str(tmp_path / ".idocr"), IDOCR_RATE_LIMIT="50",
            IDOCR_WEBHOOK_URL=rx.url, IDOCR_WEBHOOK_SECRET=SECRET.decode(),
            IDOCR_WEBHOOK_RETRY_INITIAL="0.2", IDOCR_WEBHOOK_RETRY_MAX="0.5",
        )
        cluster = procs(env)
        first = cluster.worker("w1", IDOCR_RELAY="0")  # commits results, publishes nothing
        res = subprocess.run([*IDOCR, "scan", str(folder)], env=env, capture_output=True,
                             text=True, timeout=120, cwd=tmp_path, check=False)
        assert res.returncode == 0, res.stderr
        batch = res.stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 120
        while True:
            with unit_of_work(pg_url, read_only=True) as s:
                pending = repo.pending_count(s, batch)
                written = s.scalar(select(func.count()).select_from(Event)) or 0
            if pending == 0 and written >= IMAGES:
                break
            assert time.monotonic() < deadline, cluster.diagnose()
            time.sleep(0.3)
        kill_group(first)  # SIGKILL after the commits, before any publish
        first.wait()
        with unit_of_work(pg_url, read_only=True) as s:
            events = {e.event_id: e for e in s.scalars(select(Event))}
        assert len(events) == IMAGES and all(e.published_at is None for e in events.values())
        assert all(e.delivery_state == "pending" for e in events.values())

        consumer = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, redis_url, str(IMAGES + 1), "idocr:results"],
            stdout=subprocess.PIPE, text=True,
        )
        cluster.worker("w2")  # its relay publishes what w1 left
        out, _ = consumer.communicate(timeout=120)
        got = json.loads(out)
        ids = [g["event_id"] for g in got]
        assert len(ids) == len(set(ids)) == IMAGES + 1, cluster.diagnose()
        assert set(events) <= set(ids)
        assert {g["kind"] for g in got} == {"item.finished", "batch.finished"}
        fronts = [g["body"]["fields"] for g in got if g["kind"] == "item.finished"
                  and g["body"]["status"] == "succeeded" and g["body"]["fields"]["side"] == "front"]
        assert fronts and all(f["id_number"] and f["name"] for f in fronts)

        deadline = time.monotonic() + 60
        while True:
            with unit_of_work(pg_url, read_only=True) as s:
                states = dict(s.execute(select(Event.delivery_state, func.count())
                                        .group_by(Event.delivery_state)).all())
            if states == {"delivered": IMAGES + 1}:
                break
            assert time.monotonic() < deadline, (states, cluster.diagnose())
            time.sleep(0.3)
        with unit_of_work(pg_url, read_only=True) as s:
            attempts = set(s.scalars(select(Event.delivery_attempts)))
        assert attempts == {3}  # two refusals, then one delivery
        accepted = [p["event_id"] for p in rx.posts if p["accepted"]]
        assert sorted(accepted) == sorted(ids)  # exactly one accepted delivery per event
        assert all(p["signed"] for p in rx.posts)
    finally:
        rx.close()


def _race(db_url: str, redis_url: str, folder: str, due: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from pipeline.sources import open_source

    spec = ScheduleSpec(name="nightly", source=folder, cron="* * * * *",
                        batch="nightly-{date:%Y%m%d-%H%M}")

    def slow_open(uri: str):  # type: ignore[no-untyped-def]
        time.sleep(1.0)  # the scan takes a while: the other scheduler arrives meanwhile
        return open_source(uri)

    sched = Scheduler(database_url=db_url, redis_client=redis.Redis.from_url(redis_url),
                      schedules=[spec], provider="sandbox", enqueue=lambda ids: None,
                      open_source=slow_open, lease=3)
    r = sched.run("nightly", datetime.fromisoformat(due))
    results.put((r.started, r.batch, r.detail))


def test_a_due_schedule_runs_once_with_two_schedulers_racing(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    for i in range(5):  # settled by the scan itself: the run ends with no work left
        (folder / f"note-{i}.jpg").write_bytes(b"not an image at all " * (i + 1))
    spec = ScheduleSpec(name="nightly", source=str(folder), cron="* * * * *",
                        batch="nightly-{date:%Y%m%d-%H%M}")
    now = datetime.now(UTC)
    sched = Scheduler(database_url=pg_url, redis_client=redis.Redis.from_url(redis_url),
                      schedules=[spec], provider="sandbox", enqueue=lambda ids: None,
                      open_source=lambda uri: None)
    [(name, due)] = sched.due(now)
    assert name == "nightly" and due == due_time(spec, now) and due <= now

    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    racers = [ctx.Process(target=_race, args=(pg_url, redis_url, str(folder), due.isoformat(), results))
              for _ in range(2)]
    for p in racers:
        p.start()
    outcomes = [results.get(timeout=60) for _ in racers]
    for p in racers:
        p.join(10)
    started = [o for o in outcomes if o[0]]
    assert len(started) == 1, outcomes
    assert {o[2] for o in outcomes if not o[0]} <= {"already running", "already done"}
    batch = started[0][1]
    assert batch == f"nightly-{due:%Y%m%d-%H%M}"
    # done for this due time: a later tick starts nothing
    assert sched.due(now) == []
    assert not sched.run("nightly", due).started
    with unit_of_work(pg_url, read_only=True) as s:
        finished = list(s.scalars(select(Event).where(Event.kind == "batch.finished")))
        assert repo.status_counts(s, batch) == {"rejected": 5}
    assert [(e.batch_id, e.data["total"], e.data["statuses"]) for e in finished] == [
        (batch, 5, {"rejected": 5})
    ]


def test_two_beats_ticking_start_a_scheduled_scan_once(
    tmp_path: Path, pg_url: str, redis_url: str, sandbox_factory, cards, procs  # type: ignore[no-untyped-def]
) -> None:
    """The profile's schedule is due now; two beats tick every second for a while: one scan,
    one batch, every item processed, and the batch's batch.finished published once."""
    folder, truth = cards
    sandbox = sandbox_factory(truth=truth)
    profile = tmp_path / "profile.toml"
    now = datetime.now(UTC)  # due at the start of this minute, then not for a day
    profile.write_text(
        "[[schedules]]\n"
        'name = "nightly"\n'
        f'source = "{folder}"\n'
        f'cron = "{now.minute} {now.hour} * * *"\n'
        'batch = "nightly-{date:%Y%m%d-%H%M}"\n'
    )
    env = idocr_env(
        IDOCR_CONFIG=str(profile), IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url,
        IDOCR_IHUYI_ACCOUNT="sandbox", IDOCR_IHUYI_API_KEY="sandbox-key",
        IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url,
        IDOCR_DATA_DIR=str(tmp_path / ".idocr"), IDOCR_RATE_LIMIT="50", IDOCR_SCHEDULE_TICK="1",
    )
    subprocess.run([*IDOCR, "migrate"], env=env, cwd=tmp_path, check=False, capture_output=True)
    cluster = procs(env)
    cluster.worker("w1")
    beats = []
    for i in range(2):
        log = tmp_path / f"beat{i}.log"
        cluster.logs.append(log)
        with log.open("ab") as fh:
            beats.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "beat",
                 "-s", str(tmp_path / f"beat{i}-schedule"), "--loglevel", "INFO"],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path))
    cluster.procs.extend(beats)
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 120
    while True:
        with unit_of_work(pg_url, read_only=True) as s:
            finished = list(s.scalars(select(Event).where(Event.kind == "batch.finished",
                                                          Event.published_at.is_not(None))))
        if finished:
            break
        assert time.monotonic() < deadline, cluster.diagnose()
        time.sleep(0.5)
    time.sleep(3)  # more ticks from both beats: still nothing new
    for b in beats:
        kill_group(b)
    with unit_of_work(pg_url, read_only=True) as s:
        batches = list(s.scalars(select(Batch.id)))
        counts = repo.status_counts(s, finished[0].batch_id)
        all_finished = list(s.scalars(select(Event).where(Event.kind == "batch.finished")))
    assert batches == [f"nightly-{now:%Y%m%d-%H%M}"]
    assert finished[0].batch_id == batches[0]
    assert sum(counts.values()) == IMAGES and finished[0].data["total"] == IMAGES
    assert len(all_finished) == 1
    on_stream = [json.loads(f[b"body"]) for _, f in r.xrange("idocr:results")]
    assert [b["batch"] for b in on_stream if b["kind"] == "batch.finished"] == [batches[0]]
    assert sandbox.stats.billed_twice() == {}
    scans = sum(log.read_text(errors="replace").count("schedule nightly: scanning into batch")
                for log in cluster.logs if log.exists())
    assert scans == 1, cluster.diagnose()
