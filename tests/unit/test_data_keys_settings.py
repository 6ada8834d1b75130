"""IDOCR_DATA_KEYS in the settings: required for any database but the embedded SQLite, a secret a
profile may not hold, refused when malformed without quoting it; `idocr keys new` works with no
settings at all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, Settings, settings_error_message
from pipeline.storage.crypto import KeyRing, new_key_entry
from tests.conftest import IDOCR, idocr_env

PG = "postgresql+psycopg://u@127.0.0.1:1/db"


def refusal(**kwargs: object) -> str:
    with pytest.raises(ValueError) as exc:
        Settings(**kwargs)  # type: ignore[arg-type]
    return settings_error_message(exc.value)


def test_postgresql_without_a_key_is_refused(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDOCR_DATA_KEYS")
    msg = refusal(database_url=PG)
    assert "IDOCR_DATA_KEYS" in msg and "idocr keys new" in msg
    monkeypatch.setenv("IDOCR_DATA_KEYS", "")
    assert "IDOCR_DATA_KEYS" in refusal(database_url=PG)


def test_sqlite_outside_the_data_dir_without_a_key_is_refused(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDOCR_DATA_KEYS")
    assert "IDOCR_DATA_KEYS" in refusal(database_url=f"sqlite:///{clean_env / 'elsewhere.db'}")


def test_the_embedded_database_may_run_without_a_key(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDOCR_DATA_KEYS")
    s = Settings()
    assert s.embedded_database and not s.encrypts_data
    inside = Settings(database_url=f"sqlite:///{clean_env / '.idocr' / 'other.db'}")
    assert inside.embedded_database


def test_with_a_key_any_database_is_accepted(clean_env: Path) -> None:
    s = Settings(database_url=PG)
    assert s.encrypts_data and not s.embedded_database


def test_a_malformed_key_is_refused_without_quoting_it(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDOCR_DATA_KEYS", "k1:c2hvcnRrZXk=")
    msg = refusal()
    assert "IDOCR_DATA_KEYS" in msg and "k1" in msg and "c2hvcnRrZXk" not in msg


def test_a_profile_may_not_hold_the_keys(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = clean_env / "p.toml"
    profile.write_text(f'data_keys = "{new_key_entry()}"\n')
    monkeypatch.setenv("IDOCR_CONFIG", str(profile))
    with pytest.raises(ConfigError, match="data_keys"):
        Settings()


def test_the_key_is_never_shown_by_the_settings(clean_env: Path) -> None:
    entry = new_key_entry("k")
    s = Settings(data_keys=entry)
    assert entry.split(":")[1] not in repr(s) and entry.split(":")[1] not in str(s.model_dump())


def test_cli_refuses_postgresql_without_a_key_and_keys_new_still_works(tmp_path: Path) -> None:
    env = idocr_env(IDOCR_DATABASE_URL=PG, IDOCR_DATA_KEYS="")
    res = subprocess.run([*IDOCR, "status"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "IDOCR_DATA_KEYS" in res.stderr and "idocr keys new" in res.stderr
    res = subprocess.run([*IDOCR, "keys", "new"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    entry = res.stdout.strip()
    assert KeyRing.parse(entry).enabled and "\n" not in entry
    assert "IDOCR_DATA_KEYS" in res.stderr


def test_module_is_importable_without_a_key() -> None:
    # the suite sets a key at import time: the CLI's own import path must not need one
    env = idocr_env(IDOCR_DATA_KEYS="")
    subprocess.run([sys.executable, "-c", "import pipeline.cli, pipeline.storage.sealed"], env=env, check=True, timeout=60)


def test_run_on_the_embedded_database_says_when_data_is_not_encrypted(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = subprocess.run([*IDOCR, "run", "empty"], env=idocr_env(IDOCR_DATA_KEYS="", IDOCR_PROVIDER="sandbox"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert "IDOCR_DATA_KEYS is not set" in res.stderr and "unencrypted" in res.stderr
    res = subprocess.run([*IDOCR, "run", "empty"], env=idocr_env(IDOCR_PROVIDER="sandbox"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert "unencrypted" not in res.stderr
