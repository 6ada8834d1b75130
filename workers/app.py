"""The Celery app: ``celery -A workers.app worker`` (or ``idocr worker``).

Results live in SQL, so there is no result backend. Messages are acknowledged late and one is
prefetched at a time: a worker that dies mid-task hands its message back, and the item's
compare-and-set claim makes sure a redelivery never pays twice.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from celery import Celery, signals
from kombu import Queue

from pipeline.config import get_settings

log = logging.getLogger(__name__)
settings = get_settings()
CONTROL_QUEUE = f"{settings.queue}.control"


def _pool_given(argv: list[str]) -> bool:
    """Whether the command line chose a pool (``-P prefork``, ``--pool=threads``…): Celery
    cannot tell an explicit ``-P prefork`` from its default, so the app's own default (threads)
    applies only when none was given."""
    return any(a in ("-P", "--pool") or a.startswith(("--pool=", "-P")) for a in argv[1:])


app = Celery("idocr", include=["workers.tasks"])
# importing this module starts nothing: the broker is named when the configuration is first read
app.config_from_object("workers.celeryconfig")
app.conf.update(
    broker_connection_retry_on_startup=True,
    # A message unacknowledged this long is delivered again; the claim makes that harmless, and
    # the reconciler (not this timeout) recovers the work of a dead worker: see README "Recovery".
    broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
    result_backend=None,
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_concurrency=settings.concurrency,
    task_default_queue=settings.queue,
    # Declared, so a plain `celery -A workers.app worker` consumes both (a queue named only in
    # task_routes is not consumed by default).
    task_queues=[Queue(settings.queue), Queue(CONTROL_QUEUE)],
    task_routes={
        "idocr.ocr.*": {"queue": settings.queue},
        "idocr.balance.*": {"queue": CONTROL_QUEUE},
        "idocr.reconcile": {"queue": CONTROL_QUEUE},
        "idocr.retention": {"queue": CONTROL_QUEUE},
    },
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    beat_schedule={
        # each beat reads the balance only when it is due (control.balance_due)
        "balance-check": {
            "task": "idocr.balance.check",
            "schedule": min(settings.balance_interval, settings.balance_interval_paused),
        },
        "reconcile": {
            "task": "idocr.reconcile",
            "schedule": settings.reconcile_interval,
            # a pass that waited longer than an interval is superseded by the next one
            "options": {"expires": settings.reconcile_interval},
        },
    },
)
if settings.retention_age is not None:
    # IDOCR_RETENTION is applied by this beat task and by nothing else (README "Retention")
    app.conf.beat_schedule["retention"] = {
        "task": "idocr.retention",
        "schedule": settings.retention_interval,
        "options": {"expires": settings.retention_interval},
    }
if settings.schedules:
    # scheduled scans (README "Schedules"): the tick hands each due schedule to a worker
    app.conf.task_routes["idocr.schedules.*"] = {"queue": CONTROL_QUEUE}
    app.conf.beat_schedule["schedules"] = {
        "task": "idocr.schedules.tick",
        "schedule": settings.schedule_tick,
        "options": {"expires": settings.schedule_tick},
    }
if not _pool_given(sys.argv):
    # The work is waiting on the provider (HTTP), the rate limiter and the database: threads
    # keep many calls in flight per process at little memory. `-P prefork` is honoured.
    app.conf.worker_pool = "threads"


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _mask_pii(logger: logging.Logger, **_: object) -> None:
    # ID numbers can reach a log line through a file name or a provider message
    from pipeline.domain.masking import PIIFilter

    for handler in logger.handlers:
        handler.addFilter(PIIFilter())
    # no line per task at INFO ("Received task", "Task … succeeded"): at millions of images the
    # log is the cost; failures are still logged, at ERROR
    for per_task in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(per_task).setLevel(logging.WARNING)


if (os.environ.get("IDOCR_LOG_FORMAT") or "text").lower() == "json":

    @signals.setup_logging.connect
    def _json_logs(loglevel: int | str | None = None, **_: object) -> None:
        # one JSON object per line, personal data masked in every field (pipeline.logs)
        from pipeline.logs import configure_logging

        configure_logging(loglevel or logging.INFO)


@signals.worker_ready.connect
def _warn_unencrypted(**_: object) -> None:
    # the embedded database may run without IDOCR_DATA_KEYS (any other is refused at start)
    if not settings.encrypts_data:
        from pipeline.config import UNENCRYPTED_WARNING

        log.warning("%s", UNENCRYPTED_WARNING)


@signals.worker_ready.connect
def _serve_metrics(**_: object) -> None:
    # this host's counters on IDOCR_METRICS_PORT (every pool process writes them to
    # PROMETHEUS_MULTIPROC_DIR)
    from pipeline.metrics import serve_worker_metrics

    try:
        serve_worker_metrics(settings)
    except OSError as exc:
        log.warning("metrics not served (%s)", exc)


_intake_stop: threading.Event | None = None


@signals.worker_ready.connect
def _consume_intake(**_: object) -> None:
    # requests other systems add to the intake stream (docs/intake.md): one consumer of the
    # group per worker process, enqueueing through this worker's queue
    global _intake_stop
    if not settings.intake_consumer:
        return
    try:
        import redis

        from pipeline.coordination.redisconn import redis_url
        from pipeline.workflows.intake import start_consumer
        from workers.tasks import QUEUE

        client = redis.Redis.from_url(
            redis_url(settings), socket_timeout=30, socket_connect_timeout=10
        )
        _intake_stop = start_consumer(settings, QUEUE.enqueue, client)[1]
    except Exception:
        log.warning("intake consumer not started", exc_info=True)


@signals.worker_shutdown.connect
def _stop_intake(**_: object) -> None:
    if _intake_stop is not None:
        _intake_stop.set()


_relay: object | None = None


@signals.worker_ready.connect
def _start_relay(**_: object) -> None:
    # the events outbox published from every worker (docs/events.md); IDOCR_RELAY=0: elsewhere
    global _relay
    if not settings.relay:
        return
    try:
        from pipeline.workflows.relay import RelayThread, build_relay

        _relay = RelayThread(build_relay(settings)).start()
    except Exception:
        log.warning("event relay not started", exc_info=True)


@signals.worker_shutdown.connect
def _stop_relay(**_: object) -> None:
    from pipeline.workflows.relay import RelayThread

    if isinstance(_relay, RelayThread):
        _relay.stop()


@signals.task_postrun.connect
def _wake_relay(**_: object) -> None:
    # a task just committed (with the threads pool, in this process): its event goes out now
    # rather than at the relay's next poll; in a prefork child there is no relay to wake
    wake = getattr(getattr(_relay, "relay", None), "wake", None)
    if wake is not None:
        wake()


@signals.worker_init.connect
@signals.worker_process_init.connect
def _switch_interval(**_: object) -> None:
    # A thread whose rate-limiter slot has come must send at once: other threads of the pool
    # decoding images or talking to the database hold the GIL for up to the switch interval
    # (5 ms by default), and that delay shifts calls within the provider's one-second windows.
    sys.setswitchinterval(0.001)


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections made by the parent (schema check, Redis) must not be shared with children.
    from pipeline.coordination.redisconn import reset_clients
    from pipeline.storage.db import engine_for

    for url in (settings.resolved_database_url,):
        engine_for(url).dispose(close=False)
    reset_clients()
    from workers import tasks

    tasks.reset()
