"""What every source yields: serialisable references to objects, and their bytes on demand.

A source never holds its whole listing in memory: ``iter_refs`` is a generator, and the
producer consumes it in chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SourceRef:
    """One object of a source.

    ``key`` is the object's path within the source (POSIX separators, relative to the folder or
    the S3 prefix); ``uri`` locates it absolutely (``file:///abs/path`` or ``s3://bucket/key``).
    ``error`` is set when the object could be listed but not read (unreadable file): it still
    becomes an item, rejected with that reason.
    """

    key: str
    uri: str
    size: int | None = None
    etag: str | None = None
    sha256: str | None = None
    #: the format sniffed from the content ("jpeg", "png", … or "unknown") when the source read it
    media: str | None = None
    error: str | None = None


class SourceError(Exception):
    """A source could not be listed or read (after its own retries)."""


class Source(Protocol):
    uri: str

    def iter_refs(self) -> Iterator[SourceRef]: ...

    def read_bytes(self, key: str) -> bytes: ...
