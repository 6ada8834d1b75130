"""Quantities as people write them in settings and options: ages (``30d``), sizes (``256MiB``)."""

from __future__ import annotations

import re
from datetime import timedelta

_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_AGE_UNITS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_age(text: str) -> timedelta:
    """``90d``, ``12h``, ``2w``, ``30m``, ``45s`` (a bare number is days) as a positive
    duration; ValueError otherwise."""
    m = _AGE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not an age such as 90d, 12h or 2w")
    seconds = float(m.group(1)) * _AGE_UNITS[m.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"{text!r}: an age must be more than zero")
    return timedelta(seconds=seconds)


def parse_size(value: str | int) -> int:
    """Bytes: ``268435456``, ``256M``, ``256MiB``, ``1.5G`` (binary multiples); ValueError
    otherwise."""
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.fullmatch(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size such as 256MiB or 268435456")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"{value!r}: a size must be more than zero bytes")
    return n


def format_age(age: timedelta) -> str:
    """The shortest of ``Nd``, ``Nh``, ``Nm``, ``Ns`` that states ``age`` exactly."""
    seconds = int(age.total_seconds())
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
