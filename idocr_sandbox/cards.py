"""Synthetic second-generation resident ID cards for demos and tests.

Every person drawn here is invented: names are random surname + given-name pairs, ID numbers are
random sequences that merely satisfy the GB 11643 check digit, portraits are drawn silhouettes and
the emblem is a placeholder. Nothing is copied from a real card.

The images have to pass the pipeline's own precheck (colour, sensible size) and must be told
apart by content hash *and* by eye, so the background pattern is derived from the fields: two
cards with different fields differ in their low-frequency layout, not just in a few text pixels.
That matters most when no CJK font is installed and the text itself cannot be drawn.
"""

from __future__ import annotations

import datetime as dt
import functools
import glob
import hashlib
import io
import math
import os
import random
from collections.abc import Mapping

from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pipeline.domain.checks import age_on, expected_period_years

__all__ = [
    "BACK_FIELDS",
    "FRONT_FIELDS",
    "check_digit",
    "encode",
    "find_cjk_font",
    "random_identity",
    "random_person",
    "render_card",
]

FRONT_FIELDS = ("name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number")
BACK_FIELDS = ("issue_authority", "valid_from", "valid_to")

# The layout is written for a 300 dpi card (85.6 x 54 mm); other sizes scale from it.
_BASE_W, _BASE_H = 1011, 638

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
_RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------
# Fonts
# --------------------------------------------------------------------------------------------

# Freely licensed only: Noto CJK (SIL OFL 1.1, Debian fonts-noto-cjk), WenQuanYi (GPL with font
# exception, fonts-wqy-*), Source Han (OFL). Sans first: the card's printed values are a
# sans-serif (heiti) face.
_FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Medium.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",  # Fedora/Arch layout
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",
)
_FONT_GLOBS = (
    "NotoSansCJK*-Regular.tt[cf]",
    "NotoSansSC-Regular.[ot]tf",
    "NotoSans*CJK*.[ot]t[cf]",
    "NotoSerif*CJK*.[ot]t[cf]",
    "SourceHanSans*.[ot]t[cf]",
    "wqy-*.tt[cf]",
)
_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
)


def find_cjk_font() -> str | None:
    """Path of a freely licensed CJK font on this machine, or None.

    ``IDOCR_CJK_FONT`` wins when it names an existing file, so a machine with fonts in an odd
    place (or a test that wants the fallback, with an empty value) can say so.
    """
    override = os.environ.get("IDOCR_CJK_FONT")
    if override is not None:
        return override if override and os.path.isfile(override) else None
    return _find_cjk_font_cached()


@functools.cache
def _find_cjk_font_cached() -> str | None:
    for path in _FONT_CANDIDATES:
        if os.path.isfile(path):
            return path
    for root in _FONT_DIRS:
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            continue
        for pattern in _FONT_GLOBS:
            hits = sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True))
            if hits:
                return hits[0]
    return None


@functools.cache
def _face_index(path: str) -> int:
    # Noto CJK collections hold JP, KR, SC, TC, HK faces; SC draws simplified glyph shapes.
    if not path.lower().endswith(".ttc"):
        return 0
    for index in range(16):
        try:
            family, _style = ImageFont.truetype(path, 12, index=index).getname()
        except OSError:
            break
        if family and family.rstrip().endswith(" SC"):
            return index
    return 0


def _bold_sibling(path: str) -> str:
    for a, b in (("Regular", "Bold"), ("regular", "bold")):
        if a in os.path.basename(path):
            candidate = os.path.join(
                os.path.dirname(path), os.path.basename(path).replace(a, b)
            )
            if os.path.isfile(candidate):
                return candidate
    return path


class _Fonts:
    """Loads sizes on demand; falls back to Pillow's bundled font, which has no CJK glyphs."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._cache: dict[tuple[int, bool], _Font] = {}

    def get(self, size: int, bold: bool = False) -> _Font:
        size = max(size, 6)
        font = self._cache.get((size, bold))
        if font is None:
            font = self._cache[(size, bold)] = self._load(size, bold)
        return font

    def _load(self, size: int, bold: bool) -> _Font:
        if self.path is not None:
            path = _bold_sibling(self.path) if bold else self.path
            try:
                return ImageFont.truetype(path, size, index=_face_index(path))
            except OSError:
                pass
        try:
            return ImageFont.load_default(size=size)
        except (
            TypeError,
            ImportError,
            OSError,
        ):  # Pillow without FreeType: one fixed size
            return ImageFont.load_default()


# --------------------------------------------------------------------------------------------
# Fictitious identities
# --------------------------------------------------------------------------------------------

_SURNAMES = (
    "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕"
)
# Given-name characters common in each gender's names, so a drawn name does not contradict
# the gender digit of its own ID number.
_GIVEN_MALE = tuple("伟强磊军洋勇杰涛明超刚建国文博宇浩然轩晨阳斌鹏辉志")
_GIVEN_FEMALE = tuple("芳娜秀英敏静丽艳娟霞桂兰华欣怡涵雨思嘉婷雪琳颖玉")

# Weighted so most cards read 汉, as most real ones do; the others exercise multi-character values.
_ETHNICITIES = (
    ("汉", 80),
    ("回", 4),
    ("满", 4),
    ("壮", 3),
    ("蒙古", 3),
    ("苗", 2),
    ("维吾尔", 2),
    ("藏", 1),
    ("土家", 1),
)

# Real administrative division codes (GB/T 2260) with their names, the police (sub-)bureau that
# issues cards there, and the year the code came into use: validators (python-stdnum among them)
# reject a number whose region code did not exist yet in its birth year.
_REGIONS: tuple[tuple[str, str, str, int], ...] = (
    ("110101", "北京市东城区", "北京市公安局东城分局", 0),
    ("110108", "北京市海淀区", "北京市公安局海淀分局", 0),
    ("120101", "天津市和平区", "天津市公安局和平分局", 0),
    ("310104", "上海市徐汇区", "上海市公安局徐汇分局", 0),
    ("310115", "上海市浦东新区", "上海市公安局浦东分局", 1992),
    ("320102", "江苏省南京市玄武区", "南京市公安局玄武分局", 1983),
    ("330106", "浙江省杭州市西湖区", "杭州市公安局西湖分局", 1983),
    ("370102", "山东省济南市历下区", "济南市公安局历下分局", 1983),
    ("420106", "湖北省武汉市武昌区", "武汉市公安局武昌分局", 1983),
    ("440305", "广东省深圳市南山区", "深圳市公安局南山分局", 1990),
    ("440106", "广东省广州市天河区", "广州市公安局天河区分局", 1985),
    ("500103", "重庆市渝中区", "重庆市公安局渝中区分局", 1997),
    ("510107", "四川省成都市武侯区", "成都市公安局武侯区分局", 1990),
    ("610113", "陕西省西安市雁塔区", "西安市公安局雁塔分局", 1983),
)
_STREETS = (
    "人民路",
    "建设路",
    "中山路",
    "解放路",
    "和平街",
    "新华路",
    "幸福里",
    "朝阳路",
    "长江路",
    "学院路",
    "光明街",
    "文化路",
)

_CHECK_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_MAP = "10X98765432"

# Second-generation cards exist since 2004; the upper bound is fixed so output never depends on
# the day the generator runs.
_FIRST_ISSUE = dt.date(2006, 1, 1)
_LAST_ISSUE = dt.date(2025, 12, 31)


def check_digit(first17: str) -> str:
    """GB 11643 check character (ISO 7064 MOD 11-2) for the first 17 digits of an ID number."""
    if len(first17) != 17 or not first17.isdigit():
        raise ValueError("expected 17 digits")
    total = sum(int(d) * w for d, w in zip(first17, _CHECK_WEIGHTS, strict=True))
    return _CHECK_MAP[total % 11]


def _random_date(rng: random.Random, start: dt.date, end: dt.date) -> dt.date:
    return start + dt.timedelta(days=rng.randint(0, (end - start).days))


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February into a common year
        return day.replace(year=day.year + years, day=28)


def random_person(rng: random.Random) -> dict[str, str]:
    """All nine normalised fields of one fictitious person, front and back consistent."""
    born = _random_date(rng, dt.date(1950, 1, 1), dt.date(2012, 12, 31))
    code, place, authority, _since = rng.choice(
        [r for r in _REGIONS if r[3] <= born.year]
    )
    gender = rng.choice(("男", "女"))
    # The 17th digit is odd for men, even for women; the two before it are a free sequence.
    seq = rng.randint(0, 99) * 10 + rng.choice(
        (1, 3, 5, 7, 9) if gender == "男" else (0, 2, 4, 6, 8)
    )
    first17 = f"{code}{born:%Y%m%d}{seq:03d}"
    id_number = first17 + check_digit(first17)

    given_len = 1 if rng.random() < 0.3 else 2
    given = _GIVEN_MALE if gender == "男" else _GIVEN_FEMALE
    name = rng.choice(_SURNAMES) + "".join(rng.choice(given) for _ in range(given_len))
    names, weights = zip(*_ETHNICITIES, strict=True)
    ethnicity = rng.choices(names, weights=weights)[0]

    domicile = f"{place}{rng.choice(_STREETS)}{rng.randint(1, 399)}号"
    if rng.random() < 0.7:
        building, unit = rng.randint(1, 30), rng.randint(1, 6)
        domicile += (
            f"{building}栋{unit}单元{rng.randint(1, 28)}{rng.randint(1, 4):02d}室"
        )

    earliest = max(_FIRST_ISSUE, _add_years(born, 1))
    issued = _random_date(rng, earliest, _LAST_ISSUE)
    period = expected_period_years(age_on(born, issued))
    years = period if isinstance(period, int) else None  # None: long-term (长期)
    valid_to = "长期" if years is None else _add_years(issued, years).isoformat()

    return {
        "name": name,
        "gender": gender,
        "ethnicity": ethnicity,
        "date_of_birth": born.isoformat(),
        "domicile": domicile,
        "id_number": id_number,
        "issue_authority": authority,
        "valid_from": issued.isoformat(),
        "valid_to": valid_to,
    }


def random_identity(rng: random.Random, side: str) -> dict[str, str]:
    """The normalised fields printed on one side of a fictitious person's card."""
    keys = _side_keys(side)
    person = random_person(rng)
    return {k: person[k] for k in keys}


def _side_keys(side: str) -> tuple[str, ...]:
    if side == "front":
        return FRONT_FIELDS
    if side == "back":
        return BACK_FIELDS
    raise ValueError(f"side must be 'front' or 'back', not {side!r}")


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

_INK: _RGB = (24, 24, 28)
_LABEL: _RGB = (40, 110, 175)  # the card prints its labels in blue


def _fields_digest(side: str, fields: Mapping[str, str], seed: int | None) -> bytes:
    parts = [side, "" if seed is None else str(seed)]
    parts += [f"{k}={fields[k]}" for k in sorted(fields)]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()


def _mix(a: _RGB, b: _RGB, t: float) -> _RGB:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _background(size: tuple[int, int], digest: bytes) -> Image.Image:
    """Blue-to-beige gradient, a field-derived tile layout and guilloche lines.

    The tiles carry the low-frequency signature that perceptual hashes see; the lines and the
    rosette are what makes it look like security printing.
    """
    w, h = size
    rng = random.Random(digest)
    blue: _RGB = (rng.randint(186, 200), rng.randint(214, 226), rng.randint(242, 252))
    beige: _RGB = (rng.randint(246, 252), rng.randint(230, 238), rng.randint(196, 208))

    mask = Image.linear_gradient("L").rotate(
        rng.uniform(0, 360),
        resample=Image.Resampling.BICUBIC,
        expand=False,
        fillcolor=128,
    )
    mask = mask.crop((48, 48, 208, 208)).resize(size, Image.Resampling.BILINEAR)
    img = Image.composite(
        Image.new("RGB", size, beige), Image.new("RGB", size, blue), mask
    )

    # An 8x8 mosaic, one digest bit per cell, lighter or deeper blue. It lines up with the 8x8
    # grids that average/difference hashes sample, so two cards with different fields land
    # about half their hash bits apart even where no glyph can be drawn. Softened so it reads
    # as printed shading rather than a chessboard.
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    cols = rows = 8
    bits = int.from_bytes(digest, "big")
    for i in range(cols * rows):
        cx, cy = i % cols, i // cols
        box = (
            cx * w // cols,
            cy * h // rows,
            (cx + 1) * w // cols,
            (cy + 1) * h // rows,
        )
        if (bits >> i) & 1:
            od.rectangle(box, fill=(255, 253, 245, 95))
        else:
            od.rectangle(box, fill=(50, 120, 205, 60))
    overlay = overlay.filter(ImageFilter.GaussianBlur(max(1.0, min(w, h) / 90)))
    img = Image.alpha_composite(img.convert("RGBA"), overlay)

    d = ImageDraw.Draw(img)
    line_w = max(1, round(h / 400))
    for k in range(rng.randint(9, 13)):
        amp = h * rng.uniform(0.02, 0.07)
        freq = rng.uniform(1.5, 5.0) * 2 * math.pi / w
        phase = rng.uniform(0, 2 * math.pi)
        base_y = h * (k + 0.5) / 12 + rng.uniform(-h / 40, h / 40)
        colour = _mix(blue, (90, 140, 190), rng.uniform(0.25, 0.45)) + (110,)
        step = max(2, w // 250)
        pts = [
            (x, base_y + amp * math.sin(freq * x + phase))
            for x in range(0, w + step, step)
        ]
        d.line(pts, fill=colour, width=line_w)

    # A rosette of overlapping ellipses, centre and petal count from the digest.
    rx, ry = w * rng.uniform(0.3, 0.6), h * rng.uniform(0.35, 0.65)
    radius = min(w, h) * rng.uniform(0.22, 0.32)
    petals = rng.randint(10, 18)
    rose = _mix(beige, (200, 150, 120), 0.35) + (90,)
    for p in range(petals):
        a = 2 * math.pi * p / petals
        ex, ey = rx + radius * 0.5 * math.cos(a), ry + radius * 0.5 * math.sin(a)
        d.ellipse(
            (ex - radius / 2, ey - radius / 2, ex + radius / 2, ey + radius / 2),
            outline=rose,
            width=line_w,
        )
    return img.convert("RGB")


def _spaced(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: _Font,
    fill: _RGB,
    spacing: float,
) -> float:
    """Draws with extra tracking, as the card's labels and number are printed; returns end x."""
    x, y = xy
    for ch in text:
        draw.text((x, y), ch, font=font, fill=fill)
        x += draw.textlength(ch, font=font) + spacing
    return x


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: _Font, width: float) -> list[str]:
    lines: list[str] = []
    current = ""
    for ch in text:
        if current and draw.textlength(current + ch, font=font) > width:
            lines.append(current)
            current = ch
        else:
            current += ch
    if current:
        lines.append(current)
    return lines


def _date_text(iso: str, sep: str) -> str:
    try:
        day = dt.date.fromisoformat(iso)
    except ValueError:
        return (
            iso  # keep whatever the caller gave: tests may draw deliberately odd values
        )
    return f"{day:%Y}{sep}{day:%m}{sep}{day:%d}"


def _birth_parts(iso: str) -> tuple[str, str, str] | None:
    try:
        day = dt.date.fromisoformat(iso)
    except ValueError:
        return None
    return str(day.year), str(day.month), str(day.day)


class _Canvas:
    """Scales the 1011x638 reference layout onto the requested size."""

    def __init__(self, img: Image.Image, fonts: _Fonts) -> None:
        self.img = img
        self.draw = ImageDraw.Draw(img)
        self.sx = img.width / _BASE_W
        self.sy = img.height / _BASE_H
        self.fonts = fonts

    def p(self, x: float, y: float) -> tuple[float, float]:
        return x * self.sx, y * self.sy

    def box(
        self, x0: float, y0: float, x1: float, y1: float
    ) -> tuple[float, float, float, float]:
        return x0 * self.sx, y0 * self.sy, x1 * self.sx, y1 * self.sy

    def font(self, size: float, bold: bool = False) -> _Font:
        return self.fonts.get(max(6, round(size * min(self.sx, self.sy))), bold)

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float,
        fill: _RGB = _INK,
        *,
        bold: bool = False,
        tracking: float = 0.0,
    ) -> float:
        end = _spaced(
            self.draw,
            self.p(x, y),
            text,
            self.font(size, bold),
            fill,
            tracking * self.sx,
        )
        return end / self.sx


def _portrait(c: _Canvas, digest: bytes) -> None:
    # A drawn head-and-shoulders silhouette in the photo area; colours vary with the digest so
    # the placeholder is not a constant block shared by every card.
    rng = random.Random(digest[::-1])
    x0, y0, x1, y1 = 640, 80, 930, 450
    tint = _mix(
        (236, 240, 246),
        (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255)),
        0.35,
    )
    c.draw.rectangle(c.box(x0, y0, x1, y1), fill=tint)
    cloth: _RGB = rng.choice(
        ((46, 64, 92), (70, 52, 48), (38, 74, 70), (88, 88, 110), (120, 40, 52))
    )
    skin: _RGB = rng.choice(((226, 190, 160), (214, 172, 140), (238, 204, 178)))
    hair: _RGB = rng.choice(((30, 26, 24), (52, 40, 32), (20, 20, 22)))
    cx = (x0 + x1) / 2
    # Shoulders, neck, head, hair cap.
    c.draw.chord(c.box(cx - 135, 340, cx + 135, 560), 180, 360, fill=cloth)
    c.draw.rectangle(c.box(cx - 28, 270, cx + 28, 350), fill=skin)
    c.draw.ellipse(c.box(cx - 72, 130, cx + 72, 310), fill=skin)
    c.draw.chord(c.box(cx - 78, 112, cx + 78, 270), 180, 360, fill=hair)


def _emblem(c: _Canvas, cx: float, cy: float, r: float) -> None:
    # A placeholder, deliberately not the state emblem: red disc, gold rings, five stars.
    red, gold = (200, 30, 36), (246, 196, 40)
    c.draw.ellipse(c.box(cx - r, cy - r, cx + r, cy + r), fill=gold)
    c.draw.ellipse(
        c.box(cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=red
    )
    c.draw.ellipse(
        c.box(cx - r * 0.78, cy - r * 0.78, cx + r * 0.78, cy + r * 0.78),
        outline=gold,
        width=max(1, round(3 * c.sy)),
    )
    _star(c, cx - r * 0.28, cy - r * 0.2, r * 0.3, gold)
    for k, ang in enumerate((-50, -18, 18, 50)):
        a = math.radians(ang)
        _star(
            c,
            cx - r * 0.28 + r * 0.5 * math.cos(a),
            cy - r * 0.2 + r * 0.5 * math.sin(a),
            r * 0.1,
            gold,
            rotation=k * 0.3,
        )


def _star(
    c: _Canvas, cx: float, cy: float, r: float, fill: _RGB, rotation: float = 0.0
) -> None:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.4
        a = -math.pi / 2 + rotation + i * math.pi / 5
        pts.append(c.p(cx + rad * math.cos(a), cy + rad * math.sin(a)))
    c.draw.polygon(pts, fill=fill)


def _draw_front(c: _Canvas, f: Mapping[str, str], digest: bytes) -> None:
    _portrait(c, digest)
    label, value = 36, 40
    c.text(70, 62, "姓名", label, _LABEL, tracking=22)
    c.text(190, 58, f.get("name", ""), value + 4, bold=True, tracking=6)

    c.text(70, 138, "性别", label, _LABEL, tracking=22)
    c.text(190, 134, f.get("gender", ""), value)
    c.text(330, 138, "民族", label, _LABEL, tracking=22)
    c.text(450, 134, f.get("ethnicity", ""), value)

    c.text(70, 214, "出生", label, _LABEL, tracking=22)
    parts = _birth_parts(f.get("date_of_birth", ""))
    if parts is None:
        c.text(190, 210, f.get("date_of_birth", ""), value)
    else:
        year, month, day = parts
        x = c.text(190, 210, year, value, tracking=1)
        x = c.text(x + 12, 214, "年", label, _LABEL)
        x = c.text(x + 12, 210, month, value)
        x = c.text(x + 12, 214, "月", label, _LABEL)
        x = c.text(x + 12, 210, day, value)
        c.text(x + 12, 214, "日", label, _LABEL)

    c.text(70, 290, "住址", label, _LABEL, tracking=22)
    addr_font = c.font(value - 2)
    lines = _wrap(c.draw, f.get("domicile", ""), addr_font, 430 * c.sx)
    for i, line in enumerate(lines[:4]):
        c.text(190, 288 + i * 52, line, value - 2)

    c.text(70, 540, "公民身份号码", label, _LABEL, tracking=4)
    c.text(330, 532, f.get("id_number", ""), value + 6, bold=True, tracking=7)


def _draw_back(c: _Canvas, f: Mapping[str, str]) -> None:
    _emblem(c, 175, 165, 105)
    c.text(345, 82, "中华人民共和国", 52, bold=True, tracking=18)
    c.text(335, 175, "居民身份证", 84, bold=True, tracking=30)

    c.text(215, 448, "签发机关", 36, _INK, tracking=8)
    c.text(400, 446, f.get("issue_authority", ""), 38)
    c.text(215, 522, "有效期限", 36, _INK, tracking=8)
    start = _date_text(f.get("valid_from", ""), ".")
    end_raw = f.get("valid_to", "")
    end = end_raw if end_raw == "长期" else _date_text(end_raw, ".")
    c.text(400, 520, f"{start}-{end}", 38, tracking=1)


def render_card(
    side: str,
    fields: Mapping[str, str],
    *,
    size: tuple[int, int] = (1011, 638),
    font_path: str | None = None,
    seed: int | None = None,
) -> Image.Image:
    """Draws one side ("front" | "back") of a synthetic card as an RGB image of ``size``.

    ``fields`` uses the normalised names (see FRONT_FIELDS, BACK_FIELDS); missing ones are left
    blank. ``font_path`` defaults to :func:`find_cjk_font`; without any CJK font the labels and
    values cannot be drawn legibly, but the image is still a valid, field-specific colour card.
    ``seed`` varies the background for otherwise identical fields; the result is deterministic.
    """
    _side_keys(side)
    w, h = size
    if w < 16 or h < 16:
        raise ValueError(f"size too small: {size}")
    digest = _fields_digest(side, fields, seed)
    img = _background((w, h), digest)
    path = font_path if font_path is not None else find_cjk_font()
    canvas = _Canvas(img, _fonts_for(path))
    if side == "front":
        _draw_front(canvas, fields, digest)
    else:
        _draw_back(canvas, fields)
    # A thin rounded border where the card's edge is, so crops and scans have a visible outline.
    ImageDraw.Draw(img).rounded_rectangle(
        (0, 0, w - 1, h - 1),
        radius=max(2, round(h * 0.05)),
        outline=(150, 170, 190),
        width=max(1, round(h / 300)),
    )
    return img


@functools.cache
def _fonts_for(path: str | None) -> _Fonts:
    return _Fonts(path)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

_FORMATS = {"JPEG": "JPEG", "JPG": "JPEG", "PNG": "PNG", "BMP": "BMP"}


def encode(image: Image.Image, fmt: str) -> bytes:
    """The image as file bytes: "JPEG" (quality 90), "PNG" (optimised) or "BMP"."""
    name = _FORMATS.get(fmt.upper())
    if name is None:
        raise ValueError(f"unsupported format {fmt!r}; use JPEG, PNG or BMP")
    buf = io.BytesIO()
    if name == "JPEG":
        # JPEG has no alpha or palette; keep L as L so deliberate grayscale samples stay gray.
        img = image if image.mode in ("RGB", "L") else image.convert("RGB")
        img.save(buf, "JPEG", quality=90, optimize=True)
    elif name == "PNG":
        image.save(buf, "PNG", optimize=True)
    else:
        img = image if image.mode in ("RGB", "L", "P", "1") else image.convert("RGB")
        img.save(buf, "BMP")
    return buf.getvalue()
