"""Source names at rest: file names and locations are personal data.

Scanned files are very often named after the person (``张三 正面.jpg``) or their ID number
(``110101199003077777.jpg``). With ``IDOCR_DATA_KEYS`` set, ``items.source_key``,
``items.source_uri``, ``items.pair_key`` and ``batches.source`` are stored sealed with the
key ring's *deterministic* seal (``det1:`` tokens, :meth:`KeyRing.seal_fixed`): the same name
under the same key always gives the same token, so the unique constraint on
(batch, key, fingerprint), the rescan look-ups by location and the pairing of a card's two sides
by their shared name keep working in SQL, on tokens. Equal names are the only thing the tokens
reveal.

The column type seals every value bound to it (inserts, updates and look-up parameters alike)
and opens every value read from it, so the code above the storage layer sees plain names only.
An item's message is stored with any ID number in it masked (:class:`RedactedText`).
A value written without a key (the embedded database without ``IDOCR_DATA_KEYS``, or a name
replaced by :mod:`pipeline.workflows.retention`) is read back as it is.

A parameter compared with such a column is sealed under the current key. The rescan look-ups
(:func:`pipeline.storage.repo.name_in`) also try every other key of the ring and the plain name,
so a new key put first, or a key added to a database written without one, never makes a rescan
take its files again; the two sides of a card sealed under different keys pair once
``idocr keys rotate`` has re-sealed them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Text
from sqlalchemy.types import TypeDecorator

from pipeline.domain.masking import redact_text
from pipeline.storage.crypto import active_ring

#: how :class:`SealedName` values are re-sealed by a key rotation (``KeyRing.reseal`` kind)
RESEAL_KIND = "fixed"


class SealedName(TypeDecorator[str]):
    """Text sealed deterministically (AES-SIV, ``det1:`` tokens) under the current key, for
    names that stay unique and searchable by equality. ``context`` is ``"<table>.<column>"``."""

    impl = Text
    cache_ok = True
    kind = RESEAL_KIND

    def __init__(self, context: str) -> None:
        super().__init__()
        self.context = context

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        return active_ring().seal_fixed(str(value), self.context)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return active_ring().open(value, self.context)


class RedactedText(TypeDecorator[str]):
    """Free text (an item's message) stored with its ID numbers masked: a read error quotes
    the object's location (``cannot read s3://bucket/110101….jpg``), and the record already
    names its source."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else redact_text(str(value))
