"""First-come claims on image content, shared by every worker through Redis.

Items listed without being read (S3) learn their sha256 only in the worker; two workers that
meet identical bytes at the same moment must agree on which one pays. ``SET NX`` decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

#: long enough to cover a backfill's in-flight window; afterwards SQL knows the outcome
CLAIM_TTL = 24 * 3600


class ContentClaims:
    def __init__(self, client: redis.Redis, prefix: str = "idocr") -> None:
        self._r = client
        self._prefix = prefix

    def first(self, sha256: str, item_id: int) -> int:
        """The item that claimed these bytes first (``item_id`` itself if it is the first)."""
        key = f"{self._prefix}:sha:{sha256}"
        if self._r.set(key, item_id, nx=True, ex=CLAIM_TTL):
            return item_id
        owner = self._r.get(key)
        return int(owner) if owner is not None else item_id

    def release(self, held: Sequence[tuple[str, int]]) -> int:
        """Remove the claims these (sha256, item) pairs still hold (their items were purged:
        the same bytes seen again must not become duplicates of an answer that is gone)."""
        if not held:
            return 0
        keys = [f"{self._prefix}:sha:{sha}" for sha, _ in held]
        owners = self._r.mget(keys)
        mine = [k for k, (_, i), o in zip(keys, held, owners, strict=True) if o == str(i).encode()]
        return int(self._r.delete(*mine)) if mine else 0
