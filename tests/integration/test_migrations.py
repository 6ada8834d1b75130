"""The schema exists only through migrations: they must match the models, and go both ways."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pipeline.storage.db import (
    alembic_config,
    current_revision,
    engine_for,
    head_revision,
    make_engine,
)
from pipeline.storage.models import Base


def test_migrations_match_the_models(db_url: str) -> None:
    with engine_for(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert current_revision(db_url) == head_revision()


def test_downgrade_to_base_and_back(db_url: str) -> None:
    from alembic import command

    cfg = alembic_config(db_url)
    command.downgrade(cfg, "base")
    assert current_revision(db_url) is None
    command.upgrade(cfg, "head")
    assert current_revision(db_url) == head_revision()



def test_a_new_sqlite_file_written_by_another_command_still_switches_to_wal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`idocr run` and `idocr status` started at once on a fresh ./.idocr: while one writes the new
    file, the other's switch to WAL is refused at once ("database is locked": SQLite does not use
    its busy handler where waiting could deadlock). The switch waits instead of failing the command."""
    import sqlite3
    import threading

    path = tmp_path / "fresh.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")  # the other command's write transaction (a migration)
    other.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()

    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    other.close()
