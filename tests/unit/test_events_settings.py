"""Settings of the events outbox and the schedules: the webhook secret from the environment
only, a webhook URL needs its secret, schedules validated where they are written."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, Settings
from pipeline.outputs.events import Outbox


def test_webhook_secret_refused_in_a_profile(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = clean_env / "p.toml"
    profile.write_text('webhook_url = "https://example.test/hook"\nwebhook_secret = "s3cr3t-value"\n')
    monkeypatch.setenv("IDOCR_CONFIG", str(profile))
    with pytest.raises(ConfigError, match="environment only") as exc:
        Settings()
    assert "s3cr3t-value" not in str(exc.value)


def test_webhook_url_needs_the_secret(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDOCR_WEBHOOK_URL", "https://example.test/hook")
    with pytest.raises(ValueError, match="IDOCR_WEBHOOK_SECRET"):
        Settings()
    monkeypatch.setenv("IDOCR_WEBHOOK_SECRET", "s3cr3t-value")
    s = Settings()
    assert Outbox.from_settings(s).webhook
    assert "s3cr3t-value" not in repr(s) and "s3cr3t-value" not in str(s.model_dump())
    monkeypatch.delenv("IDOCR_WEBHOOK_URL")
    assert not Outbox.from_settings(Settings()).webhook


def test_schedules_from_a_profile(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = clean_env / "p.toml"
    profile.write_text(
        '[[schedules]]\nname = "nightly"\nsource = "/srv/scans"\ncron = "0 2 * * *"\n'
        'batch = "nightly-{date:%Y%m%d}"\n'
    )
    monkeypatch.setenv("IDOCR_CONFIG", str(profile))
    [spec] = Settings().schedules
    assert (spec.name, spec.source, spec.cron, spec.via) == ("nightly", "/srv/scans", "0 2 * * *", "bytes")


@pytest.mark.parametrize(
    "body, message",
    [
        ('name = "n"\nsource = "/s"\ncron = "every night"\n', "cron"),
        ('name = "n"\nsource = "/s"\ncron = "0 2 * * *"\nbatch = "{nope}"\n', "batch"),
        ('name = "n n"\nsource = "/s"\ncron = "0 2 * * *"\n', "name"),
    ],
)
def test_bad_schedules_refused(clean_env: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str) -> None:
    profile = clean_env / "p.toml"
    profile.write_text("[[schedules]]\n" + body)
    monkeypatch.setenv("IDOCR_CONFIG", str(profile))
    with pytest.raises(ValueError, match=message):
        Settings()


def test_two_schedules_with_one_name_refused(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = clean_env / "p.toml"
    one = '[[schedules]]\nname = "n"\nsource = "/s"\ncron = "0 2 * * *"\n'
    profile.write_text(one + one)
    monkeypatch.setenv("IDOCR_CONFIG", str(profile))
    with pytest.raises(ValueError, match="name of its own"):
        Settings()
