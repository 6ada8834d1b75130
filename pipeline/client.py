"""Hand idocr work from another system, and read the answer: only Redis is needed.

::

    from pipeline.client import Client

    c = Client("redis://redis.internal:6379/0")
    c.submit("s3://scans/2026-11-30/0001.jpg", "crm-4711", side="front",
             metadata={"customer": "4711"})
    event = c.result("crm-4711", timeout=60)   # the item.finished event, or None

``submit`` adds one entry to the intake stream (the request as JSON in the field ``request``,
checked here first against the same contract the workers apply: docs/intake.md); ``result``
reads the request's result key, waking up on every new entry of the results stream while it
waits. The same key may be submitted again safely: it is processed once, and a key already
answered is answered again.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from pipeline.domain.intake import IntakeRequest

DEFAULT_STREAM = "idocr:intake"
DEFAULT_RESULTS_STREAM = "idocr:results"
DEFAULT_PREFIX = "idocr:"


def result_key(key: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The Redis key holding the answer to the request ``key`` (the JSON event)."""
    return f"{prefix}result:{key}"


class Client:
    def __init__(
        self,
        redis_url: str | None = None,
        *,
        stream: str | None = None,
        results_stream: str | None = None,
        prefix: str | None = None,
        channel: str = "client",
    ) -> None:
        """``redis_url``: the Redis idocr's workers use; None: this process's idocr settings
        (``IDOCR_REDIS_URL``, the intake and results stream names)."""
        if redis_url is None:
            from pipeline.config import get_settings
            from pipeline.coordination.redisconn import redis_url as settings_redis_url

            settings = get_settings()
            redis_url = settings_redis_url(settings)
            stream = stream or settings.intake_stream
            results_stream = results_stream or settings.results_stream
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=10)
        self.stream = stream or DEFAULT_STREAM
        self.results_stream = results_stream or DEFAULT_RESULTS_STREAM
        self.prefix = DEFAULT_PREFIX if prefix is None else prefix
        self.channel = channel

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def submit(
        self,
        image: str,
        key: str,
        *,
        side: str | None = None,
        batch: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Hand one image over; returns ``key``. A request that breaks the contract raises
        ``pydantic.ValidationError`` (a ``ValueError``) here and is not sent."""
        request = IntakeRequest(image=image, key=key, side=side, batch=batch, metadata=metadata)  # type: ignore[arg-type]
        self.redis.xadd(self.stream, request.to_message(self.channel))  # type: ignore[arg-type]
        return key

    def result(self, key: str, timeout: float | None = None) -> dict[str, Any] | None:
        """The answer to request ``key`` (the ``item.finished`` or ``request.rejected`` event
        as a dict), waiting up to ``timeout`` seconds for it; None if there is none yet."""
        rkey = result_key(key, self.prefix)
        deadline = None if timeout is None else time.monotonic() + timeout
        # the stream's position before the first look: an event added after it wakes us up
        newest: Any = self.redis.xrevrange(self.results_stream, count=1)
        last: Any = newest[0][0] if newest else "0-0"
        while True:
            raw = self.redis.get(rkey)
            if raw is not None:
                value: dict[str, Any] = json.loads(raw)
                return value
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # woken by any new event; at least once a second (a result key set without a
            # stream entry is still seen)
            block = max(1, int(min(left, 1.0) * 1000))
            resp: Any = self.redis.xread({self.results_stream: last}, count=100, block=block)
            if resp:
                last = resp[0][1][-1][0]
