"""The provider protocol and the one taxonomy every provider's answers map into.

Exception tree::

    ProviderError                 base; never carries image bytes, keys or ID numbers
    └── BalanceError              a balance query was refused or failed

A submit never raises for the provider's answer: it returns a :class:`ProviderResult` whose
outcome says what happened (transient failures included).

Retry code looks only at :class:`Outcome`, never at provider codes or strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class Outcome(enum.StrEnum):
    OK = "ok"
    TRANSIENT = "transient"  # retry with backoff
    IMAGE = "image"  # the image is at fault: the item fails, never retried
    QUOTA = "quota"  # paid quota exhausted: pause, the item goes back to the queue
    AUTH = "auth"  # key, account or IP problem: pause, items untouched
    CLOCK = "clock"  # signature time rejected: re-sign once, then pause
    UNKNOWN = "unknown"  # request sent, answer lost: it may have been billed; retried as transient
    ERROR = "error"  # any other refusal (an unlisted code): the item fails, never retried


@dataclass(frozen=True, slots=True)
class ImagePayload:
    """What is sent: the bytes (base64-encoded by the client) or a URL the provider fetches."""

    data: bytes | None = None
    url: str | None = None
    side: str | None = None  # "front" | "back" when known; providers may auto-detect

    def __post_init__(self) -> None:
        if (self.data is None) == (self.url is None):
            raise ValueError("exactly one of data and url must be given")

    def __repr__(self) -> str:  # never print image bytes
        what = f"{len(self.data)} bytes" if self.data is not None else "url"
        return f"ImagePayload({what}, side={self.side!r})"


@dataclass(slots=True)
class ProviderResult:
    """One provider call, normalised.

    ``fields`` uses the result record's names (name, gender, ethnicity, date_of_birth, domicile,
    id_number, issue_authority, valid_from, valid_to) with dates as YYYY-MM-DD. ``raw`` is the
    provider's parsed body, kept for audit; ``msg`` is the provider's message or ours.
    """

    outcome: Outcome
    code: str
    msg: str
    ocrid: str | None = None
    side: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. showapi quality flags
    raw: Any = None
    http_status: int | None = None
    sent_at: int | None = None  # the signed Unix time of the request


class ProviderError(Exception):
    """Base of the provider exceptions. Messages never carry secrets or personal data."""


class BalanceError(ProviderError):
    """A balance query was refused or failed; ``result`` says how."""

    def __init__(self, result: ProviderResult) -> None:
        super().__init__(f"balance query failed: {result.outcome} code={result.code} {result.msg}")
        self.result = result


class Provider(Protocol):
    name: str
    #: the account the rate limit and quota are kept for (never the key)
    account: str

    def submit(self, image: ImagePayload) -> ProviderResult:
        """``send(prepare(image))``."""
        ...

    def prepare(self, image: ImagePayload) -> Any:
        """The request with its costly part done (encoding the image), made before the
        rate-limiter slot so that little work lies between the slot and the send."""
        ...

    def send(self, call: Any) -> ProviderResult:
        """Send a prepared request (signed anew, with a fresh time, at every send)."""
        ...

    def balance(self) -> int | None: ...

    def close(self) -> None: ...
