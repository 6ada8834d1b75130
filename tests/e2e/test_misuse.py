"""Every misuse a user can make is answered up front: one line on stderr, the documented exit
code (1 configuration or source, 2 usage), no traceback, nothing scanned, no secret echoed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, IDOCR, idocr_env

ID_NUMBER = "11010119900307001X"


def idocr(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IDOCR, *args], env=idocr_env(**env), cwd=cwd, capture_output=True, text=True, timeout=120
    )


def one_line_error(res: subprocess.CompletedProcess[str], code: int) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [
        ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("Usage:", "Try "))
    ]
    assert len(errors) == 1, res.stderr
    return errors[0]


def no_batches(cwd: Path) -> None:
    res = idocr("status", "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["batch"] is None


@pytest.mark.parametrize("command", ["run", "scan"])
def test_via_url_with_a_folder_is_refused_before_scanning(tmp_path: Path, command: str) -> None:
    line = one_line_error(idocr(command, str(EXAMPLES / "images"), "--via", "url", cwd=tmp_path), 2)
    assert "--via url" in line and "s3://" in line
    no_batches(tmp_path)


def test_zero_concurrency_is_refused(tmp_path: Path) -> None:
    line = one_line_error(idocr("run", str(EXAMPLES / "images"), "-c", "0", cwd=tmp_path), 2)
    assert "--concurrency" in line
    line = one_line_error(idocr("status", cwd=tmp_path, IDOCR_CONCURRENCY="0"), 1)
    assert "IDOCR_CONCURRENCY" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://idocr:s3cret-pw@db/idocr", "SQLite or PostgreSQL"),
        ("postgresql+psycopg2://idocr:s3cret-pw@db/idocr", "driver 'psycopg2'"),
        ("postgresql+psycopg://idocr:s3cret-pw@db:notaport/idocr", "is not a database URL"),
    ],
)
def test_a_bad_database_url_names_the_variable_not_the_password(
    tmp_path: Path, url: str, expected: str
) -> None:
    line = one_line_error(idocr("status", cwd=tmp_path, IDOCR_DATABASE_URL=url), 1)
    assert "IDOCR_DATABASE_URL" in line and expected in line
    assert "s3cret-pw" not in line


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    # a port nothing listens on (the PostgreSQL under test is on 5432)
    url = "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=3"
    line = one_line_error(idocr("status", cwd=tmp_path, IDOCR_DATABASE_URL=url), 1)
    assert "IDOCR_DATABASE_URL" in line


def test_an_unknown_provider_lists_the_choices_without_a_pydantic_dump(tmp_path: Path) -> None:
    line = one_line_error(idocr("status", cwd=tmp_path, IDOCR_PROVIDER="nosuch"), 1)
    assert line.startswith("Error: configuration: IDOCR_PROVIDER: must be")
    assert "sandbox" in line and "http" not in line and "validation error" not in line


def test_status_of_an_unknown_batch_fails(tmp_path: Path) -> None:
    line = one_line_error(idocr("status", "nosuchbatch", cwd=tmp_path), 1)
    assert "no batch 'nosuchbatch'" in line
    one_line_error(idocr("status", "nosuchbatch", "--json", cwd=tmp_path), 1)


def test_an_id_number_in_a_path_is_masked_in_the_error(tmp_path: Path) -> None:
    line = one_line_error(idocr("run", str(tmp_path / ID_NUMBER), cwd=tmp_path), 1)
    assert ID_NUMBER not in line and "110101********001X" in line


def test_migrate_says_what_it_did(tmp_path: Path) -> None:
    res = idocr("migrate", cwd=tmp_path)
    assert res.returncode == 0 and "schema created" in res.stderr, res.stderr
    res = idocr("migrate", cwd=tmp_path)
    assert res.returncode == 0 and "schema is up to date" in res.stderr, res.stderr


def test_excel_needs_csv(tmp_path: Path) -> None:
    line = one_line_error(idocr("export", "--format", "jsonl", "--excel", cwd=tmp_path), 2)
    assert "--format csv" in line
