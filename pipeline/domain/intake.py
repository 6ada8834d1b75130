"""The intake contract: what another system hands idocr, and how a message is read.

A request names one image, an idempotency key chosen by the caller, and optionally the card's
side, a batch and a small metadata object echoed back in its events. The same model validates
every way in (the intake stream, :mod:`pipeline.client`, ``idocr submit``) and generates
``docs/intake.schema.json``. Nothing here touches the network, a database or Redis.

Messages on the stream carry the request as JSON in one field, ``request``; other fields are
ignored (the Python client adds ``channel``, recorded as the request's channel). A message that
cannot be a request is refused with a :class:`BadRequest` naming the reason, never an exception
that would stop a consumer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: the stream field holding the request's JSON
REQUEST_FIELD = "request"
#: an optional stream field naming the way in (``client``); anything else counts as ``stream``
CHANNEL_FIELD = "channel"
CHANNELS = ("stream", "client", "cli")

#: the most bytes a stream message may carry (all fields, names and values); larger ones are
#: refused unread
MAX_MESSAGE_BYTES = 16 * 1024
#: idempotency keys: 1-128 characters from a URL- and log-safe alphabet
MAX_KEY_LENGTH = 128
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$"
#: the metadata object, as compact JSON
MAX_METADATA_BYTES = 4096
MAX_IMAGE_LENGTH = 2048
MAX_BATCH_LENGTH = 64
BATCH_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

_KEY = re.compile(KEY_PATTERN)

#: refusal reasons (``requests.reason`` starts with one of them, then ": " and a detail)
MALFORMED = "malformed"  # not JSON, not an object, no request field
INVALID = "invalid"  # a field missing, of the wrong type, unknown, or out of its limits
NO_KEY = "missing_key"
TOO_LARGE = "too_large"
LOCATION = "location_refused"  # a path outside the intake roots, an unsupported scheme
PRIVATE_ADDRESS = "private_address"
BATCH_CONFLICT = "batch_conflict"
INTERNAL = "internal_error"


class IntakeRequest(BaseModel):
    """One image handed over by another system."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="idocr intake request",
        json_schema_extra={
            "$id": "https://idocr.invalid/schemas/intake.schema.json",
            "description": (
                "One ID-card image handed to idocr. Sent as the JSON value of the field "
                "'request' of an entry of the intake stream (IDOCR_INTAKE_STREAM, default "
                "idocr:intake). See docs/intake.md."
            ),
        },
    )

    image: str = Field(
        min_length=1,
        max_length=MAX_IMAGE_LENGTH,
        description=(
            "Where the image is: s3://bucket/key, an https:// URL (public addresses only "
            "unless IDOCR_INTAKE_ALLOW_PRIVATE=true), or an absolute path under one of the "
            "folders of IDOCR_INTAKE_ROOTS."
        ),
    )
    key: str = Field(
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        pattern=KEY_PATTERN,
        description=(
            "The caller's idempotency key: the same key is processed once, whatever is sent "
            "again under it; its result is read at <prefix>result:<key>. Letters, digits and "
            "._:@/+=- (not first), at most 128 characters."
        ),
    )
    side: Literal["front", "back"] | None = Field(
        default=None, description="The side of the card, when the caller knows it."
    )
    batch: str | None = Field(
        default=None,
        max_length=MAX_BATCH_LENGTH,
        pattern=BATCH_PATTERN,
        description="The batch to add the image to (default: intake-YYYYMMDD, in UTC).",
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description=(
            "A small JSON object (at most 4096 bytes as compact JSON), stored encrypted and "
            "echoed back in the request's events."
        ),
    )

    @field_validator("image")
    @classmethod
    def _no_control_characters(cls, v: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and len(compact(v).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as compact JSON")
        return v

    def to_message(self, channel: str | None = None) -> dict[str, str]:
        """The stream entry's fields for this request."""
        fields = {REQUEST_FIELD: compact(self.model_dump(exclude_none=True))}
        if channel:
            fields[CHANNEL_FIELD] = channel
        return fields


class BadRequest(Exception):
    """A message that cannot be accepted. ``key``: the caller's key when one could be read.
    The message names fields and limits, never their values."""

    def __init__(self, reason: str, detail: str, key: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.key = key

    @property
    def text(self) -> str:
        return f"{self.reason}: {self.detail}"


def compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def valid_key(key: object) -> bool:
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def synthetic_key(stream: str, entry_id: str) -> str:
    """The key a refused message without a usable key of its own is recorded under: ``#`` is
    outside the callers' alphabet, so it never meets one of theirs."""
    return f"#{stream}#{entry_id}"[:200]


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def message_size(fields: Mapping[Any, Any]) -> int:
    total = 0
    for k, v in fields.items():
        for part in (k, v):
            total += len(part) if isinstance(part, bytes | str) else len(str(part))
    return total


def describe_errors(exc: ValidationError) -> str:
    """Which fields and why, without the values (pydantic would quote them)."""
    parts = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = ".".join(str(p) for p in e["loc"]) or "request"
        kind = e["type"]
        if kind == "extra_forbidden":
            parts.append(f"{loc}: unknown field")
        elif kind == "missing":
            parts.append(f"{loc}: required")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_request(data: Any) -> IntakeRequest:
    """A request from its decoded JSON; :class:`BadRequest` when it is not one."""
    if not isinstance(data, dict):
        raise BadRequest(MALFORMED, "the request must be a JSON object")
    raw_key = data.get("key")
    key = raw_key if valid_key(raw_key) else None
    if raw_key is None:
        raise BadRequest(NO_KEY, "key: required (the caller's idempotency key)")
    try:
        return IntakeRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(INVALID, describe_errors(exc), key) from None


def parse_message(fields: Mapping[Any, Any]) -> tuple[IntakeRequest, str]:
    """(request, channel) from a stream entry's fields (bytes or text)."""
    if message_size(fields) > MAX_MESSAGE_BYTES:
        raise BadRequest(TOO_LARGE, f"the message is larger than {MAX_MESSAGE_BYTES} bytes")
    decoded: dict[str, Any] = {}
    for k, v in fields.items():
        name = _text(k)
        if name is not None:
            decoded[name] = _text(v)
    channel = "client" if decoded.get(CHANNEL_FIELD) == "client" else "stream"
    raw = decoded.get(REQUEST_FIELD)
    if raw is None:
        raise BadRequest(MALFORMED, f"no {REQUEST_FIELD!r} field holding the request as UTF-8 JSON")
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest(MALFORMED, f"the {REQUEST_FIELD!r} field is not valid JSON") from None
    return parse_request(data), channel


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a request (``docs/intake.schema.json``)."""
    schema = IntakeRequest.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
