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


def _sqlite_batch(tmp_path: Path, final: bool) -> str:
    from pipeline.storage import repo
    from pipeline.storage.db import unit_of_work, upgrade
    from pipeline.storage.models import ItemStatus

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    status = ItemStatus.REJECTED if final else ItemStatus.QUEUED
    with unit_of_work(url) as s:
        repo.get_or_create_batch(s, "w1", "/in/", "sandbox")
        repo.add_items(s, "w1", [repo.NewItem("a.jpg", "file:///in/a.jpg", "k:a", status=status)])
    return url


def test_status_json_is_one_object_on_stdout(tmp_path: Path) -> None:
    url = _sqlite_batch(tmp_path, final=True)
    res = idocr("status", "--json", cwd=tmp_path, IDOCR_DATABASE_URL=url)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["batch"] == "w1" and doc["items"]["by_status"] == {"rejected": 1}
    assert doc["items"]["final"] is True and doc["eta_seconds"] == 0.0
    res = idocr("status", cwd=tmp_path, IDOCR_DATABASE_URL=url)
    assert "every item is final" in res.stdout and not res.stderr.strip(), res.stderr


def test_status_watch_ends_when_every_item_is_final_and_redraws_until_then(tmp_path: Path) -> None:
    url = _sqlite_batch(tmp_path, final=True)
    res = idocr("status", "--watch", "0.2", "--json", cwd=tmp_path, IDOCR_DATABASE_URL=url)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 1, res.stdout + res.stderr
    (tmp_path / "pending").mkdir()
    url = _sqlite_batch(tmp_path / "pending", final=False)
    with pytest.raises(subprocess.TimeoutExpired) as info:
        subprocess.run(
            [*IDOCR, "status", "--watch", "0.2", "--json"],
            cwd=tmp_path,
            timeout=6,
            env=idocr_env(IDOCR_DATABASE_URL=url),
            capture_output=True,
            text=True,
        )
    lines = (info.value.stdout or b"").splitlines()
    assert len(lines) >= 2, lines  # still pending: redrawn, not ended
    assert all(json.loads(ln)["items"]["pending"] == 1 for ln in lines)
