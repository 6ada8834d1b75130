"""Where a paid answer waits while the database cannot take it, and which calls left the worker.

**The answer journal.** The provider's answer is the one thing money was spent on. When the
transaction that records it fails, the answer goes to the journal before anything else can go
wrong: a Redis hash every worker and the reconciler can read (a takeover on another host finds
it there instead of calling again), and, if Redis is down too, a file in the data directory
(fsynced; replayed by the next worker started on this host). An entry is removed once the
database holds the answer.

**Sent marks.** An attempt row is written before the rate-limiter slot, so a worker that dies
leaves an open attempt that may or may not have reached the provider. A mark is set in Redis
right before the request is sent; a takeover that finds an open attempt without a mark knows it
was never sent and may send it, one with a mark may have been billed. Marks expire after a week.

Entries hold recognised fields while they wait; they are removed as soon as the database has them.
The answer in an entry is sealed with the process's key ring (``IDOCR_DATA_KEYS``, place
``journal.result``), in Redis and in the file alike; without a key (the embedded database) it is
kept as plain JSON.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from pipeline.coordination.redisconn import LuaScript
from pipeline.coordination.resilience import is_infra_error
from pipeline.providers.base import Outcome, ProviderResult
from pipeline.storage.crypto import CryptoError, active_ring

log = logging.getLogger(__name__)

SENT_MARK_TTL = 7 * 24 * 3600
#: the place a journal entry's answer is sealed for
JOURNAL_CONTEXT = "journal.result"


def result_to_json(result: ProviderResult) -> dict[str, Any]:
    d = asdict(result)
    d["outcome"] = result.outcome.value
    return d


def result_from_json(d: dict[str, Any]) -> ProviderResult:
    return ProviderResult(**{**d, "outcome": Outcome(d["outcome"])})


@dataclass(slots=True)
class Entry:
    """A paid answer not yet in the database."""

    item_id: int
    attempt_id: int
    provider: str
    sha256: str | None
    result: ProviderResult
    worker: str
    elapsed_ms: int | None = None

    def dumps(self) -> str:
        d = {
            k: getattr(self, k)
            for k in ("item_id", "attempt_id", "provider", "sha256", "worker", "elapsed_ms")
        }
        d["result"] = active_ring().seal_json(result_to_json(self.result), JOURNAL_CONTEXT)
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def loads(cls, raw: str | bytes) -> Entry:
        d = json.loads(raw)
        return cls(
            d["item_id"],
            d["attempt_id"],
            d["provider"],
            d["sha256"],
            result_from_json(active_ring().open_json(d["result"], JOURNAL_CONTEXT)),
            d["worker"],
            d.get("elapsed_ms"),
        )


class AnswerJournal:
    def __init__(
        self, client: redis.Redis, directory: Path, worker: str, *, key: str = "idocr:journal"
    ) -> None:
        self.redis = client
        self.key = key
        self.directory = directory
        self.worker = worker
        self._lock = threading.Lock()

    # -- writing ---------------------------------------------------------------------------
    def put(self, entry: Entry) -> str:
        """Keep ``entry`` durable; returns where ("redis" or "file")."""
        try:
            self.redis.hset(self.key, str(entry.item_id), entry.dumps())
            return "redis"
        except Exception as exc:
            if not is_infra_error(exc):
                raise
        self._append_file(entry)
        return "file"

    def drop(self, item_id: int) -> None:
        """The database has the answer (best effort: a stale entry is dropped by the reconciler)."""
        try:
            self.redis.hdel(self.key, str(item_id))
        except Exception as exc:
            if not is_infra_error(exc):
                raise
            log.warning(
                "item %s: answer journal entry not removed (%s)", item_id, type(exc).__name__
            )

    def forget(self, item_ids: Sequence[int]) -> int:
        """Remove the entries of these items, whatever their state (retention purged their
        data); returns how many there were."""
        if not item_ids:
            return 0
        return int(self.redis.hdel(self.key, *(str(i) for i in item_ids)))

    # -- reading ---------------------------------------------------------------------------
    def get(self, item_id: int) -> Entry | None:
        raw = self.redis.hget(self.key, str(item_id))
        return Entry.loads(raw) if raw else None

    def entries(self, count: int = 500) -> Iterator[Entry]:
        for _, raw in self.redis.hscan_iter(self.key, count=count):
            try:
                yield Entry.loads(raw)
            except CryptoError as exc:  # names the key id and the place only
                log.warning("an answer journal entry was skipped: %s", exc)
            except (ValueError, KeyError, TypeError):
                log.warning("an unreadable answer journal entry was skipped")

    # -- the file fallback -----------------------------------------------------------------
    def _file(self) -> Path:
        return self.directory / f"{self.worker.replace('/', '_').replace(':', '_')}.jsonl"

    def _append_file(self, entry: Entry) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self._file(), "a", encoding="utf-8") as fh:
            fh.write(entry.dumps() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        log.warning(
            "item %s: answer kept in the local journal until the database is back", entry.item_id
        )

    def move_files_to_redis(self) -> int:
        """Every local journal file of this host into the Redis journal (where the reconciler
        replays it); returns how many entries moved. Called when a worker starts."""
        if not self.directory.is_dir():
            return 0
        moved = 0
        for path in sorted(self.directory.glob("*.jsonl")):
            with self._lock:
                lines = path.read_text(encoding="utf-8").splitlines()
                for line in lines:
                    if line.strip():
                        entry = Entry.loads(line)
                        self.redis.hsetnx(self.key, str(entry.item_id), line)
                        moved += 1
                path.unlink()
        return moved


def owner_check_lua(owner_key: str, claimant: str) -> str:
    """Lua: ``owned`` is whether ``claimant`` still owns the item (``owner``: its owner key's
    value; none means Redis lost it, and the claimant takes it). The arguments are Lua
    expressions: the sent mark's script and :mod:`pipeline.coordination.admission` share it."""
    return f"""
local owner = redis.call('GET', {owner_key})
local owned = not owner or owner == {claimant}
"""


def mark_lua(owner_key: str, sent_key: str, claimant: str, ttl: str) -> str:
    """Lua, after :func:`owner_check_lua` found the item owned: the sent mark."""
    return f"""
if not owner then redis.call('SET', {owner_key}, {claimant}, 'EX', {ttl}) end
redis.call('SET', {sent_key}, 1, 'EX', {ttl})
"""


#: KEYS: the item's owner key, the attempt's sent mark; ARGV: claimant, mark TTL.
#: The mark is set only while the claimant still owns the item: a worker that was cut off long
#: enough for its claim to be taken over must not send the same image a second time.
_MARK_IF_OWNER = (
    owner_check_lua("KEYS[1]", "ARGV[1]")
    + "if not owned then return 0 end"
    + mark_lua("KEYS[1]", "KEYS[2]", "ARGV[1]", "ARGV[2]")
    + "return 1\n"
)


class SentMarks:
    """Sent marks, and who owns each claimed item (the claimant of its latest claim)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "idocr:sent") -> None:
        self.redis = client
        self.prefix = prefix
        self._mark_if_owner = LuaScript(client, _MARK_IF_OWNER)

    @staticmethod
    def owner_key(item_id: int) -> str:
        return f"idocr:owner:{item_id}"

    def sent_key(self, attempt_id: int) -> str:
        return f"{self.prefix}:{attempt_id}"

    def own(self, item_id: int, claimant: str) -> None:
        """The item's latest claim is ``claimant``'s (called right after the claim commits)."""
        self.redis.set(self.owner_key(item_id), claimant, ex=SENT_MARK_TTL)

    def own_many(self, claims: dict[int, str]) -> None:
        """:meth:`own` for several claims, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for item_id, claimant in claims.items():
            pipe.set(self.owner_key(item_id), claimant, ex=SENT_MARK_TTL)
        pipe.execute()

    def mark(
        self, attempt_id: int, item_id: int | None = None, claimant: str | None = None
    ) -> bool:
        """Mark the attempt sent, if ``claimant`` still owns the item; False (nothing marked)
        when another claim took it over. Without an owner key (Redis lost it) the claimant
        takes it."""
        if item_id is None or claimant is None:
            self.redis.set(self.sent_key(attempt_id), 1, ex=SENT_MARK_TTL)
            return True
        return bool(
            self._mark_if_owner(
                keys=[self.owner_key(item_id), self.sent_key(attempt_id)],
                args=[claimant, SENT_MARK_TTL],
            )
        )

    def sent(self, attempt_ids: list[int]) -> set[int]:
        if not attempt_ids:
            return set()
        found = self.redis.mget([self.sent_key(a) for a in attempt_ids])
        return {a for a, v in zip(attempt_ids, found, strict=True) if v is not None}
