"""Column types that keep personal data sealed at rest with the process's key ring.

Values are sealed when they are bound into a statement and opened when rows are read, so every
reader (exports, pairing, status) gets plain values and nothing unsealed reaches the database.
The place a value is sealed for is its column (``"results.name"``): a token copied into another
column does not open. A value written without a key (the embedded database without
``IDOCR_DATA_KEYS``) is read back as it is.

Sealed columns cannot be compared in SQL (each seal is randomised): look-ups go through a blind
index column (``results.id_number_index``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

from pipeline.storage.crypto import active_ring


class SealedText(TypeDecorator[str]):
    """Text sealed with AES-256-GCM (``enc1:`` tokens) under the current key."""

    impl = Text
    cache_ok = True
    #: how ``idocr keys rotate`` re-seals it (:meth:`KeyRing.reseal` kind)
    kind = "aead"

    def __init__(self, context: str) -> None:
        super().__init__()
        self.context = context

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        return active_ring().seal(str(value), self.context)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return active_ring().open(value, self.context)


class SealedJSON(TypeDecorator[Any]):
    """A JSON value sealed into one token, stored as a JSON string (JSONB on PostgreSQL);
    without a key the value is stored as plain JSON."""

    impl = JSON
    cache_ok = True
    kind = "json"

    def __init__(self, context: str) -> None:
        super().__init__()
        self.context = context

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return active_ring().seal_json(value, self.context)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return active_ring().open_json(value, self.context)
