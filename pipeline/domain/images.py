"""Image checks and normalisation, run before any provider call spends quota.

The limits are ihuyi's (seed 000 §1.6): JPG/JPEG/PNG/BMP/PDF; 256–2048 px per side; at most
8 MB *after base64 and urlencoding*; no black-and-white images; a multi-page PDF is read on its
first page only. showapi (seed 003) only *recommends* < 1.5 MB, so a stricter
:class:`ImageLimits` can be built for it.

Policy: an image that already meets every limit is sent byte-for-byte as it came (we never
alter an image we do not have to). Otherwise it is rendered (PDF), downscaled and/or re-encoded
until it fits, or rejected with :class:`ImageRejected` and a stable ``reason`` code. EXIF
orientation is deliberately *not* applied: guessing a rotation could make things worse, and the
providers see the same pixels and the same orientation tag as the original.

Hostile files: nothing is decoded before its cost is known. The header gives the size and the
pixel mode; :func:`decode_cost` turns them into the memory the decoded image and its working
copies will take (Pillow keeps a colour pixel in 4 bytes; a progressive JPEG also holds every
DCT coefficient of the full-size image while it decodes). A JPEG is decoded reduced (libjpeg's
1/2, 1/4, 1/8 scaling via ``draft``) when it will be downscaled anyway; PNG and BMP cannot be,
so their whole raster counts. Above ``max_decode_bytes`` the image is refused as
``too_many_pixels`` before a byte of it is decoded; below it, the decode waits until the
process-wide :data:`DECODE_BUDGET` has room, so concurrent workers cannot add up many large
images at once. PDF pages are sized before rendering and the images they embed are counted
the same way.

Nothing here ever puts image bytes (or decoder messages that might quote them) into an
exception or a log line.
"""

from __future__ import annotations

import base64
import io
import math
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from PIL import Image, ImageChops, ImageFile

# A truncated upload must be rejected, not silently padded with grey: Pillow's default is
# False, and we pin it so that no other import can flip it for the whole process.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Pillow allocates a large image as a chain of blocks, 16 MiB by default (PILLOW_BLOCK_SIZE).
# glibc serves a 16 MiB request from the calling thread's malloc arena and keeps it there once
# freed, so every worker thread that ever decoded a large scan keeps that much: sixteen 49 MP
# decodes on eight threads held 1.6 GB, serialised or not. Requests above glibc's largest mmap
# threshold (32 MiB) are mapped and unmapped on free, and the memory goes back to the system
# (same run: 0.4 GB). An operator's PILLOW_BLOCK_SIZE wins.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 * 1024 * 1024)

IMAGE_EXTENSIONS: Final = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pdf"})

#: how many leading bytes :func:`sniff` wants (the PDF header may sit anywhere in the first
#: 1024 bytes, as PDF readers accept; every other signature is within the first 16).
SNIFF_BYTES: Final = 1024

#: PDF pages are rendered so the longer side is about this long (capped at ``max_side``).
PDF_RENDER_LONG_SIDE: Final = 2000

# Re-encoding ladder once the first attempt at ``jpeg_quality`` is too big.
_QUALITY_LADDER: Final = (80, 70, 60, 50)
_DOWNSCALE_STEP: Final = 0.8

# Grayscale detection runs on a tiny thumbnail: box-averaging removes sensor/JPEG chroma noise
# while a coloured region (an ID card photographed on a white page) keeps its colour.
_GRAY_THUMB: Final = (64, 64)
_GRAY_MEAN_CHROMA: Final = 2.0  # mean max-min channel spread, in 8-bit levels
_GRAY_COLOURFUL_LEVEL: Final = 16  # a pixel with a spread above this is clearly coloured
_GRAY_COLOURFUL_FRACTION: Final = 0.01  # ...and this many such pixels make the image colour

_GRAY_MODES: Final = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})

_PIL_FORMAT: Final = {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}

# pdfium is not thread-safe (pypdfium2 documents it): serialise it within the process.
_PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class ImageLimits:
    min_side: int = 256
    max_side: int = 2048
    #: the size *after base64 and urlencoding* (seed 000 §1.6), not the file size
    max_payload_bytes: int = 8 * 1024 * 1024
    allowed: frozenset[str] = frozenset({"jpeg", "png", "bmp", "pdf"})
    reject_grayscale: bool = True
    jpeg_quality: int = 90
    #: the most pixels a file may declare, whatever its format (a 200-megapixel phone photo,
    #: 16320x12240, is decoded at 1/4 scale); refused from the header, before decoding
    max_pixels: int = 200_000_000
    #: the most memory the decoded image and its working copies may take (see
    #: :func:`decode_cost`), estimated from the header before decoding. The provider never sees
    #: more than ``max_side`` (2048) px a side, so an image is only worth decoding whole up to a
    #: few times that: an A4 page with the card on it scanned at 600 dpi (4961x7016, 35 MP:
    #: 165 MiB with the output) is the largest real scan admitted, about 42 MP of RGB in all; a
    #: 7000x7000 PNG (219 MiB) is not. JPEGs count at the size libjpeg decodes them at.
    max_decode_bytes: int = 192 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """What to send. ``changes`` is empty when ``data`` is the input, byte for byte."""

    data: bytes = field(repr=False)  # never printed: repr goes to logs
    format: str
    width: int
    height: int
    changes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def __repr__(self) -> str:
        return (
            f"PreparedImage({len(self.data)} bytes, format={self.format!r}, "
            f"{self.width}x{self.height}, changes={self.changes!r})"
        )


class ImageRejected(Exception):
    """The image cannot be sent. ``reason`` is a short stable code, the message is for people.

    Codes: empty, not_image, unsupported_format, corrupt, too_small, grayscale, too_large (the
    bytes do not fit, or too elongated to scale), too_many_pixels (more pixels, or more
    decoded memory, than the limits admit), pdf_error.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
        # Celery pickles exceptions across processes; the default would lose ``reason``.
        return (type(self), (self.reason, self.message))

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- format sniffing


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (ideally :data:`SNIFF_BYTES`), or None.

    Returns "jpeg", "png", "bmp", "pdf", or one of "gif", "webp", "tiff", "heic", "avif" so that
    those can be refused by name rather than as "not an image".
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM") and _looks_like_bmp(head):
        return "bmp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "heic"
    # PDF readers (pdfium included) accept the header anywhere in the first 1024 bytes.
    if b"%PDF-" in head[:1024]:
        return "pdf"
    return None


def _looks_like_bmp(head: bytes) -> bool:
    # "BM" alone is too weak (any text file may start with it): also require a known DIB
    # header size at offset 14 when the caller gave us enough bytes to see it.
    if len(head) < 18:
        return len(head) >= 2
    dib = int.from_bytes(head[14:18], "little")
    return dib in (12, 16, 40, 52, 56, 64, 108, 124)


# --------------------------------------------------------------------------- payload size


def base64_size(n_bytes: int) -> int:
    """Length of base64(data) for ``n_bytes`` of data: a lower bound on the payload size."""
    return 4 * math.ceil(n_bytes / 3) if n_bytes > 0 else 0


def payload_size(n_bytes: int) -> int:
    """Upper bound on ``len(urlencode(base64(data)))`` for any ``n_bytes`` of data.

    The exact figure depends on the content ('+', '/' and '=' each become three characters);
    this bound assumes every character does, so ``payload_size(n) <= limit`` proves a fit
    without encoding. Use :func:`encoded_payload_size` for the exact number.
    """
    return 3 * base64_size(n_bytes)


def encoded_payload_size(data: bytes) -> int:
    """Exact ``len(urllib.parse.urlencode({"k": base64(data)})) - len("k=")``.

    httpx form-encodes with :func:`urllib.parse.urlencode` (``quote_plus``, ``safe=""``): of
    the base64 alphabet only '+', '/' and '=' are escaped, each to three characters.
    """
    b64 = base64.b64encode(data)
    return len(b64) + 2 * (b64.count(b"+") + b64.count(b"/") + b64.count(b"="))


def _fits(data: bytes, max_payload: int) -> bool:
    n = len(data)
    if payload_size(n) <= max_payload:
        return True  # even the worst case fits: skip the encoding
    if base64_size(n) > max_payload:
        return False  # even the best case is too big
    return encoded_payload_size(data) <= max_payload


# --------------------------------------------------------------------------- decode budget


class DecodeBudget:
    """Bytes of decoded images the whole process may hold at once.

    A worker runs several calls in threads; each image below ``max_decode_bytes`` is fine on its
    own, but eight of them at once are not. :meth:`hold` waits until the estimate fits in what
    the other threads hold. An estimate larger than the whole budget holds all of it (so such
    an image runs alone rather than never).
    """

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    def set_total(self, total_bytes: int) -> None:
        with self._cond:
            self.total = total_bytes
            self._cond.notify_all()

    @contextmanager
    def hold(self, n_bytes: int) -> Iterator[None]:
        with self._cond:
            n = min(n_bytes, self.total)
            while self._used and self._used + n > self.total:
                self._cond.wait()
            self._used += n
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()


#: shared by every :func:`prepare` in the process: two images at the per-image limit, or dozens
#: of ordinary photos (a 12 MP JPEG decodes at half size, about 12 MiB).
DECODE_BUDGET: Final = DecodeBudget(2 * ImageLimits().max_decode_bytes)

# Bytes a pixel takes in Pillow's storage: one for 1/L/P, two for 16-bit gray, four otherwise
# (RGB is stored as RGBX).
_ONE_BYTE_MODES: Final = frozenset({"1", "L", "P"})
# Modes that are re-encoded as they are; any other one is converted (a full-size RGB(A) copy)
# and, with transparency, flattened onto a white page (another).
_KEPT_MODES: Final = frozenset({"RGB", "L"})
# Everything _reencode allocates at the output size (resized copy, encoder buffers): a
# 2048x2048 RGBX image, twice.
_OUTPUT_COST: Final = 2 * 2048 * 2048 * 4


def _bytes_per_pixel(mode: str) -> int:
    if mode in _ONE_BYTE_MODES:
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_cost(
    mode: str,
    size: tuple[int, int],
    jpeg_full_size: tuple[int, int] | None = None,
    jpeg_layers: list[tuple[str, int, int, int]] | None = None,
) -> int:
    """Bytes :func:`prepare` will hold for an image of ``mode`` decoded at ``size``.

    The decoded raster, the converted copies for a mode that is not re-encoded as it is, and
    the output; for a progressive JPEG (``jpeg_full_size`` and its component sampling
    ``jpeg_layers``) also libjpeg's coefficient buffer, which holds every DCT block of the
    full-size image (two bytes a coefficient) whatever the scale it outputs.
    """
    w, h = size
    per_pixel = _bytes_per_pixel(mode) + (0 if mode in _KEPT_MODES else 8)
    cost = w * h * per_pixel + _OUTPUT_COST
    if jpeg_full_size is not None:
        fw, fh = jpeg_full_size
        layers = jpeg_layers or [("", 1, 1, 0)] * 3
        h_max = max(layer[1] for layer in layers) or 1
        v_max = max(layer[2] for layer in layers) or 1
        for _, hs, vs, _ in layers:
            blocks_w = -(-fw * hs // (8 * h_max))
            blocks_h = -(-fh * vs // (8 * v_max))
            cost += blocks_w * blocks_h * 64 * 2
    return cost


def _too_costly(what: str, width: int, height: int, cost: int, limits: ImageLimits) -> None:
    if cost > limits.max_decode_bytes:
        raise ImageRejected(
            "too_many_pixels",
            f"{what} is {width}x{height} px; decoding it would take about "
            f"{cost / 2**20:.0f} MiB, more than the {limits.max_decode_bytes / 2**20:.0f} MiB "
            f"allowed",
        )


# --------------------------------------------------------------------------- prepare


def prepare(data: bytes, limits: ImageLimits = ImageLimits()) -> PreparedImage:
    """Check ``data`` against ``limits``; return what to send or raise :class:`ImageRejected`."""
    if not data:
        raise ImageRejected("empty", "the file is empty")
    fmt = sniff(data[:SNIFF_BYTES])
    if fmt is None:
        raise ImageRejected(
            "not_image", "the file is not an image (no JPEG, PNG, BMP or PDF signature)"
        )
    if fmt not in limits.allowed:
        allowed = ", ".join(sorted(f.upper() for f in limits.allowed))
        raise ImageRejected(
            "unsupported_format", f"{fmt.upper()} images are not supported (allowed: {allowed})"
        )

    changes: list[str] = []
    if fmt == "pdf":
        img = _render_pdf_first_page(data, limits)
        changes.append("pdf_first_page")
        src_w, src_h = img.size
        cost = decode_cost(img.mode, img.size)
    else:
        # src_w/src_h are the file's own dimensions; ``img`` may be smaller (JPEG draft).
        img, (src_w, src_h), cost = _open(data, fmt, limits)
    with DECODE_BUDGET.hold(cost):
        try:
            if fmt != "pdf":
                _load(img, data, fmt)
            _check_colour(img, limits)

            if (
                fmt != "pdf"
                and max(src_w, src_h) <= limits.max_side
                and _fits(data, limits.max_payload_bytes)
            ):
                return PreparedImage(data=data, format=fmt, width=src_w, height=src_h)

            return _reencode(img, fmt, (src_w, src_h), limits, changes)
        finally:
            # Free the pixels before the budget is given back, not when this frame goes.
            img.close()


def _check_pixels(width: int, height: int, limits: ImageLimits, what: str = "image") -> None:
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{what} is {width}x{height} px ({width * height / 1e6:.1f} megapixels); at most "
            f"{limits.max_pixels / 1e6:.0f} megapixels are accepted",
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            "too_small",
            f"{what} is {width}x{height} px; the shorter side must be at least "
            f"{limits.min_side} px",
        )
    if min(_fit_size(width, height, limits.max_side)) < limits.min_side:
        # Too elongated: shrinking the longer side to max_side leaves the shorter one too short.
        raise ImageRejected(
            "too_large",
            f"{what} is {width}x{height} px; it cannot be scaled to {limits.max_side} px on the "
            f"longer side and keep at least {limits.min_side} px on the shorter side",
        )


def _fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The largest size within ``max_side`` keeping the aspect ratio (never upscales)."""
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    scale = max_side / long_side
    # The long side is set exactly; the short side rounds, at least 1 px.
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


# What Pillow's parsers raise for a malformed header (Image.open turns the first four into
# UnidentifiedImageError, an OSError).
_DECODE_ERRORS: Final = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
)


def _corrupt(fmt: str, exc: BaseException) -> ImageRejected:
    # Pillow's own messages can quote header bytes: keep only what is known to be safe.
    what = "truncated" if "truncated" in str(exc).lower() else f"corrupt ({type(exc).__name__})"
    return ImageRejected("corrupt", f"cannot decode the {fmt.upper()} image: {what}")


def _open(data: bytes, fmt: str, limits: ImageLimits) -> tuple[Image.Image, tuple[int, int], int]:
    """Parse the header and plan the decode: the image (not loaded), its size in the file, and
    what decoding it will cost. Refuses, from the header alone, what is too big to decode."""
    Image.preinit()  # registers the JPEG, PNG and BMP plugins
    # Only the sniffed format's plugin may parse it: no guessing among Pillow's many. Its
    # factory is called directly, as Image.open would, but without Image.open's own bomb check
    # (MAX_IMAGE_PIXELS, a process-wide setting that warns from 89 MP and refuses from 179 MP):
    # the limits below replace it, stricter on memory and the same for every format.
    factory, _accept = Image.OPEN[_PIL_FORMAT[fmt]]
    try:
        img = factory(io.BytesIO(data), None)  # type: ignore[arg-type]  # no file name: bytes
    except _DECODE_ERRORS as exc:
        raise _corrupt(fmt, exc) from None
    src_size = img.size
    _check_pixels(*src_size, limits)
    if limits.reject_grayscale and img.mode in _GRAY_MODES:
        _check_colour(img, limits)  # refused from the header: no need to decode it
    jpeg_full: tuple[int, int] | None = None
    if fmt == "jpeg":
        if max(src_size) > limits.max_side:
            # It will be downscaled anyway: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never
            # below the target size (all the entropy data is still read, so truncation shows).
            img.draft(img.mode, _fit_size(*src_size, limits.max_side))
        elif _fits(data, limits.max_payload_bytes):
            # It will be sent as it is: its pixels are decoded only to be checked (complete,
            # in colour), which 1/8 scale does as well, at a fraction of the cost.
            img.draft(img.mode, _GRAY_THUMB)
        if img.info.get("progressive") or img.info.get("progression"):
            jpeg_full = src_size
    cost = decode_cost(img.mode, img.size, jpeg_full, getattr(img, "layer", None))
    _too_costly(f"the {fmt.upper()} image", *src_size, cost, limits)
    return img, src_size, cost


def _load(img: Image.Image, data: bytes, fmt: str) -> None:
    """Fully decode (so truncation and corruption show now, not at the provider)."""
    try:
        img.load()
    except Image.DecompressionBombError:
        raise ImageRejected(
            "too_many_pixels", f"the {fmt.upper()} image has too many pixels to decode safely"
        ) from None
    except _DECODE_ERRORS as exc:
        raise _corrupt(fmt, exc) from None
    # IEND has no body, so its CRC is a constant: the whole 8-byte tail must be present.
    if fmt == "png" and data.rfind(b"IEND\xaeB`\x82") < 0:
        # Pillow stops reading after the last IDAT: a file cut just before its IEND chunk
        # decodes "fine" but is still a truncated upload.
        raise ImageRejected("corrupt", "cannot decode the PNG image: truncated (no IEND chunk)")


def _render_pdf_first_page(data: bytes, limits: ImageLimits) -> Image.Image:
    import pypdfium2 as pdfium  # only PDFs pay for loading pdfium
    import pypdfium2.raw as pdfium_c

    target = min(PDF_RENDER_LONG_SIDE, limits.max_side)
    with _PDFIUM_LOCK:
        pdf = None
        try:
            pdf = pdfium.PdfDocument(data)
            if len(pdf) < 1:
                raise ImageRejected("pdf_error", "the PDF has no pages")
            page = pdf[0]
            w_pt, h_pt = page.get_size()
            if not (w_pt > 0 and h_pt > 0):
                raise ImageRejected("pdf_error", "the first PDF page has no size")
            scale = target / max(w_pt, h_pt)
            # The bitmap's size is known before rendering: a strip of a page is refused now.
            planned = (max(1, round(w_pt * scale)), max(1, round(h_pt * scale)))
            _check_pixels(*planned, limits, what="the rendered first PDF page")
            # pdfium decodes the images a page draws from their own pixels, whatever the
            # scale: a small page can carry a 60000x60000 image. Each counts as if decoded
            # whole, at four bytes a pixel (pdfium streams some, but not every, filter).
            what = "an image on the first PDF page"
            for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE]):
                iw, ih = obj.get_px_size()
                if iw * ih > limits.max_pixels:
                    _check_pixels(iw, ih, limits, what=what)
                _too_costly(what, iw, ih, iw * ih * 4, limits)
            # rev_byteorder: pdfium's native BGR becomes RGB, so to_pil needs no conversion.
            bitmap = page.render(scale=scale, rev_byteorder=True)
            # copy(): the PIL image may share the bitmap's buffer, which closing frees.
            img = bitmap.to_pil().copy()
            bitmap.close()
            page.close()
        except ImageRejected:
            raise
        except (pdfium.PdfiumError, OSError, ValueError) as exc:
            raise ImageRejected("pdf_error", f"cannot open the PDF: {exc}") from None
        finally:
            if pdf is not None:
                pdf.close()
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    _check_pixels(width, height, limits, what="the rendered first PDF page")
    return img


def _check_colour(img: Image.Image, limits: ImageLimits) -> None:
    if not limits.reject_grayscale:
        return
    if img.mode in _GRAY_MODES or _looks_gray(img):
        raise ImageRejected(
            "grayscale",
            "the image is black-and-white or grayscale; the provider only reads colour images",
        )


def _looks_gray(img: Image.Image) -> bool:
    # Palette images cannot be box-averaged; nearest sampling is enough to see colour.
    if img.mode in ("P", "PA"):
        small = img.resize(_GRAY_THUMB, Image.Resampling.NEAREST)
    else:
        # reducing_gap: an integer box reduce first (3x faster on 12 MP, same averages).
        small = img.resize(_GRAY_THUMB, Image.Resampling.BOX, reducing_gap=1.0)
    if small.mode != "RGB":
        small = small.convert("RGB")
    r, g, b = small.split()
    spread = ImageChops.subtract(
        ImageChops.lighter(ImageChops.lighter(r, g), b),
        ImageChops.darker(ImageChops.darker(r, g), b),
    )
    hist = spread.histogram()
    n = small.width * small.height
    mean = sum(level * count for level, count in enumerate(hist)) / n
    colourful = sum(hist[_GRAY_COLOURFUL_LEVEL + 1 :]) / n
    # Both must hold: a small colour card on a big white page has a low mean spread but
    # many clearly coloured pixels, and must not be refused.
    return mean < _GRAY_MEAN_CHROMA and colourful < _GRAY_COLOURFUL_FRACTION


def _for_jpeg(img: Image.Image) -> Image.Image:
    """A mode JPEG can hold: transparency is flattened onto white (a document's background)."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in _GRAY_MODES:  # only reachable with reject_grayscale=False
        return img.convert("L")
    return img.convert("RGB")


def _for_png_resize(img: Image.Image) -> Image.Image:
    """A mode LANCZOS can interpolate (palette indices cannot be)."""
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    return img


def _colour_family(mode: str) -> str:
    if mode in _GRAY_MODES:
        return "gray"
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA"):
        return "rgb"
    return mode  # CMYK, YCbCr, LAB...: only ever equal to themselves


def _save_kwargs(img: Image.Image, out_mode: str) -> dict[str, object]:
    """What survives a re-encode: the colour profile and the orientation tag, nothing else.

    The ICC profile is kept only when the pixels stay in its colour space (a CMYK profile on
    naively converted RGB pixels would mislead every reader). Orientation is kept (not applied)
    so the provider sees the image as the original would have shown it; other EXIF (GPS,
    camera serials) is personal data we have no need to send.
    """
    kwargs: dict[str, object] = {}
    icc = img.info.get("icc_profile")
    if icc and _colour_family(img.mode) == _colour_family(out_mode):
        kwargs["icc_profile"] = icc
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises many types; a broken
        # EXIF block must not sink an image whose pixels decoded fine.
        orientation = None
    if orientation and orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    return kwargs


def _encode(img: Image.Image, fmt: str, quality: int, extra: dict[str, object]) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality, **extra)
    else:
        # compress_level 6 is Pillow's default trade-off; optimize=True costs seconds on 2048².
        img.save(buf, "PNG", **extra)
    return buf.getvalue()


def _reencode(
    img: Image.Image,
    src_fmt: str,
    src_size: tuple[int, int],
    limits: ImageLimits,
    changes: list[str],
) -> PreparedImage:
    src_w, src_h = src_size
    fit_w, fit_h = _fit_size(src_w, src_h, limits.max_side)  # _check_pixels: >= min_side

    size = (fit_w, fit_h)
    downscaled = size != (src_w, src_h)

    def finish(out: bytes, fmt: str, size: tuple[int, int], note: str) -> PreparedImage:
        if size != (src_w, src_h):
            changes.append(f"downscaled {src_w}x{src_h}->{size[0]}x{size[1]}")
        changes.append(note)
        return PreparedImage(
            data=out, format=fmt, width=size[0], height=size[1], changes=tuple(changes)
        )

    # A PNG stays PNG (lossless) when downscaling alone makes it fit. One that already fits in
    # pixels but not in bytes would not shrink as PNG: it goes straight to JPEG.
    if src_fmt == "png" and downscaled:
        png_base = _for_png_resize(img)
        extra = _save_kwargs(img, png_base.mode)
        out = _encode(png_base.resize(size, Image.Resampling.LANCZOS), "png", 0, extra)
        if _fits(out, limits.max_payload_bytes):
            return finish(out, "png", size, "reencoded png")

    base = _for_jpeg(img)
    extra = _save_kwargs(img, base.mode)

    def resized(size: tuple[int, int]) -> Image.Image:
        # Always from the decoded image, never from an earlier resize: no compounded blur.
        if base.size == size:
            return base
        return base.resize(size, Image.Resampling.LANCZOS)

    current = resized(size)
    qualities = (limits.jpeg_quality,) + tuple(
        q for q in _QUALITY_LADDER if q < limits.jpeg_quality
    )
    for quality in qualities:
        out = _encode(current, "jpeg", quality, extra)
        if _fits(out, limits.max_payload_bytes):
            return finish(out, "jpeg", size, f"reencoded jpeg q={quality}")

    # Quality alone was not enough: shrink in 0.8 steps at the lowest quality tried.
    quality = qualities[-1]
    w, h = float(fit_w), float(fit_h)
    while True:
        w, h = w * _DOWNSCALE_STEP, h * _DOWNSCALE_STEP
        size = (max(1, round(w)), max(1, round(h)))
        if min(size) < limits.min_side:
            raise ImageRejected(
                "too_large",
                f"image is {src_w}x{src_h} px; it does not fit in {limits.max_payload_bytes} "
                f"bytes (after base64 and urlencoding) without the shorter side dropping below "
                f"{limits.min_side} px",
            )
        out = _encode(resized(size), "jpeg", quality, extra)
        if _fits(out, limits.max_payload_bytes):
            return finish(out, "jpeg", size, f"reencoded jpeg q={quality}")
