"""What the pipeline benchmarks share: the sandbox in a process of its own, a throwaway
database, `idocr worker` processes, and reading their memory."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from pipeline.storage.crypto import new_key_entry
from pipeline.storage.db import engine_for, upgrade

IDOCR = [sys.executable, "-m", "pipeline.cli"]
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Personal data is encrypted at rest (PostgreSQL refuses to start without a key): the benchmarks
# measure with a key, theirs or a fresh one, in this process and in every `idocr` they start.
DATA_KEYS = os.environ.get("IDOCR_DATA_KEYS") or new_key_entry("bench")
os.environ["IDOCR_DATA_KEYS"] = DATA_KEYS


class RemoteSandbox:
    """`idocr sandbox` in a process of its own, as an independent provider would be: the
    arrival times it records are not disturbed by the benchmark's own work."""

    def __init__(self, truth: Path, latency: float, *, quota: int = 10**9, port: int = 18765) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._proc = subprocess.Popen(
            [*IDOCR, "sandbox", "--port", str(port), "--truth", str(truth), "--latency", str(latency),
             "--quota", str(quota)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        for _ in range(100):
            try:
                httpx.get(f"{self.url}/_sandbox/health", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit("the sandbox did not start")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_sandbox/stats", params={"calls": 1}, timeout=30).json()

    def billed(self) -> int:
        """The billed calls so far: what a loop waiting for a run to end polls (the whole
        :meth:`stats` grows with every call and would load the sandbox it measures)."""
        return int(httpx.get(f"{self.url}/_sandbox/billed", timeout=30).json()["billed"])

    def add_quota(self, n: int) -> int:
        return httpx.post(f"{self.url}/_sandbox/quota", json={"add": n}, timeout=10).json()["remaining"]

    def stop(self) -> None:
        os.killpg(self._proc.pid, signal.SIGTERM)
        self._proc.wait(timeout=10)


@contextmanager
def database(work: Path, *, sqlite: bool = False, pg_admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A migrated database for one run: a SQLite file, or a PostgreSQL database dropped after."""
    if sqlite:
        url = f"sqlite:///{work / 'bench.db'}"
        upgrade(url)
        yield url
        return
    name = f"idocr_bench_{secrets.token_hex(4)}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def worker_env(sandbox: RemoteSandbox, db_url: str, redis_url: str, work: Path, **settings: str) -> dict[str, str]:
    """The environment of `idocr` commands talking to ``sandbox`` through ihuyi's protocol."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDOCR_")}
    env.update(
        IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url, IDOCR_IHUYI_ACCOUNT="sandbox",
        IDOCR_IHUYI_API_KEY="sandbox-key", IDOCR_DATABASE_URL=db_url, IDOCR_REDIS_URL=redis_url,
        IDOCR_DATA_DIR=str(work / ".idocr"), **{"IDOCR_DATA_KEYS": DATA_KEYS, **settings},
    )
    return env


@contextmanager
def workers(n: int, env: dict[str, str], work: Path, *, beat: bool = False) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` `idocr worker` processes (the first with the beat scheduler if ``beat``), stopped
    on exit; their output goes to ``work/worker<i>.log``."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            cmd = [*IDOCR, "worker", "-n", f"bench{i}@%h", "--loglevel", "WARNING"]
            if beat and i == 0:
                cmd.append("--beat")
            with (work / f"worker{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        yield procs
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


def scan(folder: Path, env: dict[str, str]) -> None:
    res = subprocess.run([*IDOCR, "scan", str(folder)], env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(res.stderr)


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a process and its children, MiB."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total
