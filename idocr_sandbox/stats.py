"""What the sandbox saw: calls, answers, faults and every billed call (by image)."""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


# ====================================================================== stats


@dataclass(frozen=True, slots=True)
class BilledCall:
    at: float
    provider: str
    ocrid: str
    sha256: (
        str | None
    )  # None when no image bytes were obtained (bad base64, failed fetch)
    code: str  # what was (or would have been) answered
    lost: bool = False


class SandboxStats:
    """Thread-safe counters. Every read returns a copy."""

    # Per-second counters are for rate checks over a run, not history: a day is plenty.
    _KEEP_SECONDS = 86_400
    # The per-call log is for inspection; a long demo must not grow it without bound.
    _KEEP_CALLS = 100_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._init()

    def _init(self) -> None:
        self._requests = 0
        self._control = 0
        self._by_endpoint: Counter[str] = Counter()
        self._billed = 0
        self._billed_by_sha: Counter[str] = Counter()
        self._billed_unhashed = 0
        self._per_second: Counter[int] = Counter()
        self._submits_per_second: Counter[int] = Counter()
        self._codes: dict[str, Counter[str]] = {}
        self._http: Counter[int] = Counter()
        self._faults: Counter[str] = Counter()
        self._lost: list[str] = []
        self._calls: deque[BilledCall] = deque(maxlen=self._KEEP_CALLS)

    def reset(self) -> None:
        with self._lock:
            self._init()

    # ---- recording (server side)

    def _record_request(self, endpoint: str, now: float) -> None:
        with self._lock:
            if endpoint == "control":
                self._control += 1
                return
            self._requests += 1
            self._by_endpoint[endpoint] += 1
            sec = int(now)
            self._per_second[sec] += 1
            if endpoint in ("ihuyi.submit", "showapi.ocr"):
                self._submits_per_second[sec] += 1
            if len(self._per_second) > self._KEEP_SECONDS + 3600:
                cutoff = sec - self._KEEP_SECONDS
                for c in (self._per_second, self._submits_per_second):
                    for k in [k for k in c if k < cutoff]:
                        del c[k]

    def _record_answer(self, status: int, codes: dict[str, str]) -> None:
        with self._lock:
            self._http[status] += 1
            for family, code in codes.items():
                self._codes.setdefault(family, Counter())[code] += 1

    def _record_fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    def _record_billed(self, call: BilledCall) -> None:
        with self._lock:
            self._billed += 1
            if call.sha256 is None:
                self._billed_unhashed += 1
            else:
                self._billed_by_sha[call.sha256] += 1
            if call.lost:
                self._lost.append(call.ocrid)
            self._calls.append(call)

    # ---- reading

    @property
    def requests(self) -> int:
        """Provider-protocol requests (control endpoints excluded)."""
        with self._lock:
            return self._requests

    total = requests

    @property
    def control_requests(self) -> int:
        with self._lock:
            return self._control

    @property
    def by_endpoint(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_endpoint)

    @property
    def billed(self) -> int:
        with self._lock:
            return self._billed

    @property
    def billed_by_sha(self) -> dict[str, int]:
        with self._lock:
            return dict(self._billed_by_sha)

    @property
    def billed_unhashed(self) -> int:
        with self._lock:
            return self._billed_unhashed

    def billed_twice(self) -> dict[str, int]:
        """Images billed more than once: what "exactly one billed call per image" forbids."""
        with self._lock:
            return {k: v for k, v in self._billed_by_sha.items() if v > 1}

    @property
    def requests_per_second(self) -> dict[int, int]:
        with self._lock:
            return dict(self._per_second)

    @property
    def submits_per_second(self) -> dict[int, int]:
        """OCR calls (ihuyi Submit, showapi 1429-1) per whole Unix second."""
        with self._lock:
            return dict(self._submits_per_second)

    @property
    def codes(self) -> dict[str, dict[str, int]]:
        """Answered codes per family: ``ihuyi``, ``showapi`` (envelope), ``showapi.ret_code``."""
        with self._lock:
            return {k: dict(v) for k, v in self._codes.items()}

    @property
    def http_status(self) -> dict[int, int]:
        with self._lock:
            return dict(self._http)

    @property
    def faults(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def lost_ocrids(self) -> list[str]:
        with self._lock:
            return list(self._lost)

    def calls(self) -> list[BilledCall]:
        with self._lock:
            return list(self._calls)

    def billed_count(self) -> int:
        with self._lock:
            return self._billed

    def snapshot(self, include_calls: bool = False) -> dict[str, Any]:
        """JSON-ready; integer keys become strings as JSON requires."""
        with self._lock:
            snap: dict[str, Any] = {
                "requests": self._requests,
                "control_requests": self._control,
                "by_endpoint": dict(self._by_endpoint),
                "billed": self._billed,
                "billed_by_sha": dict(self._billed_by_sha),
                "billed_unhashed": self._billed_unhashed,
                "requests_per_second": {
                    str(k): v for k, v in sorted(self._per_second.items())
                },
                "submits_per_second": {
                    str(k): v for k, v in sorted(self._submits_per_second.items())
                },
                "codes": {k: dict(v) for k, v in self._codes.items()},
                "http_status": {str(k): v for k, v in self._http.items()},
                "faults": dict(self._faults),
                "lost_ocrids": list(self._lost),
            }
            if include_calls:
                snap["calls"] = [
                    {
                        "at": c.at,
                        "provider": c.provider,
                        "ocrid": c.ocrid,
                        "sha256": c.sha256,
                        "code": c.code,
                        "lost": c.lost,
                    }
                    for c in self._calls
                ]
            return snap
