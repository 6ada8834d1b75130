"""The recovery settings are checked together, and the Celery app serves every queue it routes
to with the pool the command line chose."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, Settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"claim_lease": 2}, "IDOCR_CLAIM_LEASE must be at least 4"),
        ({"claim_lease": 30, "reconcile_interval": 31}, "IDOCR_RECONCILE_INTERVAL must be positive and at most"),
        ({"reconcile_interval": -1}, "IDOCR_RECONCILE_INTERVAL"),
        ({"claim_lease": 120, "broker_visibility_timeout": 60}, "IDOCR_BROKER_VISIBILITY_TIMEOUT must be at least"),
        ({"infra_retry_for": 0}, "IDOCR_INFRA_RETRY_FOR"),
    ],
)
def test_incoherent_recovery_settings_are_refused(clean_env, values: dict[str, float], message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ConfigError, ValueError), match=message):
        Settings(**values)


def test_the_defaults_are_coherent(clean_env) -> None:  # type: ignore[no-untyped-def]
    s = Settings()
    assert s.heartbeat_interval * 4 == s.claim_lease == 60
    assert (s.reconcile_interval, s.broker_visibility_timeout) == (15, 3600)
    assert s.resend_unknown is False


@pytest.mark.parametrize(("lease", "interval", "visibility"), [(10, 5, 3600), (8, 4, 3600), (7200, 15, 7200)])
def test_unset_values_follow_a_lease_set_alone(clean_env, monkeypatch: pytest.MonkeyPatch, lease: float, interval: float, visibility: float) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("IDOCR_CLAIM_LEASE", str(lease))
    s = Settings()
    assert (s.reconcile_interval, s.broker_visibility_timeout) == (interval, visibility)


@pytest.mark.parametrize(
    ("argv", "given"),
    [
        (["celery", "-A", "workers.app", "worker"], False),
        (["celery", "-A", "workers.app", "worker", "-P", "prefork"], True),
        (["celery", "-A", "workers.app", "worker", "-Pprefork"], True),
        (["celery", "worker", "--pool=threads"], True),
        (["celery", "worker", "--pool", "gevent"], True),
        (["celery", "-A", "workers.app", "beat"], False),
    ],
)
def test_a_pool_given_on_the_command_line_wins(argv: list[str], given: bool) -> None:
    from workers.app import _pool_given

    assert _pool_given(argv) is given


def test_a_plain_worker_consumes_the_control_queue_and_beat_reconciles() -> None:
    from workers.app import CONTROL_QUEUE, app, settings

    assert {q.name for q in app.conf.task_queues} == {settings.queue, CONTROL_QUEUE}
    routes = app.conf.task_routes
    assert routes["idocr.reconcile"]["queue"] == routes["idocr.balance.*"]["queue"] == CONTROL_QUEUE
    schedule = app.conf.beat_schedule
    assert schedule["reconcile"]["task"] == "idocr.reconcile"
    assert schedule["reconcile"]["schedule"] == settings.reconcile_interval
    assert app.conf.broker_transport_options["visibility_timeout"] == settings.broker_visibility_timeout
