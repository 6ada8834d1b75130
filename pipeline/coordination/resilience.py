"""Waiting out the infrastructure: database and Redis errors are transient, never final.

A days-long run meets a restarted Redis, a database that drops its connections, a failover.
None of that says anything about an image, so a step that fails on it is tried again with
backoff (jittered, capped) for up to ``patience`` seconds, and only then given up with
:class:`OutageTooLong`. Errors that are not the infrastructure's (a bug, a constraint) are
raised at once: retrying them would only repeat them.

Logged by exception class only: a database error quotes its statement's parameters (file
names, recognised fields).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions
from sqlalchemy import exc as sa_exc
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: what a lost or refused connection looks like from SQLAlchemy and redis-py
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,  # connection refused or reset, server restarting, SQLite locked
    sa_exc.InterfaceError,  # the DBAPI connection is closed
    sa_exc.DisconnectionError,
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (a restarted Redis loading)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during a failover
    ConnectionError,
    TimeoutError,
)


class OutageTooLong(Exception):
    """The database or Redis stayed unreachable for the whole patience; nothing was lost,
    the caller hands its work back."""


def is_infra_error(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, INFRA_ERRORS)


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: %s, trying again in %.1f s (attempt %d)",
            what,
            type(exc).__name__,
            state.next_action.sleep if state.next_action else 0,
            state.attempt_number,
        )

    return before_sleep


def outlast(
    fn: Callable[[], T],
    what: str,
    *,
    patience: float,
    initial: float = 0.2,
    max_wait: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, tried again while it fails on the infrastructure, for up to ``patience``
    seconds; then :class:`OutageTooLong`. ``fn`` must be safe to repeat (one transaction)."""
    try:  # the usual case, without building the retry machinery (tens of µs a call)
        return fn()
    except BaseException as exc:
        if not is_infra_error(exc):
            raise
        failed = [exc]

    def again() -> T:
        # the retry machinery's first attempt is the call that just failed
        if failed:
            raise failed.pop()
        return fn()

    retrying = Retrying(
        retry=retry_if_exception(is_infra_error),
        wait=wait_exponential_jitter(multiplier=initial, max=max_wait, jitter=initial),
        stop=stop_after_delay(patience),
        before_sleep=_log_retry(what),
        sleep=sleep,
        reraise=True,
    )
    try:
        return retrying(again)
    except BaseException as exc:
        if is_infra_error(exc):
            raise OutageTooLong(
                f"{what}: unreachable for {patience:g} s ({type(exc).__name__})"
            ) from None
        raise
