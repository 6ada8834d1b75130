"""A live worker renews its claims, so a short lease tells a dead worker from a slow one.

One thread per process renews every claim its tasks hold with one UPDATE every ``interval``
(a quarter of the lease: three renewals may fail in a row before a claim looks abandoned).
A renewal that fails on the infrastructure is simply tried at the next tick; a task whose
claim was taken over meanwhile finds out when it writes its answer (those writes are guarded
by the claim).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pipeline.storage import repo
from pipeline.storage.db import unit_of_work

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        database_url: str,
        worker: str,
        interval: float,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.db = database_url
        self.worker = worker
        self.interval = interval
        self.on_tick = on_tick
        self._held: dict[int, int] = {}  # item id → tasks holding it in this process
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, item_id: int) -> None:
        with self._lock:
            self._held[item_id] = self._held.get(item_id, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="idocr-heartbeat", daemon=True
                )
                self._thread.start()

    def release(self, item_id: int) -> None:
        with self._lock:
            n = self._held.get(item_id, 0) - 1
            if n > 0:
                self._held[item_id] = n
            else:
                self._held.pop(item_id, None)

    def held(self) -> list[int]:
        with self._lock:
            return list(self._held)

    def beat(self) -> int:
        """Renew this process's claims now; returns how many are still ours."""
        ids = self.held()
        if not ids:
            return 0
        with unit_of_work(self.db) as s:
            return repo.renew_claims(s, ids, self.worker)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # the next tick tries again; the lease allows for three
                log.warning("claim heartbeat failed (%s)", type(exc).__name__)
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except Exception as exc:
                    log.warning("heartbeat follow-up failed (%s)", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
