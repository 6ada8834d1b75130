"""Where a location points: the one registry of URI schemes, for sources (scan, read, head,
presign) and outputs alike.

A location is ``s3://bucket/prefix`` or a local path (``file://`` URIs are what items store for
local files). Any other scheme is refused with one clear message rather than taken for a folder
named ``gs:``. Each scheme names its connectors by ``module:attribute``, loaded on first use: a
run over a local folder never imports boto3.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    #: ``open(location, **options)`` → a Source (options it does not use are ignored)
    source: str
    #: ``read(uri, **options)`` → the object's bytes
    read: str
    #: ``head(uri, n, **options)`` → its first ``n`` bytes; None: the first ``n`` of ``read``
    head: str | None
    #: ``presign(uri, expires, **options)`` → a URL a provider can fetch; None: cannot
    presign: str | None
    #: ``open(location, **options)`` → an output sink
    output: str


SCHEMES: dict[str, Scheme] = {
    "s3": Scheme(
        "s3",
        source="pipeline.sources.s3:open_location",
        read="pipeline.sources.s3:read_s3_uri",
        head="pipeline.sources.s3:head_s3_uri",
        presign="pipeline.sources.s3:presign_s3_uri",
        output="pipeline.outputs.files:open_s3_output",
    ),
    "file": Scheme(
        "file",
        source="pipeline.sources.local:open_location",
        read="pipeline.sources.local:read_uri",
        head=None,
        presign=None,
        output="pipeline.outputs.files:open_folder_output",
    ),
    # one image named by URL (intake requests), fetched by the worker: never scanned or written
    "https": Scheme(
        "https",
        source="pipeline.sources.https:open_location",
        read="pipeline.sources.https:read_https_uri",
        head=None,
        presign=None,
        output="pipeline.sources.https:open_output",
    ),
}


def scheme_of(location: str) -> Scheme:
    """The scheme of ``location``; ValueError for one idocr does not read or write."""
    match = _URL.match(location)
    name = "file" if match is None else match.group(0)[:-3].lower()
    scheme = SCHEMES.get(name)
    if scheme is None:
        raise ValueError(
            f"unsupported location scheme {name!r}: give s3://bucket/prefix or a local folder"
        )
    return scheme


@lru_cache(maxsize=64)
def load(ref: str) -> Any:
    """The object a ``module:attribute`` reference names (looked up once: every read of an
    image goes through its scheme's reader)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
