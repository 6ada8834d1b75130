"""Pause, resume and the balance monitor.

A pause is a row in SQL (kind, reason, time), per provider account: the record every worker
reads before it spends quota, and what `idocr status` shows. Pausing never fails an item: an
item that finds the gate closed goes to ``paused`` and is re-enqueued by the resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.coordination.gate import PauseSignal
from pipeline.coordination.quota import QuotaLedger
from pipeline.coordination.ratelimit import RateLimiter, provider_limiter
from pipeline.coordination.redisconn import redis_client
from pipeline.outputs.events import QUEUE_PAUSED, QUEUE_RESUMED, Outbox, pause_data
from pipeline.providers.base import BalanceError, Outcome, Provider
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Pause

log = logging.getLogger(__name__)

Enqueue = Callable[[Sequence[int]], None]
Broadcast = Callable[[bool], None]


def current_pause(settings: Settings, provider: str, account: str) -> Pause | None:
    with unit_of_work(settings.resolved_database_url, read_only=True) as s:
        return repo.open_pause(s, provider, account)


def _signal(settings: Settings, provider: str, account: str) -> None:
    """Tell every worker the pause state changed (they read it from SQL again)."""
    try:
        PauseSignal(redis_client(settings), provider, account).bump()
    except Exception as exc:  # they read SQL within a second anyway
        log.warning("pause signal not sent (%s)", type(exc).__name__)


def pause(
    settings: Settings,
    provider: str,
    account: str,
    kind: str,
    reason: str,
    broadcast: Broadcast | None = None,
) -> Pause:
    with unit_of_work(settings.resolved_database_url) as s:
        if repo.open_pause(s, provider, account) is None:  # the event opens with the pause
            data = pause_data(provider, account, kind, reason)
            Outbox.from_settings(settings).emit(s, QUEUE_PAUSED, data=data)
        p = repo.add_pause(s, provider, account, kind, reason)
    _signal(settings, provider, account)
    log.warning("submissions to %s paused (%s): %s", provider, kind, reason)
    # with a failover chain the workers go on with the next provider: they keep consuming
    if broadcast is not None and len(settings.chain) == 1:
        broadcast(False)
    return p


def resume(
    settings: Settings,
    provider: str,
    account: str,
    by: str = "operator",
    *,
    enqueue: Enqueue,
    broadcast: Broadcast | None = None,
) -> int:
    """Close the pause and re-enqueue the items it parked; returns how many."""
    url = settings.resolved_database_url
    with unit_of_work(url) as s:
        if repo.close_pauses(s, provider, account, by):
            Outbox.from_settings(settings).emit(
                s, QUEUE_RESUMED, data={"provider": provider, "account": account, "by": by}
            )
    _signal(settings, provider, account)
    if broadcast is not None:
        broadcast(True)
    total = 0
    while True:
        with unit_of_work(url) as s:
            ids = repo.unpause_items(s, provider, limit=1000)
        if not ids:
            break
        enqueue(ids)  # after the commit, like the producer
        total += len(ids)
    log.info("submissions to %s resumed by %s; %d items re-enqueued", provider, by, total)
    return total


@dataclass(slots=True)
class BalanceReport:
    remaining: int | None
    reserved: int
    action: str  # "none" | "paused" | "resumed" | "error"
    detail: str = ""


def _balance(provider: Provider, limiter: RateLimiter | None = None) -> int | None:
    """``provider.balance()``; a rejected signature time (40501) is re-signed once with a fresh
    time first, the same rule a submit follows, so one slow request does not pause the queue.
    Each query takes a slot of the account's rate like a submission: the provider counts
    every request."""
    if not getattr(provider, "has_balance", True):
        return provider.balance()  # no request is made
    for attempt in (1, 2):
        if limiter is not None:
            limiter.acquire()
        try:
            return provider.balance()
        except BalanceError as exc:
            if exc.result.outcome is not Outcome.CLOCK or attempt == 2:
                raise
    return None


def balance_due(settings: Settings, provider: Provider, now: float | None = None) -> bool:
    """Whether the balance monitor should read the balance now: every
    ``IDOCR_BALANCE_INTERVAL``, and every ``IDOCR_BALANCE_INTERVAL_PAUSED`` while a quota pause
    waits for a top-up (a reading is free; a paused run should not wait a minute to go on)."""
    pause_open = current_pause(settings, provider.name, provider.account)
    if pause_open is not None and pause_open.kind == "quota":
        return True
    ledger = QuotaLedger(redis_client(settings), provider.name, provider.account)
    taken = ledger.snapshot().reading_at
    # a little early rather than a whole beat late: beats and readings do not line up exactly
    slack = min(settings.balance_interval, settings.balance_interval_paused) / 2
    return taken is None or (now or time.time()) - taken >= settings.balance_interval - slack


def check_balance(
    settings: Settings,
    provider: Provider,
    enqueue: Enqueue,
    broadcast: Broadcast | None = None,
) -> BalanceReport:
    """One balance reading: stored in SQL and in the Redis ledger; pauses below the low
    watermark, resumes a quota pause once the quota is back above the resume watermark.

    With no pause open, it also tells every worker to consume the OCR queue: the broadcasts
    are fire-and-forget, and a worker that missed the last resume would otherwise stay idle."""
    report = _check_balance(settings, provider, enqueue, broadcast)
    if (
        broadcast is not None
        and report.action != "paused"
        and current_pause(settings, provider.name, provider.account) is None
    ):
        broadcast(True)
    return report


def _check_balance(
    settings: Settings, provider: Provider, enqueue: Enqueue, broadcast: Broadcast | None
) -> BalanceReport:
    ledger = QuotaLedger(
        redis_client(settings),
        provider.name,
        provider.account,
        low_watermark=settings.quota_low_watermark,
    )
    mark = ledger.billed_mark()  # calls committed while the query is under way are subtracted

    limiter = provider_limiter(settings, provider)
    try:
        remaining = _balance(provider, limiter)
    except BalanceError as exc:
        r = exc.result
        if r.outcome in (Outcome.AUTH, Outcome.CLOCK):
            reason = (
                f"{provider.name} balance query rejected the signature time "
                f"(code {r.code} {r.msg}): "
                "this machine's clock is probably skewed; fix the clock (NTP), then `idocr resume`"
                if r.outcome is Outcome.CLOCK
                else f"{provider.name} balance query refused (code {r.code} {r.msg}): "
                "check the account and key"
            )
            pause(settings, provider.name, provider.account, r.outcome.value, reason, broadcast)
            return BalanceReport(None, 0, "paused", f"code {r.code} {r.msg}")
        return BalanceReport(None, 0, "error", f"code {r.code} {r.msg}")
    if remaining is None:
        return BalanceReport(None, 0, "none", "the provider has no balance query")
    url = settings.resolved_database_url
    with unit_of_work(url) as s:
        repo.add_balance_reading(s, provider.name, provider.account, remaining)
    ledger.record_reading(remaining, billed_since=mark)
    snap = ledger.snapshot()
    open_p = current_pause(settings, provider.name, provider.account)
    if snap.available is not None and snap.available <= settings.quota_low_watermark:
        if open_p is None:
            pause(
                settings,
                provider.name,
                provider.account,
                "quota",
                f"{provider.name} quota low: {remaining} calls left "
                f"(low watermark {settings.quota_low_watermark}); top up to resume",
                broadcast,
            )
            return BalanceReport(remaining, snap.reserved, "paused")
        return BalanceReport(remaining, snap.reserved, "none", "still paused")
    if (
        open_p is not None
        and open_p.kind == "quota"
        and remaining >= settings.quota_resume_watermark
    ):
        n = resume(
            settings,
            provider.name,
            provider.account,
            by="balance-monitor",
            enqueue=enqueue,
            broadcast=broadcast,
        )
        return BalanceReport(remaining, snap.reserved, "resumed", f"{n} items re-enqueued")
    return BalanceReport(remaining, snap.reserved, "none")
