"""A cheap way for workers to know whether the pause state changed.

Pauses live in SQL (the record every worker reads before it spends quota). Reading SQL before
every call costs a transaction per call, so each process keeps the open pause it last read and
asks Redis for one small counter instead: every pause and resume made through idocr bumps it, and
a worker reads SQL again when the counter moved, when it is gone (a Redis that lost its data),
or at the latest ``ttl`` seconds after its last read (a pause written to SQL some other way).
"""

from __future__ import annotations

import redis


class PauseSignal:
    def __init__(self, client: redis.Redis, provider: str, account: str) -> None:
        self.redis = client
        self.key = f"idocr:pause-version:{provider}:{account}"

    def version(self) -> bytes | None:
        value = self.redis.get(self.key)
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    def bump(self) -> None:
        self.redis.incr(self.key)
