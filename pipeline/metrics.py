"""Prometheus metrics: what the workers did (events) and where the work stands (state).

Events are counted where they happen, through the ``record_*`` functions below, which never
raise and cost a few microseconds. Celery runs several processes per host, so when
``PROMETHEUS_MULTIPROC_DIR`` is set the values go to files in that folder (prometheus_client's
multiprocess mode) and whichever process serves ``/metrics`` adds up every process's files. The
folder must be empty when the first process starts (a tmpfs, or wiped by the start script).

State is computed when Prometheus scrapes, by :class:`StateCollector`, from the record of work
rather than from counters a restart would reset: items by status (SQL, the latest batches),
the open pause (SQL), the last balance reading (SQL), the queue depth (Redis ``LLEN``) and the
quota ledger (Redis). Only ``idocr metrics`` serves the state: with N workers each serving it,
every scrape would run N times the same queries.

Metric names and labels::

    idocr_provider_calls_total{provider,outcome,code}   calls answered (or not: outcome unknown)
    idocr_provider_billed_total{provider}               calls the provider counted against quota
    idocr_provider_retries_total{provider,outcome}      calls made again after a transient answer
    idocr_provider_unknown_total{provider}              calls whose answer was lost after sending
    idocr_provider_latency_seconds{provider}            histogram: send to answer
    idocr_ratelimit_wait_seconds{provider}              histogram: time spent waiting for a slot
    idocr_items_finished_total{status,reason}           items that reached a final state
    idocr_pauses_total{kind}                            pauses opened
    idocr_items{batch,status}                           state: items by status, latest batches
    idocr_queue_depth{queue}                            state: messages waiting in the broker
    idocr_quota_remaining{provider,account}             state: calls left at the last reading
    idocr_quota_reserved{provider,account}              state: calls in flight (reserved)
    idocr_quota_available{provider,account}             state: remaining - reserved
    idocr_balance_remaining{provider,account}           state: the last balance reading
    idocr_paused{provider,account}                      state: 1 while submissions are paused
    idocr_pause_kind{provider,account,kind}             state: 1 for the open pause's kind
    idocr_rate_limit{provider,account}                  state: the configured calls per second
    idocr_state_up{source}                              state: 1 if SQL / Redis answered
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

# prometheus_client picks its value store when it is first imported: the folder must exist by
# then, or the first increment fails.
_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _MULTIPROC_DIR:
    os.makedirs(_MULTIPROC_DIR, exist_ok=True)

from prometheus_client import (  # noqa: E402 - after the folder exists
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

if TYPE_CHECKING:
    from pipeline.config import Settings

__all__ = [
    "StateCollector",
    "build_registry",
    "record_billed",
    "record_call",
    "record_item_final",
    "record_limiter_wait",
    "record_pause",
    "record_retry",
    "record_unknown",
    "serve",
    "serve_worker_metrics",
]

log = logging.getLogger(__name__)

#: batches whose items by status are exported (the latest ones holding items)
STATE_BATCHES = 3

CALLS = Counter(
    "idocr_provider_calls",
    "Provider calls by outcome class and provider code.",
    ["provider", "outcome", "code"],
)
BILLED = Counter("idocr_provider_billed", "Calls counted against the paid quota.", ["provider"])
RETRIES = Counter(
    "idocr_provider_retries", "Calls made again after a transient answer.", ["provider", "outcome"]
)
UNKNOWN = Counter(
    "idocr_provider_unknown",
    "Calls whose answer was lost after sending (maybe billed).",
    ["provider"],
)
LATENCY = Histogram(
    "idocr_provider_latency_seconds",
    "Provider call latency, send to answer.",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
LIMITER_WAIT = Histogram(
    "idocr_ratelimit_wait_seconds",
    "Time spent waiting for a rate-limiter slot.",
    ["provider"],
    buckets=(0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ITEMS_FINISHED = Counter(
    "idocr_items_finished", "Items that reached a final state.", ["status", "reason"]
)
PAUSES = Counter("idocr_pauses", "Pauses opened, by kind.", ["kind"])


def _safe(fn: Any) -> Any:
    """Metrics must never break the work they observe."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            log.debug("metric %s not recorded", fn.__name__, exc_info=True)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_safe
def record_call(provider: str, outcome: str, code: str | None, seconds: float | None) -> None:
    """One provider call that came back from the send: ``outcome`` its class (ok, transient,
    image, quota, account, clock, or unknown: sent, the answer lost), ``code`` the provider's
    code ("" for none), ``seconds`` from send to answer."""
    CALLS.labels(provider, outcome, code or "").inc()
    if outcome == "unknown":
        UNKNOWN.labels(provider).inc()
    if seconds is not None:
        LATENCY.labels(provider).observe(max(0.0, seconds))


@_safe
def record_billed(provider: str, n: int = 1) -> None:
    """Calls the provider counted against the quota."""
    BILLED.labels(provider).inc(n)


@_safe
def record_retry(provider: str, outcome: str) -> None:
    """A call about to be made again after a transient ``outcome``."""
    RETRIES.labels(provider, outcome).inc()


@_safe
def record_unknown(provider: str, n: int = 1) -> None:
    """Calls found in flight on a worker that died (its attempts closed as unknown at the
    takeover): sent, maybe billed, never answered to anyone. Calls whose send returned with
    an unknown outcome are counted by :func:`record_call`."""
    UNKNOWN.labels(provider).inc(n)
    CALLS.labels(provider, "unknown", "").inc(n)


@_safe
def record_limiter_wait(seconds: float, provider: str = "") -> None:
    """Time a call waited for its rate-limiter slot (0 when the slot was free)."""
    LIMITER_WAIT.labels(provider).observe(max(0.0, seconds))


@_safe
def record_item_final(status: str, reason: str | None = None) -> None:
    """An item reached succeeded, failed, rejected or duplicate."""
    ITEMS_FINISHED.labels(status, reason or "").inc()


@_safe
def record_pause(kind: str) -> None:
    """A pause was opened (quota, auth, clock, operator)."""
    PAUSES.labels(kind).inc()


# -- state, computed at scrape time --------------------------------------------------------------


class StateCollector(Collector):
    """Gauges read from SQL and Redis when Prometheus scrapes (see the module docstring). A
    source that does not answer is reported in ``idocr_state_up`` and left out, so one scrape
    never fails as a whole."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> list[Any]:
        # no queries at registration time
        return []

    def collect(self) -> Iterator[Any]:
        from pipeline.config import provider_identity

        provider, account = provider_identity(self.settings)
        limit = GaugeMetricFamily(
            "idocr_rate_limit", "The configured calls per second.", labels=["provider", "account"]
        )
        limit.add_metric([provider, account], self.settings.rate_limit)
        yield limit
        up = GaugeMetricFamily(
            "idocr_state_up", "1 if the source answered this scrape.", labels=["source"]
        )
        yield from self._sql(up)
        yield from self._redis(up)
        yield up

    def _sql(self, up: GaugeMetricFamily) -> Iterator[Any]:
        from pipeline.config import provider_identity
        from pipeline.storage import repo
        from pipeline.storage.db import unit_of_work
        from pipeline.workflows.status import recent_batch_ids

        provider, account = provider_identity(self.settings)
        items = GaugeMetricFamily(
            "idocr_items", "Items by status (latest batches).", labels=["batch", "status"]
        )
        paused = GaugeMetricFamily(
            "idocr_paused", "1 while submissions are paused.", labels=["provider", "account"]
        )
        kind = GaugeMetricFamily(
            "idocr_pause_kind",
            "1 for the open pause's kind.",
            labels=["provider", "account", "kind"],
        )
        balance = GaugeMetricFamily(
            "idocr_balance_remaining", "The last balance reading.", labels=["provider", "account"]
        )
        try:
            with unit_of_work(self.settings.resolved_database_url, read_only=True) as s:
                for batch in recent_batch_ids(s, STATE_BATCHES):
                    for status, n in sorted(repo.status_counts(s, batch).items()):
                        items.add_metric([batch, status], n)
                pause = repo.open_pause(s, provider, account)
                reading = repo.last_balance(s, provider, account)
        except Exception:  # noqa: BLE001 - reported as idocr_state_up{source="sql"} 0
            log.warning("metrics: the database did not answer", exc_info=True)
            up.add_metric(["sql"], 0)
            return
        up.add_metric(["sql"], 1)
        paused.add_metric([provider, account], 0 if pause is None else 1)
        if pause is not None:
            kind.add_metric([provider, account, pause.kind], 1)
        if reading is not None:
            balance.add_metric([provider, account], reading.remaining)
        yield from (items, paused, kind, balance)

    def _redis(self, up: GaugeMetricFamily) -> Iterator[Any]:
        if not self.settings.redis_url:
            return  # an embedded Redis is not started just to be measured
        import redis

        from pipeline.config import provider_identity
        from pipeline.coordination.quota import QuotaLedger

        provider, account = provider_identity(self.settings)
        queue = self.settings.queue
        depth = GaugeMetricFamily(
            "idocr_queue_depth", "Messages waiting in the broker.", labels=["queue"]
        )
        families = {
            name: GaugeMetricFamily(f"idocr_quota_{name}", doc, labels=["provider", "account"])
            for name, doc in (
                ("remaining", "Calls left at the last reading, per the quota ledger."),
                ("reserved", "Calls in flight (reserved, not yet settled)."),
                ("available", "Calls that may still be reserved: remaining - reserved."),
            )
        }
        client = redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=3, socket_connect_timeout=3
        )
        try:
            for q in (queue, f"{queue}.control"):
                depth.add_metric([q], client.llen(q))
            snap = QuotaLedger(client, provider, account).snapshot()
        except Exception:  # noqa: BLE001 - reported as idocr_state_up{source="redis"} 0
            log.warning("metrics: Redis did not answer", exc_info=True)
            up.add_metric(["redis"], 0)
            return
        finally:
            client.close()
        up.add_metric(["redis"], 1)
        if snap.remaining is not None:
            families["remaining"].add_metric([provider, account], snap.remaining)
            families["available"].add_metric([provider, account], snap.available or 0)
        families["reserved"].add_metric([provider, account], snap.reserved)
        yield depth
        yield from families.values()


class _ThisProcess(Collector):
    """This process's metrics (the default registry), served through a registry of its own."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def build_registry(settings: Settings | None = None, *, state: bool = False) -> CollectorRegistry:
    """The registry to serve: every process's event metrics (multiprocess mode) or this
    process's, plus the state gauges when ``state`` (and ``settings``) are given."""
    registry = CollectorRegistry()
    if _MULTIPROC_DIR:
        multiprocess.MultiProcessCollector(registry, path=_MULTIPROC_DIR)
    else:
        registry.register(_ThisProcess())
    if state:
        if settings is None:
            raise ValueError("the state gauges need the settings")
        registry.register(StateCollector(settings))
    return registry


def serve(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None) -> Any:
    """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns the server (its
    ``shutdown()`` stops it). A worker calls ``serve(port, registry=build_registry())``."""
    server, _thread = start_http_server(port, addr, registry=registry or build_registry())
    return server


_worker_server: Any = None


def serve_worker_metrics(settings: Settings) -> Any:
    """For a worker's main process (Celery's ``worker_ready`` signal): serve the counters of
    every process of this host on ``settings.metrics_port`` (``IDOCR_METRICS_PORT``), without
    the state gauges (``idocr metrics`` serves those once). None when no port is set; a
    second call returns the server already running."""
    global _worker_server
    if settings.metrics_port is None:
        return None
    if _worker_server is None:
        _worker_server = serve(settings.metrics_port)
        log.info("metrics on port %d", _worker_server.server_port)
    return _worker_server
