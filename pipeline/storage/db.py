"""Engines, sessions and the migrated schema, the same for SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Several worker processes write one SQLite file: WAL lets readers go on while one writes,
    # busy_timeout makes writers wait for each other instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=60000")
    if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
        _switch_to_wal(cur)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
    # Let SQLAlchemy emit BEGIN itself (below); pysqlite's own transaction handling would
    # start deferred transactions that fail instead of waiting when they upgrade to write.
    dbapi_conn.isolation_level = None


@retry(
    retry=retry_if_exception(
        lambda e: isinstance(e, sqlite3.OperationalError) and "locked" in str(e)
    ),
    wait=wait_random_exponential(multiplier=0.02, max=0.5),
    stop=stop_after_delay(60),
    reraise=True,
)
def _switch_to_wal(cur) -> None:
    # The switch needs the file to itself and SQLite answers "locked" at once, without its busy
    # handler, when another connection reads it meanwhile (two commands opening a new database
    # together); it is persistent, so it is done once per file and retried until it is.
    cur.execute("PRAGMA journal_mode=WAL")


def _sqlite_begin(conn) -> None:
    # Writers take the lock up front (a deferred transaction that upgrades fails instead of
    # waiting); readers do not take it at all, so polling and exports never block workers.
    if conn.get_execution_options().get("idocr_read_only"):
        conn.exec_driver_sql("BEGIN DEFERRED")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _drop_row_details(context) -> None:
    # PostgreSQL's DETAIL line quotes the row or key a constraint refused ("Failing row
    # contains (…)", "Key (source_key)=(…) already exists"): the values hide_parameters hides.
    # It is dropped from both the driver's and SQLAlchemy's message (found by its text, as the
    # server may word "DETAIL" in another language); code that needs it still has
    # ``orig.diag.message_detail``.
    diag = getattr(context.original_exception, "diag", None)
    detail = getattr(diag, "message_detail", None)
    for exc in (context.original_exception, context.sqlalchemy_exception):
        if exc is not None and exc.args and isinstance(exc.args[0], str):
            kept = [
                line
                for line in exc.args[0].split("\n")
                if not line.startswith("DETAIL:") and not (detail and detail in line)
            ]
            exc.args = ("\n".join(kept), *exc.args[1:])


def make_engine(url: str) -> Engine:
    # hide_parameters: a failed statement's exception (and so any log line or stored message
    # quoting it) shows the SQL without its bound values, which are names, addresses and ID
    # numbers when the statement writes a result.
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # No pre-ping (a round trip before every transaction): a connection the server dropped
    # fails its statement with an error the callers treat as transient and retry
    # (pipeline.coordination.resilience), on a fresh connection since the pool invalidates the
    # dead one.
    engine = create_engine(
        url, pool_size=10, max_overflow=10, pool_recycle=1800, hide_parameters=True
    )
    event.listen(engine, "handle_error", _drop_row_details)
    return engine


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    return make_engine(url)


@lru_cache(maxsize=16)
def session_factory(
    url: str, read_only: bool = False, single: bool = False
) -> sessionmaker[Session]:
    engine = engine_for(url)
    options: dict[str, object] = {}
    if read_only:
        options["idocr_read_only"] = True
    if single and engine.dialect.name == "postgresql":
        # one statement is atomic on its own: no BEGIN and COMMIT round trips around it
        options["isolation_level"] = "AUTOCOMMIT"
    if options:
        engine = engine.execution_options(**options)
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(url: str, read_only: bool = False, single: bool = False) -> Iterator[Session]:
    """The one place that commits: services and tasks work inside it and never commit.
    ``read_only``: nothing will be written (on SQLite: no write lock is taken). ``single``:
    the unit is one statement, which then runs on its own, outside a transaction, on
    PostgreSQL (the worker's hot-path look-ups and its answer write)."""
    with session_factory(url, read_only, single)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@lru_cache(maxsize=8)
def _autocommit_engine(url: str) -> Engine:
    return engine_for(url).execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def one_statement(url: str) -> Iterator[Connection]:
    """PostgreSQL: a pooled connection for one statement that runs on its own, outside a
    transaction, with no ORM session around it (the worker's claims and answers: the Core
    statements of :mod:`pipeline.storage.repo` take it where they take a session)."""
    with _autocommit_engine(url).connect() as conn:
        yield conn


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent; concurrent callers are serialised)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine_for(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def ensure_schema(url: str) -> None:
    if current_revision(url) != head_revision():
        upgrade(url)
