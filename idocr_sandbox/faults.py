"""Fault injection: a seeded plan of HTTP errors, garbage, timeouts and provider codes."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from idocr_sandbox.showapi import SHOWAPI_OK

log = logging.getLogger(__name__)


# ====================================================================== fault plan


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str  # "timeout" | "http_500" | "garbage" | "code"
    code: int | None = None


def _code_target(key: str) -> tuple[str, int]:
    """``"4010"`` → ihuyi; ``"-2"`` → showapi; ``"ihuyi:1"`` / ``"showapi:-3"`` explicit.

    Unprefixed codes go by sign because the two code spaces do not overlap in practice: ihuyi's
    are non-negative, and showapi's envelope errors are negative by our choice above.
    """
    provider, _, code_s = key.rpartition(":")
    code = int(code_s)
    if not provider:
        provider = "showapi" if code < 0 else "ihuyi"
    if provider not in ("ihuyi", "showapi"):
        raise ValueError(f"fault code {key!r}: provider must be ihuyi or showapi")
    if (provider, code) in (("ihuyi", 2), ("showapi", SHOWAPI_OK)):
        raise ValueError(
            f"fault code {key!r} is the success code; it cannot be injected"
        )
    return provider, code


@dataclass(slots=True)
class FaultPlan:
    """Per-request fault rates in [0, 1], drawn independently per billable request.

    All kinds are drawn for every request, whatever their rate, so a seeded sandbox produces
    the same fault sequence for the same request sequence. When several fire, the first of
    timeout, http_500, garbage, codes (sorted by key), lost_after_billing wins: a request that
    never reached the provider cannot also have been billed.
    """

    http_500: float = 0.0
    garbage: float = 0.0
    timeout: float = 0.0
    lost_after_billing: float = 0.0
    codes: dict[str, float] = field(default_factory=dict)
    #: longer than any client timeout the pipeline uses, so a "timeout" really times out
    timeout_sleep: float = 30.0

    def __post_init__(self) -> None:
        for name in ("http_500", "garbage", "timeout", "lost_after_billing"):
            _check_rate(name, getattr(self, name))
        for key, rate in self.codes.items():
            _code_target(key)
            _check_rate(f"code:{key}", rate)
        if self.timeout_sleep < 0:
            raise ValueError("timeout_sleep must be >= 0")

    @classmethod
    def parse(cls, text: str | None) -> FaultPlan:
        """``"http_500=0.05,garbage=0.05,code:4010=0.1,lost_after_billing=0.02"``.

        Also ``code:showapi:-2=0.1`` and ``timeout_sleep=5``. Empty or ``none`` is no faults.
        """
        kwargs: dict[str, Any] = {}
        codes: dict[str, float] = {}
        for item in (text or "").split(","):
            item = item.strip()
            if not item or item.lower() == "none":
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"fault plan item {item!r}: expected key=value")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(
                    f"fault plan item {item!r}: {value!r} is not a number"
                ) from None
            if key.startswith("code:"):
                codes[key[len("code:") :]] = number
            elif key in (
                "http_500",
                "garbage",
                "timeout",
                "lost_after_billing",
                "timeout_sleep",
            ):
                kwargs[key] = number
            else:
                raise ValueError(f"fault plan item {item!r}: unknown fault {key!r}")
        return cls(codes=codes, **kwargs)

    def __str__(self) -> str:
        parts = [
            f"{name}={getattr(self, name):g}"
            for name in ("http_500", "garbage", "timeout", "lost_after_billing")
            if getattr(self, name)
        ]
        parts += [f"code:{k}={v:g}" for k, v in sorted(self.codes.items()) if v]
        if self.timeout and self.timeout_sleep != 30.0:
            parts.append(f"timeout_sleep={self.timeout_sleep:g}")
        return ",".join(parts) or "none"

    @property
    def active(self) -> bool:
        return any(
            (self.http_500, self.garbage, self.timeout, self.lost_after_billing)
        ) or any(self.codes.values())

    def draw(self, rng: random.Random, provider: str) -> tuple[_Fault | None, bool]:
        """(fault answered instead of processing, lost_after_billing) for one request."""
        hit_timeout = rng.random() < self.timeout
        hit_500 = rng.random() < self.http_500
        hit_garbage = rng.random() < self.garbage
        hit_lost = rng.random() < self.lost_after_billing
        code_hit: int | None = None
        for key in sorted(self.codes):
            fired = rng.random() < self.codes[key]
            target, code = _code_target(key)
            if fired and target == provider and code_hit is None:
                code_hit = code
        if hit_timeout:
            return _Fault("timeout"), False
        if hit_500:
            return _Fault("http_500"), False
        if hit_garbage:
            return _Fault("garbage"), False
        if code_hit is not None:
            return _Fault("code", code_hit), False
        return None, hit_lost


def _check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault rate {name}={rate} is outside [0, 1]")
