"""Shared fixtures: real databases (SQLite file, PostgreSQL), real Redis, the sandbox.

PostgreSQL: one migrated template database per session; every test that asks for it gets a
fresh copy (CREATE DATABASE … TEMPLATE), dropped afterwards (``IDOCR_TEST_PG_URL``: the
server and the database to connect to for that). Redis: a database this session found empty
and marked as its own (``tests/redisdb.py``; ``IDOCR_TEST_REDIS_URL`` names the server or one
database), flushed before each test that uses it and never one without that mark. Both servers
must be running (CI starts them): a test that needs one fails rather than skips when it is down.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from pipeline.config import reset_settings
from pipeline.storage.crypto import new_key_entry
from pipeline.storage.db import upgrade
from tests.redisdb import OwnedRedisDb
from tests.s3server import s3_bucket_fixture, s3_server_fixture  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Every test runs with personal data encrypted at rest (PostgreSQL refuses to start without a
# key); tests of the unencrypted embedded mode or of other keys set IDOCR_DATA_KEYS themselves.
TEST_DATA_KEYS = os.environ.get("IDOCR_TEST_DATA_KEYS") or new_key_entry("test")
os.environ["IDOCR_DATA_KEYS"] = TEST_DATA_KEYS
PG_ADMIN_URL = os.environ.get("IDOCR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_url(db: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{db}"


def _pg_admin():  # type: ignore[no-untyped-def]
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"idocr_tpl_{os.getpid()}_{secrets.token_hex(3)}"
    admin = _pg_admin()
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - the environment, not the code
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not usable: {exc}")
    url = _pg_url(name)
    upgrade(url)
    from pipeline.storage.db import engine_for

    engine_for(url).dispose()
    yield name
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    name = f"idocr_t_{os.getpid()}_{secrets.token_hex(4)}"
    admin = _pg_admin()
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    url = _pg_url(name)
    yield url
    from pipeline.storage.db import engine_for

    engine_for(url).dispose()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'idocr.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty database: the test runs once on each backend."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def redis_owner() -> Iterator[OwnedRedisDb]:
    """The Redis database this session took (found empty, marked as its own); emptied and
    unmarked at the end."""
    owned = OwnedRedisDb()
    try:
        owned.claim()
    except redis.RedisError as exc:  # pragma: no cover - the environment
        pytest.fail(f"Redis is not usable: {exc}")
    yield owned
    owned.release()


@pytest.fixture(scope="session")
def redis_db_url(redis_owner: OwnedRedisDb) -> str:
    """This session's Redis database, not flushed between tests: for tests that keep to key
    names of their own."""
    assert redis_owner.url is not None
    return redis_owner.url


@pytest.fixture
def redis_url(redis_owner: OwnedRedisDb) -> Iterator[str]:
    """This session's Redis database, empty at the start of the test and emptied after it."""
    redis_owner.flush()
    assert redis_owner.url is not None
    yield redis_owner.url
    redis_owner.flush()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No IDOCR_* from the outside; a fresh data dir; settings re-read."""
    for k in list(os.environ):
        if k.startswith("IDOCR_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("IDOCR_DATA_DIR", str(tmp_path / ".idocr"))
    monkeypatch.setenv("IDOCR_DATA_KEYS", TEST_DATA_KEYS)
    reset_settings()
    yield tmp_path
    reset_settings()


@pytest.fixture
def sandbox_factory():  # type: ignore[no-untyped-def]
    """Start sandboxes (real HTTP on 127.0.0.1) answering from the examples' truth."""
    from idocr_sandbox.server import SandboxConfig, SandboxServer
    from idocr_sandbox.truth import TruthIndex

    started = []

    def make(truth: TruthIndex | None = None, **config: object) -> SandboxServer:
        index = truth if truth is not None else TruthIndex.load(EXAMPLES / "truth.json")
        server = SandboxServer(index, SandboxConfig(**config))  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


def idocr_env(**extra: str) -> dict[str, str]:
    """The environment for an `idocr` subprocess: ours minus IDOCR_*, plus the suite's data
    key (``IDOCR_DATA_KEYS=""`` in ``extra`` runs it without one), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDOCR_")}
    env["IDOCR_DATA_KEYS"] = TEST_DATA_KEYS
    env.update(extra)
    return env


IDOCR = [sys.executable, "-m", "pipeline.cli"]
