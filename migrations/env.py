"""Alembic environment: the URL comes from the caller or from idocr's settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from pipeline.storage.db import make_engine
from pipeline.storage.models import Base

config = context.config
target_metadata = Base.metadata

# Serialises concurrent upgrades (several workers starting at once against one PostgreSQL).
_PG_LOCK_ID = 0x1D0C_0001


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from pipeline.config import get_settings

        url = get_settings().resolved_database_url
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
