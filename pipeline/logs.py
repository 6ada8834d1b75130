"""Logging for every idocr process: plain text for a terminal, one JSON object per line for a
log collector (``--log-format json`` or ``IDOCR_LOG_FORMAT=json``).

PII never reaches a handler unmasked: :class:`pipeline.domain.masking.PIIFilter` redacts ID
numbers
from the message and the traceback, and the JSON formatter masks the structured fields too
(``extra={"name": …, "id_number": …}`` by their maskers, any other string by the ID-number
redaction). Numbers, booleans and None pass unchanged: an item id or a latency is not PII.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

from pipeline.domain.masking import PIIFilter, mask_fields, redact_text

__all__ = ["LOG_FORMATS", "MaskingJsonFormatter", "configure_logging", "mask_structured"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log every request at INFO.
_NOISY = ("httpx", "httpcore", "botocore", "urllib3", "alembic")


def mask_structured(key: str, value: Any) -> Any:
    """``value`` as it may be logged under ``key``: PII fields by their maskers, other strings
    with ID numbers redacted, containers recursively, anything else unchanged."""
    if isinstance(value, str):
        masked = mask_fields({key: value})[key]
        return masked if masked is not value else redact_text(value)
    if isinstance(value, Mapping):
        return {k: mask_structured(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [mask_structured(key, v) for v in value]
    return value


class MaskingJsonFormatter(JsonFormatter):
    """python-json-logger's formatter with every field masked (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # UTC, ISO 8601 with the offset
            json_ensure_ascii=False,  # masked Chinese fields stay readable
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {k: mask_structured(k, v) for k, v in log_data.items()}


def _level(verbose: int | str) -> int:
    if isinstance(verbose, str):
        return logging.getLevelNamesMapping().get(verbose.upper(), logging.INFO)
    if verbose >= logging.DEBUG:
        return verbose  # a logging level already (Celery's setup_logging hands one over)
    return logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING


def configure_logging(
    verbose: int | str = 0, fmt: str | None = None, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the root logger to ``stream`` (stderr) in ``fmt`` (default ``IDOCR_LOG_FORMAT`` or
    text), through the PII filter. ``verbose``: 0 warnings, 1 info, 2 debug, or a logging level
    (a number from 10 up, or its name). Returns the handler installed."""
    fmt = (fmt or os.environ.get("IDOCR_LOG_FORMAT") or "text").lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        MaskingJsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(PIIFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_level(verbose))
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
