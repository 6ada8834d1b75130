"""Personal data encrypted at rest: a key ring from the environment (``IDOCR_DATA_KEYS``).

``IDOCR_DATA_KEYS`` is a comma-separated list of ``kid:base64(32 random bytes)`` entries
(``idocr keys new`` prints one). The first entry is the current key, used for everything written;
every entry is used for reading, so a new key is prepended and the old one kept until
``idocr keys rotate`` has re-encrypted what it protected.

Three kinds of value:

- ``seal``/``open``: AES-256-GCM, a random 96-bit nonce, the value's place (``"results.name"``)
  as associated data, so a value copied into another column does not open. Token:
  ``enc1:<kid>:<urlsafe-b64(nonce + ciphertext)>``.
- ``seal_fixed``: deterministic (AES-SIV under a key derived with HKDF), for values that must
  stay unique and searchable by equality (a file name in a unique constraint). Token:
  ``det1:<kid>:<urlsafe-b64(ciphertext)>``. Equal inputs give equal tokens under one key only.
- ``blind_index``: ``<kid>:<hex HMAC-SHA256>`` under a derived key, for look-ups by ID number
  without decrypting the table; ``blind_indexes`` gives one per key of the ring (look-ups
  during a rotation).

A value without a token prefix was written without a key and is returned as it is. Errors name
the key id and the value's place, never key material or data.

The place (``context``) of a value stored in a column is ``"<table>.<column>"``: ``idocr keys
rotate`` opens and re-seals stored values under that name. The process's ring is the one of
``IDOCR_DATA_KEYS`` in its environment (:func:`active_ring`), which the schema's sealed column
types use (:mod:`pipeline.storage.sealed`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from pipeline.config import Settings

ENV_VAR = "IDOCR_DATA_KEYS"
AEAD_PREFIX = "enc1:"
FIXED_PREFIX = "det1:"
KEY_BYTES = 32
NONCE_BYTES = 12
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class CryptoError(Exception):
    """A value cannot be sealed or opened; the message names the key id and the place only."""


class KeyRingError(CryptoError, ValueError):
    """``IDOCR_DATA_KEYS`` cannot be used (the message never quotes key material)."""


class UnknownKeyError(CryptoError):
    """A value was sealed under a key that is not in the ring."""

    def __init__(self, kid: str, context: str) -> None:
        super().__init__(
            f"{context}: value sealed under key {kid!r}, which is not in {ENV_VAR} "
            "(add that key back to the ring to read it)"
        )
        self.kid = kid


class TamperedError(CryptoError):
    """A token did not authenticate: altered, truncated, or moved to another place."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(key: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def normalise_id_number(value: str) -> str:
    """The form an ID number is indexed under: no whitespace, an upper-case check letter X."""
    return "".join(value.split()).upper()


@dataclass(frozen=True)
class _Key:
    kid: str
    aead: AESGCM
    siv: AESSIV
    index_key: bytes = field(repr=False)

    @classmethod
    def build(cls, kid: str, material: bytes) -> _Key:
        return cls(
            kid=kid,
            aead=AESGCM(material),
            siv=AESSIV(_derive(material, b"idocr/det1/aes-siv", 2 * KEY_BYTES)),
            index_key=_derive(material, b"idocr/blind-index/hmac-sha256"),
        )


def _split(token: str) -> tuple[str, str, str] | None:
    """(prefix, kid, payload) of a token, None for a value that is not one."""
    if token.startswith(AEAD_PREFIX):
        prefix = AEAD_PREFIX
    elif token.startswith(FIXED_PREFIX):
        prefix = FIXED_PREFIX
    else:
        return None
    kid, sep, payload = token[len(prefix) :].partition(":")
    if not sep or not _KID.match(kid):
        return None
    return prefix, kid, payload


def token_kid(token: Any) -> str | None:
    """The key id a token was sealed under; None for anything that is not a token."""
    if not isinstance(token, str):
        return None
    parts = _split(token)
    return parts[1] if parts else None


def is_token(value: Any) -> bool:
    return token_kid(value) is not None


class KeyRing:
    """The keys of ``IDOCR_DATA_KEYS``: the first writes, all read. Disabled when empty."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        self._keys: dict[str, _Key] = {kid: _Key.build(kid, material) for kid, material in keys}
        self._order = [kid for kid, _ in keys]

    def __repr__(self) -> str:  # never the key material
        return f"KeyRing(kids={self._order!r})"

    @classmethod
    def parse(cls, spec: str | None) -> KeyRing:
        keys: list[tuple[str, bytes]] = []
        for n, entry in enumerate((spec or "").split(","), start=1):
            entry = entry.strip()
            if not entry:
                continue
            kid, sep, b64 = entry.partition(":")
            kid = kid.strip()
            if not sep or not _KID.match(kid):
                raise KeyRingError(
                    f"{ENV_VAR}: entry {n} is not kid:base64-key (a key id of letters, digits, "
                    "'-', '_' or '.'; `idocr keys new` prints one)"
                )
            try:
                material = base64.b64decode(b64.strip(), validate=True)
            except (binascii.Error, ValueError):
                try:
                    material = _b64d(b64.strip())
                except (binascii.Error, ValueError):
                    raise KeyRingError(
                        f"{ENV_VAR}: the key of {kid!r} is not base64 (`idocr keys new` prints "
                        "a valid entry)"
                    ) from None
            if len(material) != KEY_BYTES:
                raise KeyRingError(
                    f"{ENV_VAR}: the key of {kid!r} is {len(material)} bytes, not {KEY_BYTES} "
                    "(`idocr keys new` prints a valid entry)"
                )
            if any(kid == k for k, _ in keys):
                raise KeyRingError(f"{ENV_VAR}: key id {kid!r} appears twice")
            keys.append((kid, material))
        return cls(keys)

    # -- the ring --------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._order)

    @property
    def current_kid(self) -> str | None:
        return self._order[0] if self._order else None

    @property
    def kids(self) -> list[str]:
        return list(self._order)

    def _current(self) -> _Key:
        return self._keys[self._order[0]]

    def _key(self, kid: str, context: str) -> _Key:
        try:
            return self._keys[kid]
        except KeyError:
            raise UnknownKeyError(kid, context) from None

    # -- sealing ---------------------------------------------------------------------------
    def seal(self, value: str | None, context: str) -> str | None:
        """AES-256-GCM under the current key; None and a disabled ring pass values through."""
        if value is None or not self.enabled:
            return value
        key = self._current()
        nonce = os.urandom(NONCE_BYTES)
        ct = key.aead.encrypt(nonce, value.encode("utf-8"), context.encode("utf-8"))
        return f"{AEAD_PREFIX}{key.kid}:{_b64e(nonce + ct)}"

    def seal_fixed(self, value: str, context: str) -> str:
        """Deterministic (AES-SIV): the same value and place give the same token under one key,
        so a unique constraint and equality look-ups keep working. Reveals equality only."""
        if not self.enabled:
            return value
        key = self._current()
        ct = key.siv.encrypt(value.encode("utf-8"), [context.encode("utf-8")])
        return f"{FIXED_PREFIX}{key.kid}:{_b64e(ct)}"

    def seal_fixed_all(self, value: str, context: str) -> list[str]:
        """``seal_fixed`` under every key of the ring (equality look-ups during a rotation)."""
        if not self.enabled:
            return [value]
        out = []
        for kid in self._order:
            ct = self._keys[kid].siv.encrypt(value.encode("utf-8"), [context.encode("utf-8")])
            out.append(f"{FIXED_PREFIX}{kid}:{_b64e(ct)}")
        return out

    def open(self, token: str | None, context: str) -> str | None:
        """The plain value of a token (either kind); a value that is not a token is returned as
        it is (written without a key)."""
        if token is None:
            return None
        parts = _split(token)
        if parts is None:
            return token
        prefix, kid, payload = parts
        key = self._key(kid, context)
        try:
            blob = _b64d(payload)
            if prefix == AEAD_PREFIX:
                if len(blob) < NONCE_BYTES + 16:
                    raise InvalidTag
                plain = key.aead.decrypt(
                    blob[:NONCE_BYTES], blob[NONCE_BYTES:], context.encode("utf-8")
                )
            else:
                plain = key.siv.decrypt(blob, [context.encode("utf-8")])
            return plain.decode("utf-8")
        except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
            raise TamperedError(
                f"{context}: a value sealed under key {kid!r} does not authenticate "
                "(altered, truncated, or not written for this place)"
            ) from None

    def seal_json(self, obj: Any, context: str) -> Any:
        """A JSON value sealed into a token string (for a JSON column: the token is stored as
        a JSON string). None, and anything when the ring is disabled, pass through."""
        if obj is None or not self.enabled:
            return obj
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return self.seal(text, context)

    def open_json(self, token: Any, context: str) -> Any:
        """The JSON value of a ``seal_json`` token; anything that is not a token as it is."""
        if not is_token(token):
            return token
        text = self.open(token, context)
        return None if text is None else json.loads(text)

    # -- look-ups --------------------------------------------------------------------------
    def blind_index(self, value: str | None) -> str | None:
        """``<kid>:<hex HMAC-SHA256>`` of the normalised value under the current key; None when
        there is no value or no key."""
        if value is None or not self.enabled:
            return None
        return self._index(self._current(), value)

    def blind_indexes(self, value: str | None) -> list[str]:
        """The blind index under every key of the ring, current first."""
        if value is None or not self.enabled:
            return []
        return [self._index(self._keys[kid], value) for kid in self._order]

    @staticmethod
    def _index(key: _Key, value: str) -> str:
        mac = hmac.new(key.index_key, normalise_id_number(value).encode("utf-8"), hashlib.sha256)
        return f"{key.kid}:{mac.hexdigest()}"

    # -- rotation --------------------------------------------------------------------------
    def needs_rotation(self, token: Any) -> bool:
        """True for a value the current key did not write: a token under an older key, or a
        plain value written without a key (when the ring has one). None never does."""
        if token is None or not self.enabled:
            return False
        kid = token_kid(token)
        return kid != self.current_kid

    def index_needs_rotation(self, index: str | None) -> bool:
        """True for a blind index not computed under the current key."""
        if index is None or not self.enabled:
            return False
        return index.split(":", 1)[0] != self.current_kid

    def reseal(self, token: Any, context: str, kind: str = "aead") -> Any:
        """The value of ``token`` sealed again under the current key, keeping its kind:
        ``aead`` (``seal``), ``fixed`` (``seal_fixed``) or ``json`` (``seal_json``)."""
        if kind == "json":
            return self.seal_json(self.open_json(token, context), context)
        plain = self.open(token, context)
        if plain is None:
            return None
        if kind == "fixed":
            return self.seal_fixed(plain, context)
        return self.seal(plain, context)


def new_key_entry(kid: str | None = None) -> str:
    """A fresh ``kid:base64`` entry for ``IDOCR_DATA_KEYS`` (32 random bytes)."""
    kid = kid or "k" + secrets.token_hex(4)
    if not _KID.match(kid):
        raise KeyRingError("a key id is 1-32 letters, digits, '-', '_' or '.'")
    return f"{kid}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode('ascii')}"


@lru_cache(maxsize=4)
def _ring_for(spec: str) -> KeyRing:
    return KeyRing.parse(spec)


def active_ring() -> KeyRing:
    """The ring of ``IDOCR_DATA_KEYS`` in this process's environment (parsed once per value)."""
    return _ring_for(os.environ.get(ENV_VAR, ""))


def keyring(settings: Settings) -> KeyRing:
    """The ring of these settings, built once per process (per distinct key list)."""
    secret = getattr(settings, "data_keys", None)
    spec = secret.get_secret_value() if secret is not None else ""
    return _ring_for(spec)
