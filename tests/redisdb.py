"""A Redis database the test session owns, on a server it shares with others.

The suite flushes its Redis database before each test, so it must never be one somebody else
uses. It takes a database only if it is empty, and marks it at once with a sentinel key naming
this session (host, pid, random token), in one atomic step; every later flush is a compare-and-
flush on that sentinel, so a database somebody else has meanwhile taken (or a non-empty one
without our mark) is never flushed. A database marked by a session on this host whose process
is gone (killed mid-run) is taken over; one marked by a live session or another host is left.

``IDOCR_TEST_REDIS_URL``: the server to use (default ``redis://127.0.0.1:6379``); with a
database number (``redis://host:6379/7``) only that database is considered, and the session
fails rather than touch it when it is not empty and not ours. Database 0, every client's
default, is never picked on its own.
"""

from __future__ import annotations

import os
import secrets
import socket
from urllib.parse import urlsplit, urlunsplit

import redis

SENTINEL = "idocr-test:owner"

# Claim an empty database: returns "ok", the current owner's mark, or false (not empty, unmarked).
_CLAIM = """
local owner = redis.call('GET', KEYS[1])
if owner then return owner end
if redis.call('DBSIZE') == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
  return 'ok'
end
return false
"""
# Flush only while ARGV[1] still holds the mark; put ARGV[2] in its place (empty: release).
_FLUSH_IF_OWNED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('FLUSHDB')
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""


class RedisNotOwned(RuntimeError):
    """No database could be taken without touching somebody else's keys."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(mark: str) -> bool:
    """A mark left by a session of this host whose process no longer runs."""
    host, _, rest = mark.partition(":")
    pid, _, _ = rest.partition(":")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


class OwnedRedisDb:
    def __init__(self, server_url: str | None = None) -> None:
        url = server_url or os.environ.get("IDOCR_TEST_REDIS_URL") or "redis://127.0.0.1:6379"
        parts = urlsplit(url)
        db = parts.path.strip("/")
        self._server = urlunsplit(parts._replace(path=""))
        self._candidates = [int(db)] if db else list(range(1, 16))
        self.mark = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.url: str | None = None

    def _client(self, db: int) -> redis.Redis:
        return redis.Redis.from_url(f"{self._server}/{db}", socket_timeout=10)

    def claim(self) -> str:
        """The URL of a database now ours; raises RedisNotOwned (or a RedisError: no server)."""
        if self.url is not None:
            return self.url
        # start where another session of this machine is unlikely to: fewer collisions
        start = os.getpid() % len(self._candidates)
        order = self._candidates[start:] + self._candidates[:start]
        refused: list[str] = []
        for db in order:
            client = self._client(db)
            try:
                got = client.eval(_CLAIM, 1, SENTINEL, self.mark)
                got = got.decode() if isinstance(got, bytes) else got
                if got == "ok":
                    self.url = f"{self._server}/{db}"
                    return self.url
                if (
                    got
                    and _stale(got)
                    and client.eval(_FLUSH_IF_OWNED, 1, SENTINEL, got, self.mark)
                ):
                    self.url = f"{self._server}/{db}"
                    return self.url
                refused.append(
                    f"db {db}: {'in use by ' + got if got else 'not empty, not a test database'}"
                )
            finally:
                client.close()
        raise RedisNotOwned(
            f"no Redis database of {self._server} can be used without touching other keys "
            f"({'; '.join(refused)}); set IDOCR_TEST_REDIS_URL to an empty one"
        )

    def flush(self) -> None:
        """Empty our database (keeping the mark); refuses if it is no longer ours."""
        self._flush(keep=True)

    def release(self) -> None:
        """Empty our database and take the mark away."""
        if self.url is not None:
            self._flush(keep=False)
            self.url = None

    def _flush(self, keep: bool) -> None:
        assert self.url is not None
        client = redis.Redis.from_url(self.url, socket_timeout=10)
        try:
            if not client.eval(_FLUSH_IF_OWNED, 1, SENTINEL, self.mark, self.mark if keep else ""):
                raise RedisNotOwned(f"{self.url} is no longer this test session's: not flushed")
        finally:
            client.close()
