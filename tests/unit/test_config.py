from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, Settings


def test_embedded_defaults(clean_env: Path) -> None:
    s = Settings()
    assert s.resolved_provider == "local"  # the local OCR engine: no account needed
    assert s.embedded_redis
    assert s.resolved_database_url == f"sqlite:///{(clean_env / '.idocr' / 'idocr.db').resolve()}"


def test_ihuyi_is_chosen_when_its_credentials_are_set(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDOCR_IHUYI_ACCOUNT", "acct")
    monkeypatch.setenv("IDOCR_IHUYI_API_KEY", "k")
    assert Settings().resolved_provider == "ihuyi"
    monkeypatch.setenv("IDOCR_PROVIDER", "sandbox")
    assert Settings().resolved_provider == "sandbox"


def test_showapi_is_chosen_by_its_key_and_the_sandbox_only_explicitly(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDOCR_SHOWAPI_APP_KEY", "k")
    assert Settings().resolved_provider == "showapi"
    monkeypatch.delenv("IDOCR_SHOWAPI_APP_KEY")
    monkeypatch.setenv("IDOCR_SANDBOX_URL", "http://127.0.0.1:1")
    assert Settings().resolved_provider == "local"
    monkeypatch.setenv("IDOCR_PROVIDER", "sandbox")
    assert Settings().resolved_provider == "sandbox"


def test_profile_then_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = clean_env / "p.toml"
    profile.write_text('rate_limit = 7.5\nqueue = "nightly"\n')
    monkeypatch.setenv("IDOCR_CONFIG", str(profile))
    assert (Settings().rate_limit, Settings().queue) == (7.5, "nightly")
    monkeypatch.setenv("IDOCR_RATE_LIMIT", "20")
    assert Settings().rate_limit == 20.0


def test_a_profile_may_not_hold_secrets(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = clean_env / "p.toml"
    profile.write_text('ihuyi_api_key = "abc"\n')
    monkeypatch.setenv("IDOCR_CONFIG", str(profile))
    with pytest.raises(ConfigError, match="environment only"):
        Settings()


def test_shipped_profiles_load(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("default", "production"):
        monkeypatch.setenv("IDOCR_CONFIG", str(root / "configs" / f"{name}.toml"))
        Settings()


def test_secret_is_not_printed(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDOCR_IHUYI_API_KEY", "very-secret")
    s = Settings()
    assert "very-secret" not in repr(s) and "very-secret" not in str(s.model_dump())


def test_nonsense_is_refused(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDOCR_RATE_LIMIT", "0")
    with pytest.raises(ValueError, match="IDOCR_RATE_LIMIT"):
        Settings()
