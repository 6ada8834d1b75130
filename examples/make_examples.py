"""Regenerates examples/images/ and examples/truth.json: synthetic cards of fictitious people.

Run from anywhere: ``python examples/make_examples.py``. Output is deterministic for a given
Pillow and font version; needs a CJK font (Debian: ``apt-get install fonts-noto-cjk``), because
the committed cards must carry legible Chinese text.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
# Runnable as a plain script from a checkout, without installing the package first.
sys.path.insert(0, str(HERE.parent))

from idocr_sandbox.cards import (
    BACK_FIELDS,
    FRONT_FIELDS,
    encode,
    find_cjk_font,
    random_person,
    render_card,
)

SEED = 20261101
IMAGES = HERE / "images"
BAD = IMAGES / "bad"
TRUTH = HERE / "truth.json"
BATCH = "2026-11 批次"

# 24-bit BMP is uncompressed: keep it small enough for a repository, with the short side still
# above the providers' 256 px minimum.
BMP_SIZE = (410, 260)
FULL = (1011, 638)
SMALL = (800, 505)
# FULL is an ID card (85.6 x 54 mm) at 300 dpi, so the PDF page has the card's real size.
PDF_DPI = 300.0


@dataclass(frozen=True)
class Card:
    path: str  # relative to IMAGES; {name} is filled in from the person
    side: str
    fmt: str
    size: tuple[int, int] = FULL


# Person index -> what it must show, so the set covers both genders and both printed forms of
# the validity period (a date and 长期); persons are still drawn from the seeded stream.
_WANTS: dict[int, tuple[str, bool]] = {
    0: ("female", True),
    1: ("long_term", True),
    3: ("female", False),
    4: ("long_term", False),
}


def _shows(person: dict[str, str], what: str) -> bool:
    return person["gender"] == "女" if what == "female" else person["valid_to"] == "长期"


def _people(rng: random.Random, count: int) -> list[dict[str, str]]:
    people: list[dict[str, str]] = []
    while len(people) < count:
        person = random_person(rng)
        want = _WANTS.get(len(people))
        if want is None or _shows(person, want[0]) == want[1]:
            people.append(person)
    return people


def _fields(person: dict[str, str], side: str) -> dict[str, str]:
    keys = FRONT_FIELDS if side == "front" else BACK_FIELDS
    return {k: person[k] for k in keys}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _encode_pdf(image: Image.Image) -> bytes:
    """A two-page PDF: the card, then a blank page (ihuyi reads only the first, seed 000 §1.6).

    No title or dates: Pillow would stamp the current time, and the file must be reproducible.
    """
    blank = Image.new("RGB", image.size, (255, 255, 255))
    buf = io.BytesIO()
    image.convert("RGB").save(
        buf, "PDF", resolution=PDF_DPI, quality=90, save_all=True, append_images=[blank],
        title=None, creationDate=None, modDate=None,
    )
    return buf.getvalue()


def _remove_stale(keep: set[str]) -> None:
    # Only files the previous truth.json listed: anything else in images/ is not ours to delete.
    if not TRUTH.is_file():
        return
    try:
        old = json.loads(TRUTH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for entry in old.get("images", []):
        rel = entry.get("file", "")
        target = (HERE / rel).resolve()
        if rel not in keep and target.is_file() and IMAGES.resolve() in target.parents:
            target.unlink()


def main() -> int:
    font = find_cjk_font()
    if font is None:
        print("no CJK font found; install one (Debian: apt-get install fonts-noto-cjk)",
              file=sys.stderr)
        return 1

    rng = random.Random(SEED)
    people = _people(rng, 5)
    # (person index, card): fronts and backs of the same person share their index.
    plan = [
        (0, Card("{name} 正面.jpg", "front", "JPEG")),
        (0, Card("{name} 背面.jpg", "back", "JPEG")),
        (1, Card("front side 01.png", "front", "PNG", SMALL)),
        (1, Card("back side 02.png", "back", "PNG", SMALL)),
        (2, Card("scan 03 人像面.bmp", "front", "BMP", BMP_SIZE)),
        (3, Card(f"{BATCH}/身份证 正面 04.jpg", "front", "JPEG")),
        (4, Card(f"{BATCH}/国徽面 05.png", "back", "PNG")),
    ]

    entries = []
    for index, card in plan:
        person = people[index]
        fields = _fields(person, card.side)
        image = render_card(card.side, fields, size=card.size, font_path=font)
        data = encode(image, card.fmt)
        rel = "images/" + card.path.format(name=person["name"])
        _write(HERE / rel, data)
        entries.append({
            "file": rel,
            "sha256": hashlib.sha256(data).hexdigest(),
            "side": card.side,
            "fields": fields,
        })

    # Inputs the pipeline must reject, each for its own reason.
    spare = random_person(rng)
    valid_jpeg = encode(render_card("front", _fields(spare, "front"), font_path=font), "JPEG")
    _write(BAD / "empty.jpg", b"")
    _write(BAD / "truncated.jpg", valid_jpeg[: len(valid_jpeg) * 40 // 100])
    _write(BAD / "notes.txt", "这不是图片 / not an image: scan notes, batch 2026-11\n".encode())
    tiny = render_card("back", _fields(spare, "back"), size=(120, 76), font_path=font)
    _write(BAD / "tiny.png", encode(tiny, "PNG"))
    gray: Image.Image = render_card("back", _fields(random_person(rng), "back"), font_path=font)
    _write(BAD / "grayscale.jpg", encode(gray.convert("L"), "JPEG"))

    # A scanned PDF, added after the cards above: its person is drawn last from the stream, so
    # every earlier file stays byte-identical.
    person = random_person(rng)
    fields = _fields(person, "front")
    data = _encode_pdf(render_card("front", fields, size=FULL, font_path=font))
    rel = "images/扫描件 06.pdf"
    _write(HERE / rel, data)
    entries.append({
        "file": rel,
        "sha256": hashlib.sha256(data).hexdigest(),
        "side": "front",
        "fields": fields,
    })

    _remove_stale({e["file"] for e in entries})
    TRUTH.write_text(json.dumps({"images": entries}, ensure_ascii=False, indent=2) + "\n",
                     encoding="utf-8")

    for entry in entries:
        print(f"{entry['side']:5}  {entry['file']}")
    print(f"wrote {len(entries)} cards, 5 bad inputs and {TRUTH.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
