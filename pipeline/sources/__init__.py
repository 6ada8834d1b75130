"""Sources: where images come from. The location's scheme (:mod:`pipeline.locations`) picks the
connector: ``s3://bucket/prefix`` or a folder path (``file://`` URIs are what items store for
local files)."""

from __future__ import annotations

from pipeline.locations import load, scheme_of
from pipeline.sources.base import Source, SourceError, SourceRef

__all__ = [
    "Source",
    "SourceError",
    "SourceRef",
    "head_uri",
    "open_source",
    "presign_uri",
    "read_uri",
]


def open_source(
    location: str, *, endpoint_url: str | None = None, follow_symlinks: bool = False
) -> Source:
    """``follow_symlinks``: a folder also takes links whose target lies outside it."""
    opener = load(scheme_of(location).source)
    source: Source = opener(location, endpoint_url=endpoint_url, follow_symlinks=follow_symlinks)
    return source


def read_uri(uri: str, *, endpoint_url: str | None = None) -> bytes:
    data: bytes = load(scheme_of(uri).read)(uri, endpoint_url=endpoint_url)
    return data


def head_uri(uri: str, n: int = 1024, *, endpoint_url: str | None = None) -> bytes:
    """The first ``n`` bytes behind a URI, without reading the rest where the store allows."""
    scheme = scheme_of(uri)
    if scheme.head is None:
        return read_uri(uri, endpoint_url=endpoint_url)[:n]
    data: bytes = load(scheme.head)(uri, n, endpoint_url=endpoint_url)
    return data


def presign_uri(uri: str, expires: int, *, endpoint_url: str | None = None) -> str:
    """A URL the provider can fetch the object from (S3: a presigned GET)."""
    scheme = scheme_of(uri)
    if scheme.presign is None:
        raise SourceError(f"{scheme.name} sources cannot give the provider a URL (s3:// can)")
    url: str = load(scheme.presign)(uri, expires, endpoint_url=endpoint_url)
    return url
