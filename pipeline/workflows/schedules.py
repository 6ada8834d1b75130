"""Scheduled scans: nightly imports without cron glue (README "Schedules").

The profile's ``[[schedules]]`` name a source, a cron expression (UTC) and a batch template.
The beat ticks every minute (``idocr.schedules.tick``): a schedule whose latest due time has
not been run yet is handed to a worker (``idocr.schedules.run``), which scans its source with
the producer into the batch the template names for that due time.

Started once per due time, whoever ticks:

* a Redis lock per schedule, with a lease renewed while the scan runs: a second tick (two beats,
  a late message) finds it held and starts nothing;
* the due time of the last run that completed is kept in Redis; a run for a due time already
  done is skipped. A scan that died is started again by a later tick (same batch name: the
  rescan adds only what is missing), as long as its due time is within the catch-up window;
  a due time older than that (the beat was down for longer) is skipped for the next one.

Each run ends with its batch's ``batch.finished`` event: written by the relay once the last item
is final, or right after the scan when nothing is left to process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis
from croniter import croniter

from pipeline.outputs.events import Outbox
from pipeline.storage.db import unit_of_work
from pipeline.workflows import producer
from pipeline.workflows.relay import KEY_PREFIX, finish_batch_if_done

if TYPE_CHECKING:
    from pipeline.config import ScheduleSpec, Settings

log = logging.getLogger(__name__)

#: a due time older than this when first noticed is not run any more (the next one is)
CATCH_UP = timedelta(hours=1)


def due_time(spec: ScheduleSpec, now: datetime) -> datetime:
    """The schedule's latest due time at or before ``now`` (UTC)."""
    now = now.astimezone(UTC)
    it = croniter(spec.cron, now + timedelta(microseconds=1))
    prev: datetime = it.get_prev(datetime)
    return prev.astimezone(UTC)


def batch_name(spec: ScheduleSpec, due: datetime) -> str:
    return spec.batch.format(name=spec.name, date=due)


def _lock_key(name: str) -> str:
    return f"{KEY_PREFIX}schedule:{name}:lock"


def _done_key(name: str) -> str:
    return f"{KEY_PREFIX}schedule:{name}:done"


@dataclass(slots=True)
class RunResult:
    name: str
    due: datetime
    batch: str | None = None
    started: bool = False
    detail: str = ""


class Scheduler:
    def __init__(
        self,
        *,
        database_url: str,
        redis_client: redis.Redis,
        schedules: Sequence[ScheduleSpec],
        provider: str,
        enqueue: Callable[[Sequence[int]], None],
        open_source: Callable[[str], Any],
        outbox: Outbox | None = None,
        lease: float = 60.0,
    ) -> None:
        self.db = database_url
        self.redis = redis_client
        self.schedules = {s.name: s for s in schedules}
        self.provider = provider
        self.enqueue = enqueue
        self.open_source = open_source
        self.outbox = outbox or Outbox()
        self.lease = lease

    def _done(self, name: str) -> datetime | None:
        raw = self.redis.get(_done_key(name))
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return datetime.fromisoformat(text)

    def due(self, now: datetime | None = None) -> list[tuple[str, datetime]]:
        """The schedules to run now, each with its due time (cheap: Redis reads only)."""
        now = now or datetime.now(UTC)
        out = []
        for name, spec in self.schedules.items():
            due = due_time(spec, now)
            if now - due > CATCH_UP:
                continue
            done = self._done(name)
            if done is not None and done >= due:
                continue
            if self.redis.exists(_lock_key(name)):
                continue  # running
            out.append((name, due))
        return out

    def run(self, name: str, due: datetime) -> RunResult:
        """Scan schedule ``name`` for ``due`` unless it is running or done for that time."""
        res = RunResult(name, due)
        spec = self.schedules.get(name)
        if spec is None:
            res.detail = "no such schedule"
            return res
        lock = self.redis.lock(_lock_key(name), timeout=self.lease, blocking=False)
        if not lock.acquire():
            res.detail = "already running"
            return res
        stop = threading.Event()
        renew = threading.Thread(
            target=self._renew, args=(lock, stop), name=f"idocr-schedule-{name}", daemon=True
        )
        renew.start()
        try:
            done = self._done(name)
            if done is not None and done >= due:
                res.detail = "already done"
                return res
            res.batch = batch_name(spec, due)
            res.started = True
            log.info("schedule %s: scanning into batch %s", name, res.batch)
            report = producer.scan(
                self.open_source(spec.source),
                database_url=self.db,
                batch_id=res.batch,
                provider=self.provider,
                enqueue=self.enqueue,
                via=spec.via,
                outbox=self.outbox,
            )
            # nothing left to process (an empty source, everything settled at once): the run's
            # batch.finished now, since no item event will bring the relay to it
            with unit_of_work(self.db) as s:
                finish_batch_if_done(s, res.batch, self.outbox, allow_empty=True)
            self.redis.set(_done_key(name), due.isoformat())
            res.detail = f"{report.added} items added, {report.queued} queued"
            log.info("schedule %s: batch %s: %s", name, res.batch, res.detail)
            return res
        finally:
            stop.set()
            renew.join(5)
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("schedule %s: its lock expired while the scan ran", name)

    def _renew(self, lock: Any, stop: threading.Event) -> None:
        while not stop.wait(self.lease / 3):
            try:
                lock.extend(self.lease, replace_ttl=True)
            except Exception as exc:
                log.warning("schedule lock not renewed (%s)", type(exc).__name__)


def build_scheduler(settings: Settings, enqueue: Callable[[Sequence[int]], None]) -> Scheduler:
    from pipeline.coordination.redisconn import redis_client
    from pipeline.sources import open_source

    return Scheduler(
        database_url=settings.resolved_database_url,
        redis_client=redis_client(settings),
        schedules=settings.schedules,
        provider=settings.resolved_provider,
        enqueue=enqueue,
        open_source=lambda uri: open_source(uri, endpoint_url=settings.s3_endpoint_url),
        outbox=Outbox.from_settings(settings),
    )
