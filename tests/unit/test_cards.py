"""The synthetic cards and the committed examples they produced."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from pipeline.domain.images import prepare
from idocr_sandbox.cards import (
    BACK_FIELDS,
    FRONT_FIELDS,
    check_digit,
    encode,
    find_cjk_font,
    random_identity,
    random_person,
    render_card,
)

ROOT = Path(__file__).resolve().parents[2]
TRUTH = ROOT / "examples" / "truth.json"

SMALL = (505, 319)  # half size: same layout, quicker tests


def _channel_spread(img: Image.Image) -> float:
    r, g, b = img.split()
    pairs = ((r, g), (g, b), (r, b))
    return max(ImageStat.Stat(ImageChops.difference(x, y)).mean[0] for x, y in pairs)


def _ahash(img: Image.Image, n: int = 8) -> int:
    small = img.convert("L").resize((n, n), Image.Resampling.LANCZOS)
    px = [small.getpixel((x, y)) for y in range(n) for x in range(n)]
    mean = sum(px) / len(px)
    return sum(1 << i for i, v in enumerate(px) if v > mean)


def _dhash(img: Image.Image, n: int = 8) -> int:
    small = img.convert("L").resize((n + 1, n), Image.Resampling.LANCZOS)
    bits = [small.getpixel((x, y)) > small.getpixel((x + 1, y)) for y in range(n) for x in range(n)]
    return sum(1 << i for i, b in enumerate(bits) if b)


@pytest.fixture(params=["cjk", "default"])
def font(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Both with the system CJK font (when there is one) and with Pillow's bundled fallback."""
    if request.param == "default":
        monkeypatch.setenv("IDOCR_CJK_FONT", "")
        assert find_cjk_font() is None
        return None
    path = find_cjk_font()
    if path is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    return path


@pytest.mark.parametrize("side", ["front", "back"])
@pytest.mark.parametrize("size", [(1011, 638), (800, 505), (410, 260)])
def test_render_card_is_colour_rgb_of_requested_size(side: str, size: tuple[int, int],
                                                     font: str | None) -> None:
    fields = random_identity(random.Random(1), side)
    img = render_card(side, fields, size=size, font_path=font)
    assert img.mode == "RGB"
    assert img.size == size
    # Well clear of what a grayscale precheck would flag, not merely non-identical channels.
    assert _channel_spread(img) > 10


@pytest.mark.parametrize("side", ["front", "back"])
def test_different_identities_give_visibly_different_images(side: str, font: str | None) -> None:
    rng = random.Random(5)
    cards = [render_card(side, random_identity(rng, side), size=SMALL, font_path=font)
             for _ in range(6)]
    for i, a in enumerate(cards):
        for b in cards[i + 1:]:
            assert a.tobytes() != b.tobytes()
            # Perceptual hashes too: dedupe by look must not merge two different people.
            assert (_ahash(a) ^ _ahash(b)).bit_count() >= 8
            assert (_dhash(a) ^ _dhash(b)).bit_count() >= 8


def test_one_field_changed_changes_the_image(font: str | None) -> None:
    fields = random_identity(random.Random(2), "front")
    number = fields["id_number"]
    other = dict(fields, id_number=number[:-1] + ("0" if number[-1] != "0" else "1"))
    a = render_card("front", fields, size=SMALL, font_path=font)
    b = render_card("front", other, size=SMALL, font_path=font)
    assert (_ahash(a) ^ _ahash(b)).bit_count() >= 8


def test_render_is_deterministic_and_seed_varies_background() -> None:
    fields = random_identity(random.Random(3), "back")
    a = render_card("back", fields, size=SMALL)
    assert a.tobytes() == render_card("back", fields, size=SMALL).tobytes()
    assert a.tobytes() != render_card("back", fields, size=SMALL, seed=1).tobytes()


def test_render_rejects_unknown_side() -> None:
    with pytest.raises(ValueError):
        render_card("left", {})


def test_check_digit_known_values() -> None:
    # The worked example from GB 11643-1999 (X-terminated), and one worked by hand.
    assert check_digit("11010519491231002") == "X"
    assert check_digit("44052419800101001") == "3"
    with pytest.raises(ValueError):
        check_digit("1234")


@pytest.mark.parametrize("seed", range(40))
def test_random_person_is_internally_consistent(seed: int) -> None:
    p = random_person(random.Random(seed))
    number = p["id_number"]
    assert len(number) == 18 and number[:17].isdigit()
    assert check_digit(number[:17]) == number[17]
    assert p["gender"] == ("男" if int(number[16]) % 2 else "女")
    born = dt.date.fromisoformat(p["date_of_birth"])
    assert number[6:14] == f"{born:%Y%m%d}"

    issued = dt.date.fromisoformat(p["valid_from"])
    assert issued > born
    age = issued.year - born.year - ((issued.month, issued.day) < (born.month, born.day))
    if age >= 46:
        assert p["valid_to"] == "长期"
    else:
        until = dt.date.fromisoformat(p["valid_to"])
        years = 5 if age < 16 else 10 if age <= 25 else 20
        assert until.year - issued.year == years
        assert (until.month, until.day) in ((issued.month, issued.day), (2, 28))


def test_random_numbers_pass_python_stdnum() -> None:
    # The pipeline's validators may use stdnum, which also checks that the region code existed
    # in the birth year: generated cards must pass it, or every example would be flagged.
    ric = pytest.importorskip("stdnum.cn.ric")
    rng = random.Random(11)
    for _ in range(500):
        number = random_person(rng)["id_number"]
        assert ric.is_valid(number), number


def test_random_identity_returns_the_side_fields() -> None:
    rng = random.Random(9)
    assert tuple(random_identity(rng, "front")) == FRONT_FIELDS
    assert tuple(random_identity(rng, "back")) == BACK_FIELDS
    with pytest.raises(ValueError):
        random_identity(rng, "both")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_encode_round_trips(fmt: str) -> None:
    img = render_card("front", random_identity(random.Random(4), "front"), size=(410, 260))
    data = encode(img, fmt)
    back = Image.open(io.BytesIO(data))
    assert back.format == fmt
    assert back.size == img.size and back.mode == "RGB"


def test_encode_rejects_unknown_format() -> None:
    with pytest.raises(ValueError):
        encode(Image.new("RGB", (10, 10)), "GIF")


def _truth() -> list[dict]:
    return json.loads(TRUTH.read_text(encoding="utf-8"))["images"]


def test_truth_sha256_matches_the_committed_files() -> None:
    entries = _truth()
    assert sum(e["side"] == "front" for e in entries) >= 4
    assert sum(e["side"] == "back" for e in entries) >= 3
    for entry in entries:
        data = (TRUTH.parent / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]


def test_truth_images_are_valid_colour_cards_with_consistent_fields() -> None:
    for entry in _truth():
        path = TRUTH.parent / entry["file"]
        # a PDF is checked on its first page as the pipeline renders it (Pillow reads no PDF)
        src = io.BytesIO(prepare(path.read_bytes()).data) if path.suffix == ".pdf" else path
        with Image.open(src) as img:
            img.load()
            assert img.mode == "RGB"
            assert min(img.size) >= 256 and max(img.size) <= 2048
            assert _channel_spread(img) > 10
        assert path.stat().st_size < 400_000
        fields = entry["fields"]
        if entry["side"] == "front":
            assert tuple(fields) == FRONT_FIELDS
            assert check_digit(fields["id_number"][:17]) == fields["id_number"][17]
            assert fields["id_number"][6:14] == fields["date_of_birth"].replace("-", "")
        else:
            assert tuple(fields) == BACK_FIELDS


def test_bad_examples_are_present() -> None:
    bad = TRUTH.parent / "images" / "bad"
    assert (bad / "empty.jpg").stat().st_size == 0
    with Image.open(bad / "tiny.png") as tiny:
        assert tiny.size == (120, 76)
    with Image.open(bad / "grayscale.jpg") as gray:
        assert gray.mode == "L"
    with pytest.raises(OSError), Image.open(bad / "truncated.jpg") as truncated:
        truncated.load()
    listed = {e["file"] for e in _truth()}
    assert not any(f.startswith("images/bad/") for f in listed)
