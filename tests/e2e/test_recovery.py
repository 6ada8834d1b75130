"""Self-healing under real infrastructure faults, with workers and beat started the plain
Celery way: a Redis restarted empty, PostgreSQL cut through a proxy, a worker's main process or
one pool child killed with SIGKILL, the result write failing after the provider answered.

After each fault nobody types a command: every item must reach a final state on its own, within
the claim lease plus two reconciler intervals after the fault (plus the time the work takes),
the provider (the sandbox, which counts billing) must have billed every image exactly once, and
an image whose answer died with its worker ends ``failed``/``unknown``, never paid again.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from idocr_sandbox.cardset import make_card_set
from idocr_sandbox.truth import TruthIndex
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Item
from tests.conftest import IDOCR, idocr_env
from tests.faults import OwnRedis, TcpProxy, children, kill_group

LEASE, INTERVAL = 8.0, 2.0
IMAGES = 40
#: how long the work itself may take on a loaded 2-core machine, on top of the recovery bound
WORK_BOUND = 90.0


class Cluster:
    def __init__(self, tmp: Path, db_url: str, sandbox, redis_server: OwnRedis, proxy: TcpProxy) -> None:  # type: ignore[no-untyped-def]
        self.tmp = tmp
        self.db_url = db_url  # direct, for the test's own look-ups
        self.sandbox = sandbox
        self.redis = redis_server
        self.proxy = proxy
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scans: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        proxied = db_url.replace(":5432/", f":{proxy.port}/")
        self.env = idocr_env(
            IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url, IDOCR_IHUYI_ACCOUNT="sandbox",
            IDOCR_IHUYI_API_KEY="sandbox-key", IDOCR_DATABASE_URL=proxied,
            IDOCR_REDIS_URL=redis_server.url, IDOCR_DATA_DIR=str(tmp / ".idocr"),
            IDOCR_CLAIM_LEASE=str(LEASE), IDOCR_RECONCILE_INTERVAL=str(INTERVAL),
            IDOCR_RATE_LIMIT="20", IDOCR_BALANCE_INTERVAL="4", IDOCR_BALANCE_INTERVAL_PAUSED="2",
            IDOCR_HTTP_TIMEOUT="10", IDOCR_RETRY_INITIAL="0.2", IDOCR_RETRY_MAX="1",
            IDOCR_INFRA_RETRY_FOR="300",
        )

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, *, pool: str | None = None, concurrency: int = 4) -> subprocess.Popen[bytes]:
        """A worker started the plain Celery way (no idocr wrapper, no -Q)."""
        cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-n", f"{name}@%h",
               "-c", str(concurrency), "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
        if pool:
            cmd += ["-P", pool]
        return self._spawn(name, cmd)

    def beat(self) -> subprocess.Popen[bytes]:
        return self._spawn("beat", [sys.executable, "-m", "celery", "-A", "workers.app", "beat",
                                    "-s", str(self.tmp / "beat-schedule"), "--loglevel", "INFO"])

    def two_workers_until_a_quarter_billed(self, folder: Path) -> str:
        """Two plain workers and beat on the batch of ``folder``; back once a quarter is billed."""
        self.worker("w1")
        self.worker("w2")
        self.beat()
        batch = self.scan(folder)
        self.wait_billed(IMAGES // 4)
        return batch

    def scan(self, folder: Path) -> str:
        """Starts ``idocr scan`` of ``folder`` into a batch named here and returns at once: the
        workers bill while the command is still exiting, so waiting for it first could let the
        whole batch finish before a fault is set off. Its exit is checked by :meth:`wait_final`."""
        batch = f"chaos-{len(self.scans)}"
        path = self.tmp / f"scan-{len(self.scans)}.log"
        self.logs.append(path)
        log = path.open("wb")
        self.scans.append(subprocess.Popen([*IDOCR, "scan", str(folder), "--batch", batch],
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           cwd=self.tmp))
        return batch

    def scans_done(self) -> None:
        for proc in self.scans:
            assert proc.wait(timeout=120) == 0, self.diagnose()

    def counts(self, batch: str) -> tuple[dict[str, int], int]:
        with unit_of_work(self.db_url, read_only=True) as s:
            return repo.status_counts(s, batch), repo.pending_count(s, batch)

    def busy_pid(self, pids: list[int], timeout: float = 30) -> int:
        """One of ``pids`` that holds a claim right now (a call under way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with unit_of_work(self.db_url, read_only=True) as s:
                holders = set(s.scalars(select(Item.claimed_by).where(Item.status == "submitting")))
            for pid in pids:
                if any(h and h.endswith(f":{pid}") for h in holders):
                    return pid
            time.sleep(0.02)
        raise AssertionError(f"none of {pids} took work\n{self.diagnose()}")

    def wait_billed(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.sandbox.stats.billed < n:
            assert time.monotonic() < deadline, self.diagnose()
            time.sleep(0.05)

    def wait_final(self, batch: str, bound: float) -> float:
        """Seconds until every item of the batch is final; fails past ``bound``."""
        t0 = time.monotonic()
        self.scans_done()
        while True:
            counts, pending = self.counts(batch)
            if pending == 0:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < bound, f"{counts} after {bound:.0f} s\n{self.diagnose()}"
            time.sleep(0.5)

    def logged(self, text_: str) -> bool:
        return any(text_ in log.read_text(errors="replace") for log in self.logs if log.exists())

    def diagnose(self) -> str:
        tails = []
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            tails.append(f"--- {log.name}\n" + "\n".join(lines[-25:]))
        return "\n".join(tails)

    def stop(self) -> None:
        for scan in self.scans:
            if scan.poll() is None:
                scan.kill()
                scan.wait()
        for p in self.procs:
            kill_group(p, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_group(p)
                p.wait()
            for child in children(p.pid):  # an orphaned pool child
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TruthIndex]:
    root = tmp_path_factory.mktemp("cards")
    truth = make_card_set(root / "in", IMAGES, seed=8)
    return root / "in", TruthIndex.load(truth)


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, sandbox_factory, cards) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    _, truth = cards
    sandbox = sandbox_factory(truth=truth, latency=0.2)
    own = OwnRedis(tmp_path / "redis")
    proxy = TcpProxy(5432)
    c = Cluster(tmp_path, pg_url, sandbox, own, proxy)
    try:
        yield c
    finally:
        c.stop()
        proxy.close()
        own.stop()


def assert_every_image_billed_once(c: Cluster, batch: str) -> dict[str, int]:
    counts, pending = c.counts(batch)
    assert pending == 0
    assert sum(counts.values()) == IMAGES
    stats = c.sandbox.stats
    assert stats.billed_twice() == {}, stats.billed_twice()
    assert stats.billed == IMAGES, (stats.billed, counts)
    with unit_of_work(c.db_url, read_only=True) as s:
        failed = dict(s.execute(
            select(Item.reason, func.count()).where(Item.status == "failed").group_by(Item.reason)
        ).all())
    # the only failures allowed: answers that died with their worker (billed, never re-sent)
    assert set(failed) <= {repo.UNKNOWN}, failed
    assert counts.get("succeeded", 0) + failed.get(repo.UNKNOWN, 0) == IMAGES
    return counts


def recovery_bound() -> float:
    return LEASE + 2 * INTERVAL + WORK_BOUND


def test_a_redis_restarted_empty_mid_run_loses_nothing(cluster: Cluster, cards) -> None:  # type: ignore[no-untyped-def]
    # a message per item: most of the batch waits in the broker when it goes (with several
    # items a message, the workers' prefetch would hold all 40 at once)
    cluster.env["IDOCR_TASK_ITEMS"] = "1"
    batch = cluster.two_workers_until_a_quarter_billed(cards[0])
    cluster.redis.kill()  # every queued message, the rate limiter, the quota ledger: gone
    time.sleep(3)
    cluster.redis.start()  # back, empty
    cluster.wait_final(batch, recovery_bound())
    counts = assert_every_image_billed_once(cluster, batch)
    assert counts == {"succeeded": IMAGES}  # no call was in flight when a worker died
    assert cluster.logged("the broker lost its messages"), cluster.diagnose()


def test_postgresql_cut_mid_run_loses_nothing(cluster: Cluster, cards) -> None:  # type: ignore[no-untyped-def]
    batch = cluster.two_workers_until_a_quarter_billed(cards[0])
    cluster.proxy.cut()  # every connection reset, new ones refused: answers arrive meanwhile
    time.sleep(8)
    cluster.proxy.heal()
    cluster.wait_final(batch, recovery_bound())
    counts = assert_every_image_billed_once(cluster, batch)
    assert counts == {"succeeded": IMAGES}
    assert cluster.logged("OperationalError, trying again"), cluster.diagnose()  # it did bite


def test_a_killed_worker_main_process_is_taken_over(cluster: Cluster, cards) -> None:  # type: ignore[no-untyped-def]
    folder, _ = cards
    doomed = cluster.worker("w1")
    cluster.worker("w2")
    cluster.beat()
    batch = cluster.scan(folder)
    cluster.wait_billed(IMAGES // 4)
    cluster.busy_pid([doomed.pid])
    kill_group(doomed)  # SIGKILL: no warm shutdown, no acknowledgement, calls cut mid-flight
    cluster.wait_final(batch, recovery_bound())
    counts = assert_every_image_billed_once(cluster, batch)
    with unit_of_work(cluster.db_url, read_only=True) as s:
        lost = s.scalar(select(func.count()).where(Item.reason == repo.UNKNOWN)) or 0
    assert lost <= 4, counts  # at most one call per thread of the killed worker was in flight
    assert cluster.logged("abandoned claims sent for takeover"), cluster.diagnose()


def test_a_killed_prefork_pool_child_is_taken_over(cluster: Cluster, cards) -> None:  # type: ignore[no-untyped-def]
    folder, _ = cards
    parent = cluster.worker("w1", pool="prefork", concurrency=2)
    cluster.worker("w2", concurrency=2)
    cluster.beat()
    batch = cluster.scan(folder)
    cluster.wait_billed(IMAGES // 4)
    kids = children(parent.pid)
    assert len(kids) == 2, "-P prefork was not honoured"
    os.kill(cluster.busy_pid(kids), signal.SIGKILL)
    cluster.wait_final(batch, recovery_bound())
    assert_every_image_billed_once(cluster, batch)
    assert cluster.logged("abandoned claims sent for takeover"), cluster.diagnose()


def test_a_failed_result_write_never_pays_again(cluster: Cluster, cards) -> None:  # type: ignore[no-untyped-def]
    """The database connection dies inside the transaction that stores the answer, five times:
    the answer is kept (journal) and written when the database is back."""
    folder, _ = cards
    engine = create_engine(cluster.db_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text("CREATE SEQUENCE idocr_test_result_faults"))
        c.execute(text("""
            CREATE FUNCTION idocr_test_fail_result() RETURNS trigger AS $$
            BEGIN
              IF nextval('idocr_test_result_faults') <= 5 THEN
                PERFORM pg_terminate_backend(pg_backend_pid());
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql"""))
        c.execute(text("CREATE TRIGGER idocr_test_fail_result BEFORE INSERT ON results "
                       "FOR EACH ROW EXECUTE FUNCTION idocr_test_fail_result()"))
    cluster.worker("w1")
    cluster.beat()
    batch = cluster.scan(folder)
    cluster.wait_final(batch, recovery_bound())
    counts = assert_every_image_billed_once(cluster, batch)
    assert counts == {"succeeded": IMAGES}
    with engine.connect() as c:
        assert c.scalar(text("SELECT last_value FROM idocr_test_result_faults")) > 5  # it did fail
    engine.dispose()


def test_a_quota_pause_resumes_after_a_top_up_with_plain_celery_workers(cluster: Cluster, cards) -> None:  # type: ignore[no-untyped-def]
    folder, _ = cards
    cluster.sandbox.set_quota(IMAGES // 2)
    cluster.worker("w1")
    cluster.beat()  # the balance monitor runs on the control queue the plain worker consumes
    batch = cluster.scan(folder)
    cluster.wait_billed(IMAGES // 2)
    time.sleep(3)
    counts, pending = cluster.counts(batch)
    assert pending == IMAGES // 2 and "failed" not in counts, counts
    cluster.sandbox.add_quota(IMAGES)
    cluster.wait_final(batch, recovery_bound())
    assert assert_every_image_billed_once(cluster, batch) == {"succeeded": IMAGES}


def test_scanning_into_a_batch_again_resends_what_waits(tmp_path: Path, cards) -> None:  # type: ignore[no-untyped-def]
    """`idocr scan SRC --batch B` after the broker lost its messages: what is still queued gets
    a message again (and nothing new is added)."""
    import redis

    folder, _ = cards
    own = OwnRedis(tmp_path / "redis")
    try:
        env = idocr_env(IDOCR_REDIS_URL=own.url, IDOCR_DATA_DIR=str(tmp_path / ".idocr"),
                        IDOCR_PROVIDER="sandbox")

        def scan(*args: str) -> subprocess.CompletedProcess[str]:
            res = subprocess.run([*IDOCR, "scan", str(folder), *args], env=env, capture_output=True,
                                 text=True, timeout=120, cwd=tmp_path, check=False)
            assert res.returncode == 0, res.stderr
            return res

        def queued() -> list[int]:
            """The item ids of the messages waiting (one id, or a list of them, a message)."""
            ids: list[int] = []
            for raw in client.lrange("ocr", 0, -1):
                arg = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
                ids += arg if isinstance(arg, list) else [arg]
            return sorted(ids)

        batch = scan().stdout.strip().splitlines()[-1]
        client = redis.Redis.from_url(own.url)
        waiting = queued()
        assert len(waiting) == IMAGES and client.llen("ocr") < IMAGES  # several items a message
        client.delete("ocr")  # the messages are lost
        res = scan("--batch", batch)
        assert f"{IMAGES} items an earlier run left waiting sent again" in " ".join(res.stderr.split())
        assert queued() == waiting
    finally:
        own.stop()
