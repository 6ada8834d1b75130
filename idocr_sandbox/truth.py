"""The ground truth the sandbox answers from: which image shows which card.

A truth file is UTF-8 JSON::

    {"images": [{"file": "images/x.jpg", "sha256": "<hex>", "side": "front",
                 "fields": {"name": ..., "id_number": ..., ...}}]}

``file`` is relative to the truth file. ``fields`` are already normalised (the result record's
names, dates as YYYY-MM-DD, ``valid_to`` may be "长期"). An optional ``quality`` list is what
showapi's ``needQuality=1`` reports (default ``["photo"]``).

Lookup is exact by sha256 first; otherwise perceptual, by a 64-bit difference hash, because the
pipeline normalises images before sending them (downscale, re-encode) and must still be
recognised. A sandbox that only knew exact bytes would fail every normalised image and hide
whether the pipeline's field handling works. A PDF truth file (ihuyi accepts PDF and reads its
first page) is hashed on that page as :func:`pipeline.domain.images.prepare` renders it, since that
rendering, not the PDF, is what the pipeline sends.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps
from pipeline.domain.images import (
    SNIFF_BYTES,
    ImageLimits,
    ImageRejected,
    prepare,
    sniff,
)

__all__ = [
    "BACK_FIELDS",
    "DHASH_MAX_DISTANCE",
    "FRONT_FIELDS",
    "Match",
    "TruthEntry",
    "TruthIndex",
    "decode_image",
    "dhash",
    "dhash_image",
]

log = logging.getLogger(__name__)

Side = Literal["front", "back"]

FRONT_FIELDS = ("name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number")
BACK_FIELDS = ("issue_authority", "valid_from", "valid_to")

#: Re-encoding and 50 % downscales move a 64-bit dhash by a few bits; unrelated images differ by
#: ~32. Six keeps a wide margin on both sides.
DHASH_MAX_DISTANCE = 6

DEFAULT_QUALITY: tuple[str, ...] = ("photo",)


def decode_image(data: bytes) -> Image.Image | None:
    """The fully decoded image, or None when the bytes are not an image Pillow can read.

    ``load()`` is forced here because Pillow opens lazily: a truncated JPEG passes ``open`` and
    only fails on first pixel access.
    """
    try:
        img = Image.open(io.BytesIO(data))
        # A decompression bomb is "not an image" here rather than a warning on stderr; checked
        # by hand because warnings.catch_warnings is not thread-safe in a threaded server.
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:
            return None
        img.load()
        return img
    except Exception:  # noqa: BLE001 -- any decoder failure means "not an image" here
        return None


def dhash_image(img: Image.Image) -> int:
    """64-bit difference hash: grayscale, 9x8, one bit per horizontally adjacent pixel pair."""
    # Orientation is applied so an image whose EXIF says "rotate" hashes like the upright copy
    # a normaliser writes (which drops the EXIF tag); a broken EXIF block must not make an
    # otherwise fine image unusable, so it is then hashed as stored.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    small = img.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    px = small.tobytes()
    bits = 0
    for row in range(8):
        base = row * 9
        for col in range(8):
            bits = (bits << 1) | (px[base + col] > px[base + col + 1])
    return bits


def dhash(data: bytes) -> int | None:
    """dhash of encoded image bytes; None when they do not decode."""
    img = decode_image(data)
    return None if img is None else dhash_image(img)


def _truth_dhash(data: bytes) -> int | None:
    """dhash of a truth file: an image as stored, a PDF as the pipeline sends it.

    The pipeline never sends a PDF itself but its first page rendered by
    :func:`pipeline.domain.images.prepare`, so that rendering is what a PDF truth entry must resemble.
    Grayscale is not refused here: that is the pipeline's policy, not a property of the truth.
    """
    if sniff(data[:SNIFF_BYTES]) != "pdf":
        return dhash(data)
    try:
        rendered = prepare(data, ImageLimits(reject_grayscale=False))
    except ImageRejected:
        return None
    return dhash(rendered.data)


@dataclass(slots=True)
class TruthEntry:
    """One known card image. Owned by its index (``dhash`` is filled in lazily)."""

    sha256: str
    side: Side
    fields: dict[str, str]
    file: Path | None = None
    quality: tuple[str, ...] = DEFAULT_QUALITY
    dhash: int | None = None
    # True until the file was read once; then dhash is known or the file is missing/broken.
    dhash_pending: bool = False

    def __repr__(self) -> str:  # the fields are personal data: never in reprs or logs
        return f"TruthEntry(sha256={self.sha256[:12]}…, side={self.side!r})"


@dataclass(frozen=True, slots=True)
class Match:
    """The answer to a lookup, with why: the server words its error messages from ``reason``."""

    entry: TruthEntry | None
    # "sha256" | "dhash" when found; "undecodable" | "unknown" | "ambiguous" when not
    reason: str
    distance: int | None = None


def _normalise_fields(side: str, fields: Mapping[str, Any]) -> dict[str, str]:
    names = FRONT_FIELDS if side == "front" else BACK_FIELDS
    out = {k: "" if fields.get(k) is None else str(fields.get(k)) for k in names}
    # Extra keys are kept: a truth file may carry more than the sandbox reports.
    out.update({k: str(v) for k, v in fields.items() if k not in out and v is not None})
    return out


class TruthIndex:
    """Known card images, looked up by exact bytes or by perceptual hash. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sha: dict[str, TruthEntry] = {}
        self._pending = 0

    # ---------------------------------------------------------------- building

    @classmethod
    def load(cls, *paths: str | os.PathLike[str]) -> TruthIndex:
        index = cls()
        for path in paths:
            index.load_file(path)
        return index

    def load_file(self, path: str | os.PathLike[str]) -> int:
        """Add every entry of one truth file; returns how many were added."""
        path = Path(path)
        doc = json.loads(path.read_text(encoding="utf-8"))
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, list):
            raise ValueError(f"{path}: a truth file is an object with an 'images' list")  # noqa: TRY004
        added = 0
        for i, raw in enumerate(images):
            where = f"{path}: images[{i}]"
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: not an object")  # noqa: TRY004
            side = raw.get("side")
            if side not in ("front", "back"):
                raise ValueError(f"{where}: side must be 'front' or 'back'")
            fields = raw.get("fields") or {}
            if not isinstance(fields, dict):
                raise ValueError(f"{where}: fields must be an object")  # noqa: TRY004
            file = path.parent / raw["file"] if raw.get("file") else None
            sha = str(raw.get("sha256") or "").lower()
            if not sha:
                # Without a declared hash the file is the only way to know the bytes.
                if file is None or not file.is_file():
                    log.warning(
                        "%s: no sha256 and no readable file; entry skipped", where
                    )
                    continue
                sha = hashlib.sha256(file.read_bytes()).hexdigest()
            quality = tuple(str(q) for q in raw.get("quality") or DEFAULT_QUALITY)
            entry = TruthEntry(
                sha256=sha,
                side=side,
                fields=_normalise_fields(side, fields),
                file=file,
                quality=quality,
                dhash_pending=file is not None,
            )
            if self._insert(entry):
                added += 1
        log.debug("truth file %s: %d entries", path, added)
        return added

    def add(
        self,
        image_bytes: bytes,
        side: Side,
        fields: Mapping[str, Any],
        quality: tuple[str, ...] = DEFAULT_QUALITY,
    ) -> TruthEntry:
        """Register an image directly (tests). The bytes must be a decodable image or a PDF."""
        if side not in ("front", "back"):
            raise ValueError("side must be 'front' or 'back'")
        h = _truth_dhash(image_bytes)
        if h is None:
            # A truth entry is a card image by definition; accepting garbage here would make
            # lookup() answer for bytes it is documented to reject.
            raise ValueError("truth bytes are not a decodable image")
        entry = TruthEntry(
            sha256=hashlib.sha256(image_bytes).hexdigest(),
            side=side,
            fields=_normalise_fields(side, fields),
            quality=tuple(quality),
            dhash=h,
        )
        self._insert(entry)
        return self._by_sha[entry.sha256]

    def _insert(self, entry: TruthEntry) -> bool:
        with self._lock:
            old = self._by_sha.get(entry.sha256)
            if old is not None:
                # First one wins: truth must not silently change under a running sandbox.
                if old.fields != entry.fields or old.side != entry.side:
                    log.warning(
                        "truth entry %s… listed twice with different fields; first kept",
                        entry.sha256[:12],
                    )
                return False
            self._by_sha[entry.sha256] = entry
            if entry.dhash_pending:
                self._pending += 1
            return True

    def warm(self) -> None:
        """Hash every truth file now instead of at the first perceptual lookup."""
        with self._lock:
            if not self._pending:
                return
            for entry in self._by_sha.values():
                if not entry.dhash_pending:
                    continue
                entry.dhash_pending = False
                assert entry.file is not None
                try:
                    data = entry.file.read_bytes()
                except OSError:
                    log.warning("truth image %s missing: sha256 match only", entry.file)
                    continue
                h = _truth_dhash(data)
                if h is None:
                    log.warning(
                        "truth image %s does not decode: sha256 match only", entry.file
                    )
                    continue
                if hashlib.sha256(data).hexdigest() != entry.sha256:
                    # Still useful perceptually, but the declared hash is what exact match uses.
                    log.warning(
                        "truth image %s: sha256 differs from the declared one",
                        entry.file,
                    )
                entry.dhash = h
            self._pending = 0

    # ---------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._by_sha)

    def __iter__(self) -> Iterator[TruthEntry]:
        with self._lock:
            return iter(list(self._by_sha.values()))

    def get(self, sha256: str) -> TruthEntry | None:
        return self._by_sha.get(sha256.lower())

    def match(self, image_bytes: bytes, *, sha256: str | None = None) -> Match:
        """Find the entry for these bytes; ``sha256`` may be passed when already known."""
        sha = sha256 or hashlib.sha256(image_bytes).hexdigest()
        entry = self._by_sha.get(sha)
        if entry is not None:
            return Match(entry, "sha256", 0)
        h = dhash(image_bytes)
        if h is None:
            return Match(None, "undecodable")
        self.warm()
        best: TruthEntry | None = None
        best_d = DHASH_MAX_DISTANCE + 1
        ambiguous = False
        with self._lock:
            candidates = [e for e in self._by_sha.values() if e.dhash is not None]
        # A linear scan with int.bit_count is microseconds per thousand entries: the truth sets
        # a sandbox serves (demo folders, test fixtures) do not need a metric tree.
        for e in candidates:
            assert e.dhash is not None
            d = (e.dhash ^ h).bit_count()
            if d < best_d:
                best, best_d, ambiguous = e, d, False
            elif (
                d == best_d
                and best is not None
                and (e.side, e.fields) != (best.side, best.fields)
            ):
                # Two different cards equally near: answering either could hand back another
                # person's data, so the sandbox refuses, as an OCR would on an unclear image.
                ambiguous = True
        if best is None:
            return Match(None, "unknown")
        if ambiguous:
            return Match(None, "ambiguous", best_d)
        return Match(best, "dhash", best_d)

    def lookup(self, image_bytes: bytes) -> TruthEntry | None:
        return self.match(image_bytes).entry
