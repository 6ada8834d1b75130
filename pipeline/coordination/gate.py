"""A cheap way for workers to know whether the pause state changed.

Pauses live in SQL (the record every worker reads before it spends quota). Reading SQL before
every call costs a transaction per call, so each process keeps the open pause it last read and
asks Redis for one small counter instead: every pause and resume made through idocr bumps it, and
a worker reads SQL again when the counter moved, when it is gone (a Redis that lost its data),
or at the latest ``ttl`` seconds after its last read (a pause written to SQL some other way).

The counter itself is read at most once per ``fresh`` seconds (50 ms) by all the threads of a
process together: a pause opened elsewhere reaches a worker within that much more time. Money
does not depend on it: the quota ledger refuses calls past the watermark on its own, and a call
sent in that window to a refused account is refused again without being billed.
"""

from __future__ import annotations

import threading
import time

import redis


class PauseSignal:
    #: (read at, value) per key, shared by every signal of the process: a bump made here (an
    #: ``idocr resume`` in-process, a worker's own pause) is seen by all of them at once
    _seen: dict[str, tuple[float, bytes | None]] = {}
    _lock = threading.Lock()

    def __init__(
        self, client: redis.Redis, provider: str, account: str, fresh: float = 0.05
    ) -> None:
        self.redis = client
        self.key = f"idocr:pause-version:{provider}:{account}"
        self.fresh = fresh
        kw = client.connection_pool.connection_kwargs
        where = (kw.get("path") or kw.get("host"), kw.get("port"), kw.get("db"))
        self._where = f"{where}:{self.key}"  # the same key on another server is another signal

    def version(self) -> bytes | None:
        now = time.monotonic()
        with self._lock:
            at, value = self._seen.get(self._where, (0.0, None))
        if now - at < self.fresh:
            return value
        raw = self.redis.get(self.key)
        value = raw if isinstance(raw, bytes) or raw is None else str(raw).encode()
        with self._lock:
            self._seen[self._where] = (now, value)
        return value

    def bump(self) -> None:
        self.redis.incr(self.key)
        with self._lock:
            self._seen.pop(self._where, None)  # this process reads the new value at once
