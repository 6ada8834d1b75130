"""Task functions: thin, each one calls into ``pipeline``. Names are explicit and dotted."""

from __future__ import annotations

import logging
import threading
import time

from celery import signals
from celery.exceptions import Reject

from pipeline.coordination.resilience import OutageTooLong
from pipeline.workflows.processing import Processor
from pipeline.workflows.reconcile import Reconciler
from workers.app import app, settings
from workers.queue import CeleryQueue

log = logging.getLogger(__name__)

QUEUE = CeleryQueue(settings)
_processor: Processor | None = None
_reconciler: Reconciler | None = None
_lock = threading.Lock()
#: OCR tasks running in this process, since when fewer than its threads (None: all busy),
#: and whether they run in a pool of threads
_running = 0
_short_since: float | None = None
_running_lock = threading.Lock()
_in_threads: bool | None = None
#: how long a thread must have been without a task before the queue counts as dry: between
#: two messages of a busy queue a thread waits milliseconds, not this
_IDLE_FOR = 0.1


def _spare() -> bool:
    since = _short_since
    return since is not None and time.monotonic() - since >= _IDLE_FOR


def _count_running(step: int) -> None:
    global _running, _short_since
    with _running_lock:
        _running += step
        if _running >= settings.concurrency:
            _short_since = None
        elif _short_since is None:
            _short_since = time.monotonic()


def reset() -> None:
    global _processor, _reconciler
    if _processor is not None and _processor.heartbeat is not None:
        _processor.heartbeat.stop()
    _processor = None
    _reconciler = None


def _on_pause(kind: str, reason: str) -> None:
    # Stop every worker consuming the OCR queue; each task also checks the gate, so prefetched
    # messages and workers that start later respect the pause too.
    try:
        QUEUE.set_consuming(False)
    except Exception:  # broadcast is an optimisation; the gate is the guarantee
        log.warning("could not broadcast cancel_consumer for %s", settings.queue, exc_info=True)


def processor() -> Processor:
    global _processor
    with _lock:  # one per process, shared by the pool's threads
        if _processor is None:
            from pipeline.runtime import build_processor

            _processor = build_processor(settings, QUEUE, on_pause=_on_pause)
        return _processor


@signals.worker_ready.connect
def _warm_up(**_: object) -> None:
    # Build the processor, and pay the one-off costs (imports, the ID-number region table,
    # image codecs, first connections) before the first task: paid inside a task they would
    # hold up the pool's other threads just as their rate-limiter slots come due.
    try:
        from datetime import date

        from PIL import Image

        from pipeline.domain.checks import check_fields

        Image.init()
        check_fields("front", {"id_number": "11010519491231002X"}, today=date.today())
        p = processor()
        from pipeline.storage import repo
        from pipeline.storage.db import unit_of_work

        with unit_of_work(p.db) as s:
            repo.open_pause(s, p.provider.name, p.provider.account)
        p.warm_up(connections=settings.concurrency)
        # A balance reading (free: GetNum bills nothing) primes the quota ledger before the
        # first submission and opens the connection to the provider.
        if p.quota is not None and p.quota.snapshot().remaining is None:
            from pipeline.workflows.control import check_balance

            check_balance(settings, p.provider, QUEUE.enqueue, QUEUE.set_consuming)
        # answers a worker of this host kept on disk while both the database and Redis were
        # down: into the shared journal, where the reconciler writes them
        if p.journal is not None:
            moved = p.journal.move_files_to_redis()
            if moved:
                log.warning("%d answers from the local journal handed to the reconciler", moved)
    except Exception:
        log.warning("worker warm-up failed; tasks will try again", exc_info=True)


def reconciler() -> Reconciler:
    global _reconciler
    with _lock:
        if _reconciler is None:
            from pipeline.runtime import build_reconciler

            _reconciler = build_reconciler(settings, QUEUE)
        return _reconciler


@app.task(name="idocr.ocr.submit", acks_late=True, ignore_result=True)
def submit(item_ids: int | list[int]) -> str:
    """One item id, or the ids of several (IDOCR_TASK_ITEMS): their statuses."""
    global _in_threads
    ids = [int(i) for i in item_ids] if isinstance(item_ids, list) else [int(item_ids)]
    p = processor()
    if _in_threads is None:
        # threads pool: the idle threads of this process are seen, and a slow message gives
        # them its items; a prefork child or gevent runs one task per thread and cannot tell
        _in_threads = threading.current_thread() is not threading.main_thread()
    p.spare = _spare if _in_threads else None
    _count_running(1)
    try:
        return " ".join(p.process_many(ids))
    except OutageTooLong as exc:
        # Nothing was lost: the message goes back, and the items wait for the infrastructure
        # (one already claimed is taken over once its lease runs out).
        log.warning("%d items: %s; message handed back", len(ids), exc)
        raise Reject(str(exc), requeue=True) from None
    finally:
        _count_running(-1)


@app.task(name="idocr.reconcile", ignore_result=True)
def reconcile() -> str:
    return str(reconciler().run_once())


@app.task(name="idocr.retention", ignore_result=True)
def retention() -> str:
    """Purge the personal data of items final for longer than IDOCR_RETENTION (unset: none)."""
    from pipeline.runtime import retention_copies
    from pipeline.workflows.retention import purge

    age = settings.retention_age
    if age is None:
        return "retention not configured"
    rep = purge(
        settings.resolved_database_url,
        older_than=age,
        chunk=settings.retention_chunk,
        copies=retention_copies(settings),
    )
    return f"{rep.items} items purged"


@app.task(name="idocr.schedules.tick", ignore_result=True)
def schedules_tick() -> str:
    """Hand every schedule that is due and not yet run to a worker."""
    from pipeline.workflows.schedules import build_scheduler

    due = build_scheduler(settings, QUEUE.enqueue).due()
    for name, when in due:
        schedules_run.delay(name, when.isoformat())
    return f"{len(due)} schedules due"


@app.task(name="idocr.schedules.run", ignore_result=True)
def schedules_run(name: str, due: str) -> str:
    """One scheduled scan (started once per due time: a lock and the last run done)."""
    from datetime import datetime

    from pipeline.workflows.schedules import build_scheduler

    res = build_scheduler(settings, QUEUE.enqueue).run(name, datetime.fromisoformat(due))
    return f"{name}: {res.batch or '-'} {res.detail}"


@app.task(name="idocr.balance.check", ignore_result=True)
def balance_check() -> None:
    from pipeline.workflows.control import balance_due, check_balance

    provider = processor().provider
    if balance_due(settings, provider):
        check_balance(settings, provider, QUEUE.enqueue, QUEUE.set_consuming)
