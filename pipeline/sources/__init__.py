"""Sources: where images come from. A URI picks the connector: ``s3://bucket/prefix`` or a
folder path (``file://`` URIs are what items store for local files)."""

from __future__ import annotations

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
    if location.startswith("s3://"):
        from pipeline.sources.s3 import S3Source

        return S3Source(location, endpoint_url=endpoint_url)
    from pipeline.sources.local import LocalSource

    return LocalSource(location, follow_symlinks=follow_symlinks)


def read_uri(uri: str, *, endpoint_url: str | None = None) -> bytes:
    if uri.startswith("s3://"):
        from pipeline.sources.s3 import read_s3_uri

        return read_s3_uri(uri, endpoint_url=endpoint_url)
    from pipeline.sources.local import read_uri as read_file_uri

    return read_file_uri(uri)


def head_uri(uri: str, n: int = 1024, *, endpoint_url: str | None = None) -> bytes:
    """The first ``n`` bytes behind a URI, without reading the rest."""
    if uri.startswith("s3://"):
        from pipeline.sources.s3 import head_s3_uri

        return head_s3_uri(uri, n, endpoint_url=endpoint_url)
    return read_uri(uri)[:n]


def presign_uri(uri: str, expires: int, *, endpoint_url: str | None = None) -> str:
    """A URL the provider can fetch the object from (S3 only: a presigned GET)."""
    if not uri.startswith("s3://"):
        raise SourceError("only s3:// sources can give the provider a URL")
    from pipeline.sources.s3 import presign_s3_uri

    return presign_s3_uri(uri, expires, endpoint_url=endpoint_url)
