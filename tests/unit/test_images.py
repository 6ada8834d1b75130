"""pipeline.domain.images: the checks that run before any provider call spends quota."""

from __future__ import annotations

import base64
import io
import pickle
import random
import struct
import urllib.parse
import zlib

import pytest
from PIL import Image

from pipeline.domain.images import (
    IMAGE_EXTENSIONS,
    ImageLimits,
    ImageRejected,
    PreparedImage,
    base64_size,
    encoded_payload_size,
    payload_size,
    prepare,
    sniff,
)

# --------------------------------------------------------------------------- helpers


def colour_image(w: int, h: int, seed: int = 1, block: int = 32, mode: str = "RGB") -> Image.Image:
    """Random coloured blocks: clearly colour, and compresses like a photo rather than noise."""
    rnd = random.Random(seed)
    sw, sh = max(1, -(-w // block)), max(1, -(-h // block))
    small = Image.frombytes("RGB", (sw, sh), rnd.randbytes(sw * sh * 3))
    img = small.resize((sw * block, sh * block), Image.Resampling.NEAREST).crop((0, 0, w, h))
    return img.convert(mode) if mode != "RGB" else img


def noise_image(w: int, h: int, seed: int = 2) -> Image.Image:
    return Image.frombytes("RGB", (w, h), random.Random(seed).randbytes(w * h * 3))


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def rejected(data: bytes, limits: ImageLimits | None = None) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        prepare(data, limits or ImageLimits())
    return info.value


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --------------------------------------------------------------------------- sniff


def test_sniff_recognises_the_supported_formats() -> None:
    img = colour_image(300, 300)
    assert sniff(encode(img, "JPEG")[:32]) == "jpeg"
    assert sniff(encode(img, "PNG")[:32]) == "png"
    assert sniff(encode(img, "BMP")[:32]) == "bmp"
    assert sniff(encode(img, "PDF")[:32]) == "pdf"


def test_sniff_names_unsupported_formats() -> None:
    img = colour_image(64, 64)
    assert sniff(encode(img, "GIF")[:32]) == "gif"
    assert sniff(encode(img, "WEBP")[:32]) == "webp"
    assert sniff(encode(img, "TIFF")[:32]) == "tiff"
    assert sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "heic"
    assert sniff(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1") == "avif"


def test_sniff_rejects_non_images() -> None:
    assert sniff(b"") is None
    assert sniff(b"hello, world") is None
    assert sniff(b"name,id\n") is None
    # "BM" alone is not enough once the DIB header size is visible.
    assert sniff(b"BMW service record 2021, page one of three\n") is None


def test_sniff_pdf_header_after_leading_junk() -> None:
    assert sniff(b"\xef\xbb\xbf\r\n%PDF-1.7\n") == "pdf"


def test_image_extensions() -> None:
    assert IMAGE_EXTENSIONS == frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pdf"})


# --------------------------------------------------------------------------- payload size


@pytest.mark.parametrize("n", [*range(40), 1000, 4095, 65_536, 300_001])
def test_encoded_payload_size_matches_urlencode(n: int) -> None:
    rnd = random.Random(n)
    for _ in range(3):
        data = rnd.randbytes(n)
        b64 = base64.b64encode(data).decode("ascii")
        expected = len(urllib.parse.urlencode({"k": b64})) - len("k=")
        assert encoded_payload_size(data) == expected
        assert base64_size(n) <= expected <= payload_size(n)


def test_encoded_payload_size_worst_case_reaches_the_bound() -> None:
    data = b"\xfb\xff\xbf" * 10  # base64 "+/+/+/+/...": every character is escaped
    assert encoded_payload_size(data) == payload_size(len(data))
    b64 = base64.b64encode(data).decode()
    assert encoded_payload_size(data) == len(urllib.parse.quote_plus(b64))


# --------------------------------------------------------------------------- rejections


def test_empty() -> None:
    err = rejected(b"")
    assert err.reason == "empty"


def test_not_image() -> None:
    err = rejected(b"name,id_number\nZhang San,110101\n")
    assert err.reason == "not_image"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_unsupported_format(fmt: str) -> None:
    err = rejected(encode(colour_image(400, 300), fmt))
    assert err.reason == "unsupported_format"
    assert fmt in str(err)


def test_format_not_in_allowed_set() -> None:
    limits = ImageLimits(allowed=frozenset({"jpeg", "png"}))
    assert rejected(encode(colour_image(400, 300), "BMP"), limits).reason == "unsupported_format"


def test_too_small_message() -> None:
    err = rejected(encode(colour_image(120, 76), "JPEG"))
    assert err.reason == "too_small"
    assert str(err) == "image is 120x76 px; the shorter side must be at least 256 px"


def test_too_many_pixels_is_refused_before_decoding() -> None:
    # A PNG header claiming 100000x100000 px with no pixel data behind it.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    err = rejected(data)
    assert err.reason == "too_many_pixels"
    assert "100000x100000 px" in str(err) and "megapixels" in str(err)


def test_over_max_pixels_from_the_header_alone() -> None:
    ihdr = struct.pack(">IIBBBBB", 10_000, 8_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    err = rejected(data)
    assert err.reason == "too_many_pixels"
    assert "10000x8000" in str(err)


def test_max_pixels_limit() -> None:
    limits = ImageLimits(max_pixels=1_000_000)
    assert rejected(encode(colour_image(1200, 1000), "JPEG"), limits).reason == "too_many_pixels"


def test_too_elongated_to_fit_both_sides() -> None:
    err = rejected(encode(colour_image(4200, 400), "JPEG"))
    assert err.reason == "too_large"
    assert "4200x400" in str(err)


def test_cannot_fit_payload_without_going_below_min_side() -> None:
    err = rejected(encode(noise_image(600, 400), "PNG"), ImageLimits(max_payload_bytes=5_000))
    assert err.reason == "too_large"


@pytest.mark.parametrize("cut", [2, 100, "half"])
def test_truncated_jpeg_is_corrupt(cut: int | str) -> None:
    data = encode(colour_image(600, 400), "JPEG")
    n = len(data) // 2 if cut == "half" else len(data) - int(cut)
    err = rejected(data[:n])
    assert err.reason == "corrupt"
    assert "truncated" in str(err)


@pytest.mark.parametrize("cut", [1, 12, 1000, "half"])
def test_truncated_png_is_corrupt(cut: int | str) -> None:
    data = encode(noise_image(600, 400), "PNG")
    n = len(data) // 2 if cut == "half" else len(data) - int(cut)
    assert rejected(data[:n]).reason == "corrupt"


def test_truncated_big_jpeg_is_corrupt_even_with_draft_decoding() -> None:
    data = encode(colour_image(5000, 4000), "JPEG")
    assert rejected(data[: len(data) * 2 // 3]).reason == "corrupt"


def test_png_with_bad_crc_is_corrupt() -> None:
    data = bytearray(encode(colour_image(400, 300), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR chunk: its CRC no longer matches
    assert rejected(bytes(data)).reason == "corrupt"


def test_garbage_after_jpeg_magic_is_corrupt() -> None:
    data = b"\xff\xd8\xff\xe0" + random.Random(3).randbytes(5000)
    assert rejected(data).reason == "corrupt"


def test_truncated_bmp_is_corrupt() -> None:
    data = encode(colour_image(400, 300), "BMP")
    assert rejected(data[:-500]).reason == "corrupt"


def test_corrupt_message_carries_no_file_content() -> None:
    data = b"\xff\xd8\xff\xe0SECRETSECRET" + b"\x00" * 100
    err = rejected(data)
    assert "SECRET" not in str(err) and "\\x" not in str(err)
    assert err.__cause__ is None and err.__suppress_context__


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("1", "BMP"), ("1", "PNG"), ("I;16", "PNG")],
)
def test_grayscale_modes(mode: str, fmt: str) -> None:
    err = rejected(encode(colour_image(400, 300, mode=mode), fmt))
    assert err.reason == "grayscale"


def test_gray_content_in_an_rgb_file_is_grayscale() -> None:
    gray = colour_image(600, 400, mode="L").convert("RGB")
    assert rejected(encode(gray, "JPEG", quality=85)).reason == "grayscale"


def test_gray_palette_png_is_grayscale() -> None:
    gray = (
        colour_image(600, 400, mode="L").convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    )
    assert rejected(encode(gray, "PNG")).reason == "grayscale"


def test_small_colour_card_on_white_page_is_colour() -> None:
    page = Image.new("RGB", (2000, 1400), (255, 255, 255))
    page.paste(colour_image(400, 250), (100, 100))  # ~3.6% of the page
    result = prepare(encode(page, "JPEG"))
    assert result.changes == ()


def test_grayscale_allowed_when_disabled() -> None:
    data = encode(colour_image(400, 300, mode="L"), "JPEG")
    result = prepare(data, ImageLimits(reject_grayscale=False))
    assert result.data is data and result.changes == ()


# --------------------------------------------------------------------------- accepted as is


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("PNG", "RGB"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("BMP", "RGB"),
        ("JPEG", "CMYK"),
    ],
)
def test_image_within_limits_is_returned_byte_identical(fmt: str, mode: str) -> None:
    data = encode(colour_image(1011, 638, mode=mode), fmt)
    result = prepare(data)
    assert result.data is data
    assert (result.format, result.width, result.height) == (fmt.lower(), 1011, 638)
    assert result.changes == () and not result.changed


def test_exact_limits_are_within() -> None:
    data = encode(colour_image(2048, 256), "JPEG")
    assert prepare(data).data is data


def test_exif_orientation_is_not_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(colour_image(1000, 600), "JPEG", exif=exif.tobytes())
    result = prepare(data)
    assert result.data is data and (result.width, result.height) == (1000, 600)


# --------------------------------------------------------------------------- re-encoded


def test_big_jpeg_is_downscaled_to_max_side() -> None:
    data = encode(colour_image(4000, 2500), "JPEG")
    result = prepare(data)
    assert (result.format, result.width, result.height) == ("jpeg", 2048, 1280)
    assert result.changes == ("downscaled 4000x2500->2048x1280", "reencoded jpeg q=90")
    out = decoded(result.data)
    assert out.format == "JPEG" and out.size == (2048, 1280) and out.mode == "RGB"


def test_portrait_downscale_and_draft_decoding() -> None:
    data = encode(colour_image(3000, 6000), "JPEG")  # draft can decode at 1/2: 1500x3000
    result = prepare(data)
    assert (result.width, result.height) == (1024, 2048)
    assert decoded(result.data).size == (1024, 2048)


def test_reencode_keeps_orientation_tag_without_rotating() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "CameraMaker"  # other EXIF is dropped
    data = encode(colour_image(4000, 2500), "JPEG", exif=exif.tobytes())
    result = prepare(data)
    out = decoded(result.data)
    assert out.size == (2048, 1280)
    assert out.getexif().get(0x0112) == 6
    assert 0x010F not in out.getexif()


def test_big_png_stays_png_when_it_fits() -> None:
    data = encode(colour_image(3000, 2000), "PNG")
    result = prepare(data)
    assert (result.format, result.width, result.height) == ("png", 2048, 1365)
    assert result.changes == ("downscaled 3000x2000->2048x1365", "reencoded png")
    assert decoded(result.data).format == "PNG"


def test_big_bmp_becomes_jpeg() -> None:
    result = prepare(encode(colour_image(2600, 1600), "BMP"))
    assert (result.format, result.width, result.height) == ("jpeg", 2048, 1260)


def test_noisy_png_over_payload_is_reencoded_to_fit() -> None:
    limits = ImageLimits(max_payload_bytes=200_000)
    data = encode(noise_image(2000, 1500), "PNG")
    result = prepare(data, limits)
    assert result.format == "jpeg"
    assert encoded_payload_size(result.data) <= 200_000
    assert min(result.width, result.height) >= limits.min_side
    assert decoded(result.data).size == (result.width, result.height)
    assert result.changes[-1].startswith("reencoded jpeg q=")


def test_png_within_pixels_but_over_payload_goes_to_jpeg_same_size() -> None:
    data = encode(noise_image(1200, 900), "PNG")  # ~3.2 MB of noise
    result = prepare(data, ImageLimits(max_payload_bytes=2_000_000))
    assert (result.format, result.width, result.height) == ("jpeg", 1200, 900)
    assert result.changes == ("reencoded jpeg q=90",)


def test_rgba_png_is_flattened_on_white_for_jpeg() -> None:
    img = Image.new("RGBA", (900, 600), (0, 0, 0, 0))  # fully transparent black
    img.paste(colour_image(300, 300).convert("RGBA"), (0, 0))
    noise = noise_image(900, 300).convert("RGBA")
    img.paste(noise, (0, 300))
    result = prepare(encode(img, "PNG"), ImageLimits(max_payload_bytes=600_000))
    out = decoded(result.data)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((800, 100))
    assert min(r, g, b) > 240  # transparent area became white, not black


def test_quality_ladder_then_downscale() -> None:
    data = encode(noise_image(1600, 1200), "JPEG", quality=95)
    result = prepare(data, ImageLimits(max_payload_bytes=400_000))
    assert encoded_payload_size(result.data) <= 400_000
    assert result.changes[-1] == "reencoded jpeg q=50"
    assert result.changes[0].startswith("downscaled 1600x1200->")


# --------------------------------------------------------------------------- PDF


def two_page_pdf() -> bytes:
    first = colour_image(800, 500, seed=5)  # landscape
    second = colour_image(500, 800, seed=6)  # portrait
    return encode(first, "PDF", save_all=True, append_images=[second], resolution=72)


def test_pdf_first_page_is_rendered() -> None:
    result = prepare(two_page_pdf())
    assert result.format == "jpeg"
    assert result.changes == ("pdf_first_page", "reencoded jpeg q=90")
    assert (result.width, result.height) == (2000, 1250)  # the landscape first page
    assert decoded(result.data).size == (2000, 1250)


def test_pdf_render_respects_a_smaller_max_side() -> None:
    result = prepare(two_page_pdf(), ImageLimits(max_side=1024))
    assert (result.width, result.height) == (1024, 640)


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.4\nthis is not a pdf at all\n", b"%PDF-", "truncated"],
)
def test_broken_pdf(data: bytes | str) -> None:
    if data == "truncated":
        whole = two_page_pdf()
        data = whole[: len(whole) // 3]
    err = rejected(data)  # type: ignore[arg-type]
    assert err.reason == "pdf_error"


def test_grayscale_pdf_page() -> None:
    data = encode(colour_image(800, 500, mode="L"), "PDF")
    assert rejected(data).reason == "grayscale"


# --------------------------------------------------------------------------- types


def test_rejection_pickles_with_its_reason() -> None:
    err = ImageRejected("too_small", "image is 1x1 px")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, str(back)) == ("too_small", "image is 1x1 px")


def test_prepared_image_repr_has_no_bytes() -> None:
    p = PreparedImage(data=b"\xff\xd8SECRET", format="jpeg", width=1, height=1)
    assert "SECRET" not in repr(p) and "8 bytes" in repr(p)


def test_icc_profile_kept_only_within_its_colour_space() -> None:
    fake_icc = b"not really an ICC profile, only carried through" * 4
    rgb = encode(colour_image(3000, 2000), "JPEG", icc_profile=fake_icc)
    assert decoded(prepare(rgb).data).info.get("icc_profile") == fake_icc
    cmyk = encode(colour_image(3000, 2000, mode="CMYK"), "JPEG", icc_profile=fake_icc)
    out = decoded(prepare(cmyk).data)
    assert out.mode == "RGB" and "icc_profile" not in out.info
