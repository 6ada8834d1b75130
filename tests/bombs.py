"""Hostile image files for the tests and ``bench/bench_bombs.py``: small files that claim, or
decode to, far more pixels than an ID-card scan. Built without holding their pixels (except the
JPEGs, which only Pillow can encode: build those in a process of their own)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_one_colour(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A valid 8-bit RGB PNG of one colour; 7000x7000 compresses to about 150 KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    parts = [comp.compress(row) for _ in range(height)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def png_palette_one_colour(width: int, height: int) -> bytes:
    """A valid palette PNG (one byte a pixel in the file, four once converted for re-encoding)."""
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    plte = bytes((200, 30, 30))
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"PLTE", plte)
        + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int, colour_type: int = 2) -> bytes:
    """A PNG that declares its size (and colour type: 2 RGB, 0 gray) and has no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def bmp_header_only(width: int, height: int) -> bytes:
    """A 24-bit BMP header with no pixel rows behind it."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


def jpeg_one_colour(width: int, height: int, *, progressive: bool = False) -> bytes:
    """A one-colour JPEG (Pillow holds ``width * height * 4`` bytes while encoding it)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(
        buf, "JPEG", quality=50, progressive=progressive
    )
    return buf.getvalue()


def pdf_with_image(
    img_w: int, img_h: int, page_w: float = 595, page_h: float = 842,
    rgb: tuple[int, int, int] = (200, 30, 30),
) -> bytes:
    """A one-page PDF (A4 by default) drawing one Flate-compressed one-colour RGB image."""
    comp = zlib.compressobj(9)
    row = bytes(rgb) * img_w
    data = b"".join(comp.compress(row) for _ in range(img_h)) + comp.flush()
    content = f"q {page_w} 0 0 {page_h} 0 0 cm /Im1 Do Q".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {page_w} {page_h}] "
        f"/Resources << /XObject << /Im1 4 0 R >> >> /Contents 5 0 R >>".encode(),
        f"<< /Type /XObject /Subtype /Image /Width {img_w} /Height {img_h} "
        f"/ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter /FlateDecode "
        f"/Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream",
        f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


#: name -> (builder, the reason prepare must give, or None when it must be accepted)
BOMBS = {
    "png_7000x7000.png": (lambda: png_one_colour(7000, 7000), "too_many_pixels"),
    "png_palette_7000x7000.png": (lambda: png_palette_one_colour(7000, 7000), "too_many_pixels"),
    "png_strip_1x100000.png": (lambda: png_one_colour(1, 100_000), "too_small"),
    "png_header_60000x60000.png": (lambda: png_header_only(60_000, 60_000), "too_many_pixels"),
    "bmp_header_20000x20000.bmp": (lambda: bmp_header_only(20_000, 20_000), "too_many_pixels"),
    # decoded at 1/4 scale (2500x2500) and sent at 2048x2048
    "jpeg_10000x10000.jpg": (lambda: jpeg_one_colour(10_000, 10_000), None),
    # a progressive JPEG keeps every coefficient of the full size: 300 MB at 10000x10000
    "jpeg_progressive_10000x10000.jpg": (
        lambda: jpeg_one_colour(10_000, 10_000, progressive=True), "too_many_pixels",
    ),
    "pdf_image_12000x12000.pdf": (lambda: pdf_with_image(12_000, 12_000), "too_many_pixels"),
    # a 14400x3 pt page would render as a 2000x1 px strip: refused before rendering
    "pdf_strip_page.pdf": (lambda: pdf_with_image(10, 10, page_w=14_400, page_h=3), "too_small"),
}


def write_bombs(folder: Path) -> dict[str, str | None]:
    """Write every bomb into ``folder``; returns name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (build, _reason) in BOMBS.items():
        path = folder / name
        if not path.exists():
            path.write_bytes(build())
    return {name: reason for name, (_build, reason) in BOMBS.items()}


if __name__ == "__main__":  # python -m tests.bombs FOLDER
    import sys

    write_bombs(Path(sys.argv[1]))
