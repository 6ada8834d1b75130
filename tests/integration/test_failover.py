"""A failover chain (IDOCR_PROVIDERS=ihuyi,showapi): while the first provider is paused the
work goes to the next, nothing is lost or sent twice, each result names who answered, and new
work returns to the first once it is resumed. Two sandboxes over real HTTP: one per account."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.workflows import control
from pipeline.config import Settings
from pipeline.runtime import build_processor
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Attempt, Result
from tests.conftest import EXAMPLES
from tests.integration.test_pipeline import scan_into


def chain_settings(db_url: str, redis_url: str, first, second, tmp_path: Path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        providers=["ihuyi", "showapi"], database_url=db_url, redis_url=redis_url,
        data_dir=tmp_path / ".idocr", ihuyi_account="sandbox", ihuyi_api_key="sandbox-key",
        ihuyi_base_url=first.url, showapi_app_key="sandbox-appkey", showapi_base_url=second.url,
        rate_limit=1000, rate_burst=10, retry_initial=0.01, retry_max=0.02, max_attempts=3,
    )


def test_the_chain_is_read_from_the_environment(clean_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IDOCR_PROVIDERS", "ihuyi, local")
    s = Settings()
    assert s.chain == ["ihuyi", "local"] and s.resolved_provider == "ihuyi"
    with pytest.raises(ValueError, match="IDOCR_PROVIDERS|providers"):
        Settings(providers="ihuyi,nosuch")


def test_work_fails_over_while_the_first_is_paused_and_comes_back(db_url: str, redis_url: str, tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    first = sandbox_factory(quota=2)  # ihuyi's account: two calls left
    second = sandbox_factory()  # showapi's account
    folder = tmp_path / "in"
    shutil.copytree(EXAMPLES / "images", folder)
    sent, _ = scan_into(db_url, folder)
    settings = chain_settings(db_url, redis_url, first, second, tmp_path)
    proc = build_processor(settings)
    assert [proc.provider.name, proc.fallback.provider.name] == ["ihuyi", "showapi"]  # type: ignore[union-attr]

    half = len(sent) // 2
    statuses = [proc.process(i) for i in sent[:half]]
    assert "paused" not in statuses and "queued" not in statuses  # none parked, none lost
    with unit_of_work(db_url) as s:
        assert repo.open_pause(s, "ihuyi", "sandbox").kind == "quota"
        by = dict(s.execute(select(Result.item_id, Result.provider)).all())
    # two answered by the first account, the rest by the second after the refusal
    assert sorted(by.values()).count("ihuyi") == 2
    assert "showapi" in by.values()

    first.add_quota(100)  # topped up, and resumed (the balance monitor would do it)
    control.resume(settings, "ihuyi", "sandbox", enqueue=lambda ids: None, broadcast=None)
    rest = [proc.process(i) for i in sent[half:]]
    assert "paused" not in rest and "queued" not in rest
    with unit_of_work(db_url) as s:
        later = dict(s.execute(select(Result.item_id, Result.provider)
                               .where(Result.item_id.in_(sent[half:]))).all())
        refused_once = s.scalar(select(Attempt.id).where(Attempt.code == "4051"))
    assert set(later.values()) == {"ihuyi"}  # new work went back to the first
    assert refused_once is not None
    # nothing billed twice across the two accounts
    billed: dict[str, int] = {}
    for sandbox in (first, second):
        for sha, n in sandbox.stats.billed_by_sha.items():
            billed[sha] = billed.get(sha, 0) + n
    assert set(billed.values()) == {1}
    with unit_of_work(db_url) as s:
        assert sum(billed.values()) == len(list(s.scalars(select(Result.item_id))))
