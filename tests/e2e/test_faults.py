"""`idocr run` as a user runs it against a misbehaving provider: injected faults (5xx, garbage,
timeouts, transient codes) through both protocols, a wrong showapi key, a signature clock the
provider rejects. The sandbox runs in this process (its stats show what was billed)."""

from __future__ import annotations

import random
from pathlib import Path

from idocr_sandbox.server import FaultPlan
from tests.conftest import EXAMPLES, idocr_env
from tests.e2e.test_cli import TRUTH, assert_exact, export, idocr, ihuyi_env

APPKEY = "sandbox-appkey"  # the sandbox's showapi key (not a secret)
RETRY = {"IDOCR_MAX_ATTEMPTS": "8", "IDOCR_RETRY_INITIAL": "0.05", "IDOCR_RETRY_MAX": "0.2"}


def faults(provider: str) -> FaultPlan:
    """About 20 % of calls answered with a fault; timeouts sleep past IDOCR_HTTP_TIMEOUT=2."""
    codes = {"4010": 0.03, "1": 0.03, "0": 0.03} if provider == "ihuyi" else {"-3": 0.09}
    return FaultPlan(http_500=0.04, garbage=0.04, timeout=0.03, codes=codes, timeout_sleep=2.5)


def seed_meeting_every_fault(plan: FaultPlan, provider: str, calls: int = 7) -> int:
    """A seed whose first ``calls`` requests (a run makes at least one per good image) draw
    every kind of fault in ``plan``: the rate stays about 20 %, and every kind is exercised."""
    want = {"timeout", "http_500", "garbage", "code"}
    for seed in range(100_000):
        rng = random.Random(seed)
        kinds = {f.kind for f, _ in (plan.draw(rng, provider) for _ in range(calls)) if f is not None}
        if kinds >= want:
            return seed
    raise AssertionError("no seed meets every fault kind")


def attempt_outcomes(cwd: Path) -> dict[str, int]:
    """Attempts by outcome, read from the run's embedded SQLite database."""
    from sqlalchemy import func, select

    from pipeline.storage.db import unit_of_work
    from pipeline.storage.models import Attempt

    with unit_of_work(f"sqlite:///{cwd / '.idocr' / 'idocr.db'}") as s:
        return dict(s.execute(select(Attempt.outcome, func.count()).group_by(Attempt.outcome)).all())


def assert_every_fault_kind_met(sandbox, cwd: Path) -> None:  # type: ignore[no-untyped-def]
    kinds = {k.split(":")[0] for k in sandbox.stats.faults}
    assert kinds == {"timeout", "http_500", "garbage", "code"}, sandbox.stats.faults
    outcomes = attempt_outcomes(cwd)
    # a timeout after sending is "unknown" (it may have been billed); the rest are transient
    assert set(outcomes) == {"ok", "transient", "unknown"}, outcomes
    assert outcomes["ok"] == len(TRUTH)


def showapi_env(sandbox, key: str = APPKEY, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return idocr_env(
        IDOCR_PROVIDER="showapi", IDOCR_SHOWAPI_APP_KEY=key, IDOCR_SHOWAPI_BASE_URL=sandbox.url, **extra,
    )


def flat(text: str) -> str:
    """Rich wraps long lines at 80 columns when stderr is not a terminal."""
    return " ".join(text.split())


def assert_billed_once(sandbox) -> None:  # type: ignore[no-untyped-def]
    # No plan here loses an answer after billing, so no image may be billed twice.
    assert sandbox.stats.billed == len(TRUTH)
    assert set(sandbox.stats.billed_by_sha.values()) == {1}


def assert_attempts_bounded(records: dict[str, dict], limit: int) -> int:
    attempts = [r["attempts"] for r in records.values()]
    assert all(a <= limit for a in attempts), attempts
    return sum(attempts)


def test_ihuyi_run_survives_a_fifth_of_calls_failing(tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    plan = faults("ihuyi")
    sandbox = sandbox_factory(faults=plan, seed=seed_meeting_every_fault(plan, "ihuyi"))
    env = ihuyi_env(sandbox, IDOCR_HTTP_TIMEOUT="2", **RETRY)
    res = idocr("run", str(EXAMPLES / "images"), env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    records = export(env, tmp_path)
    assert_exact(records)
    total = assert_attempts_bounded(records, 8)
    assert total == sandbox.stats.by_endpoint["ihuyi.submit"]  # every call recorded as an attempt
    assert total > len(TRUTH)
    assert_every_fault_kind_met(sandbox, tmp_path)
    assert_billed_once(sandbox)


def test_showapi_run_gives_exact_fields_with_and_without_faults(tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean.mkdir()
    faulty.mkdir()
    env = showapi_env(sandbox, IDOCR_HTTP_TIMEOUT="2", **RETRY)

    res = idocr("run", str(EXAMPLES / "images"), env=env, cwd=clean, timeout=120)
    assert res.returncode == 0, res.stderr
    records = export(env, clean)
    assert_exact(records)
    assert {r["provider"] for r in records.values() if r["status"] == "succeeded"} == {"showapi"}
    for rec in records.values():
        if rec["status"] == "succeeded":
            assert rec["code"] == "0" and rec["attempts"] == 1
            assert isinstance(rec["quality"], list) and rec["quality"], rec["quality"]
    assert_billed_once(sandbox)
    assert APPKEY not in res.stderr + res.stdout

    plan = faults("showapi")
    sandbox = sandbox_factory(faults=plan, seed=seed_meeting_every_fault(plan, "showapi"))
    env = showapi_env(sandbox, IDOCR_HTTP_TIMEOUT="2", **RETRY)
    res = idocr("run", str(EXAMPLES / "images"), env=env, cwd=faulty, timeout=120)
    assert res.returncode == 0, res.stderr
    records = export(env, faulty)
    assert_exact(records)
    assert all(isinstance(r["quality"], list) for r in records.values() if r["status"] == "succeeded")
    assert assert_attempts_bounded(records, 8) == sandbox.stats.by_endpoint["showapi.ocr"]
    assert_every_fault_kind_met(sandbox, faulty)
    assert_billed_once(sandbox)


def test_wrong_showapi_key_stops_the_run_and_fails_no_image(tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    sandbox = sandbox_factory()
    env = showapi_env(sandbox, key="a-wrong-appkey", IDOCR_CONCURRENCY="4")
    res = idocr("run", str(EXAMPLES / "images"), env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 3, res.stderr
    msg = flat(res.stderr)
    assert "stopped: showapi refused the account (code -1" in msg and "check the account, key" in msg, msg
    assert "a-wrong-appkey" not in res.stderr + res.stdout
    records = export(env, tmp_path)
    assert not [r for r in records.values() if r["status"] == "failed"]
    assert sandbox.stats.billed == 0
    # Calls already past the gate when the first refusal paused the account still go out (at
    # most one per worker thread); none starts after it.
    assert 1 <= sandbox.stats.by_endpoint["showapi.ocr"] <= 4, sandbox.stats.by_endpoint
    assert "paused (auth)" in idocr("status", env=env, cwd=tmp_path).stdout


def test_a_rejected_signature_time_stops_the_run_with_a_clock_message(tmp_path: Path, sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    # A negative allowed skew: every signed `time` is "expired" (40501), as with a skewed clock.
    sandbox = sandbox_factory(max_clock_skew=-1)
    env = ihuyi_env(sandbox)
    res = idocr("run", str(EXAMPLES / "images"), env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 3, res.stderr
    msg = flat(res.stderr)
    assert "stopped:" in msg and "40501" in msg and "clock is probably skewed" in msg, msg
    records = export(env, tmp_path)
    assert not [r for r in records.values() if r["status"] == "failed"]
    assert sandbox.stats.billed == 0
    assert "paused (clock)" in idocr("status", env=env, cwd=tmp_path).stdout
