"""A failed statement's error carries no bound value: the values are names, addresses and ID
numbers when the statement writes a result, and errors end up in logs and stored messages."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from pipeline.storage.db import engine_for

PERSON = {
    "name": "张三",
    "latin": "Zhang San",
    "domicile": "北京市东城区某某街道1号",
    "dob": "1990-03-07",
    "id_number": "110101199003070011",
}


def _error(db_url: str, statement: str, params: dict[str, object]) -> DBAPIError:
    with engine_for(db_url).connect() as conn:
        with pytest.raises(DBAPIError) as info:
            conn.execute(text(statement), params)
    return info.value


def _assert_no_values(exc: BaseException) -> None:
    shown = f"{exc}\n{exc!r}\n{getattr(exc, 'orig', '')}"
    for value in PERSON.values():
        assert value not in shown
    assert "Zhang" not in shown


def test_failed_statement_shows_no_parameters(db_url: str) -> None:
    exc = _error(
        db_url,
        "INSERT INTO no_such_table VALUES (:name, :latin, :domicile, :dob, :id_number)",
        PERSON,
    )
    assert "no_such_table" in str(exc)  # the statement is still there to debug with
    assert "parameters hidden" in str(exc)
    _assert_no_values(exc)


def test_constraint_violation_does_not_quote_the_row(db_url: str) -> None:
    with engine_for(db_url).begin() as conn:
        conn.execute(text("CREATE TABLE person_t (name TEXT NOT NULL, id_number TEXT UNIQUE)"))
        conn.execute(text("INSERT INTO person_t VALUES (:name, :id_number)"), PERSON)
    # PostgreSQL's DETAIL would say "Key (id_number)=(110101…) already exists" ...
    exc = _error(db_url, "INSERT INTO person_t VALUES (:latin, :id_number)", PERSON)
    assert "unique" in str(exc).lower()
    _assert_no_values(exc)
    # ... and "Failing row contains (…)" for a missing value.
    exc = _error(db_url, "INSERT INTO person_t (id_number) VALUES (:dob || :domicile)", PERSON)
    assert "null" in str(exc).lower()
    _assert_no_values(exc)
