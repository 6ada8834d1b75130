"""The suite's Redis database ownership, on a private redis-server: it never flushes a database
it did not mark, and takes over one marked by a session that died."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.redisdb import SENTINEL, OwnedRedisDb, RedisNotOwned


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is installed wherever the suite runs (.ci/run starts one)"
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _db(url: str, n: int) -> redis.Redis:
    return redis.Redis.from_url(f"{url}/{n}")


def test_only_an_empty_database_is_taken_and_only_ours_is_flushed(server: str) -> None:
    for n in range(1, 16):
        _db(server, n).set("somebody:else", "keep me")  # every database in use but one
    _db(server, 9).delete("somebody:else")
    owned = OwnedRedisDb(server)
    assert owned.claim() == f"{server}/9"
    _db(server, 9).set("test:key", "x")
    owned.flush()
    assert _db(server, 9).keys() == [SENTINEL.encode()]
    # somebody else takes the database over meanwhile: it is not flushed
    _db(server, 9).set(SENTINEL, "otherhost:1:feed")
    with pytest.raises(RedisNotOwned):
        owned.flush()
    assert all(_db(server, n).get("somebody:else") == b"keep me" for n in range(1, 16) if n != 9)
    assert _db(server, 0).dbsize() == 0  # database 0 is never picked


def test_a_named_database_in_use_is_refused_not_flushed(server: str) -> None:
    _db(server, 4).set("somebody:else", "keep me")
    with pytest.raises(RedisNotOwned, match="not empty"):
        OwnedRedisDb(f"{server}/4").claim()
    assert _db(server, 4).get("somebody:else") == b"keep me"


def test_a_database_left_by_a_dead_session_is_taken_over(server: str) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    _db(server, 5).set(SENTINEL, f"{socket.gethostname()}:{dead.pid}:0000")
    _db(server, 5).set("left:over", "x")
    owned = OwnedRedisDb(f"{server}/5")
    assert owned.claim() == f"{server}/5"
    assert _db(server, 5).get("left:over") is None
    owned.release()
    assert _db(server, 5).dbsize() == 0
    # a live session's database is left alone
    _db(server, 5).set(SENTINEL, f"{socket.gethostname()}:1:0000")  # pid 1 always runs
    with pytest.raises(RedisNotOwned, match="in use by"):
        OwnedRedisDb(f"{server}/5").claim()
