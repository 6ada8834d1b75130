"""The schema exists only through migrations: they must match the models, and go both ways."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pipeline.storage.db import alembic_config, current_revision, engine_for, head_revision
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
