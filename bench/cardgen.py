"""Varied synthetic ID cards with their truth, for evaluating the local OCR engine.

A renderer of its own (not ``idocr_sandbox/cards.py``, whose cards the examples are): six
CJK faces from Debian packages (Noto Sans/Serif CJK, WenQuanYi Zen Hei/Micro Hei, AR PL
UKai/UMing) mixed per card and per role, label letter-spacing from none to wide (so labels are
read merged with their values or split from them), random layout offsets, minority-language
names with a middle dot, addresses of one to three lines. Then a capture: a flat scan, or a
phone photo — the card somewhere in a larger picture over a busy background, perspective, a
few degrees of skew, any of the four rotations, uneven light, blur, sensor noise and JPEG
compression.

Every person is fictitious: names are random syllables, ID numbers random with a valid check
digit (GB 11643), regions a short list of real codes.

    from bench.cardgen import make_sample
    data, truth = make_sample(seed=7)          # JPEG bytes, {"side", "fields", "style", ...}

Needs the fonts (``apt-get install fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei
fonts-arphic-ukai fonts-arphic-uming``); :func:`fonts` names those found.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["FONT_FILES", "fonts", "make_background", "make_sample", "random_person", "render_card"]

# (file, face name wanted in a collection)
FONT_FILES: dict[str, tuple[str, str]] = {
    "noto-sans": ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "Noto Sans CJK SC"),
    "noto-sans-bold": ("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", "Noto Sans CJK SC"),
    "noto-serif": ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", "Noto Serif CJK SC"),
    "zenhei": ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "WenQuanYi Zen Hei"),
    "microhei": ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "WenQuanYi Micro Hei"),
    "ukai": ("/usr/share/fonts/truetype/arphic/ukai.ttc", "AR PL UKai CN"),
    "uming": ("/usr/share/fonts/truetype/arphic/uming.ttc", "AR PL UMing CN"),
}
_LABEL_FACES = ("noto-sans", "noto-serif", "zenhei", "microhei", "ukai", "uming")
_VALUE_FACES = ("noto-sans", "noto-sans-bold", "zenhei", "microhei", "noto-serif", "uming")
_NUMBER_FACES = ("noto-sans", "noto-sans-bold", "zenhei", "microhei")

W, H = 856, 540  # the card at 10 px/mm


@functools.cache
def fonts() -> dict[str, tuple[str, int]]:
    """The faces present: key → (file, index in the collection)."""
    out = {}
    for key, (path, family) in FONT_FILES.items():
        if not Path(path).is_file():
            continue
        for index in range(12):
            try:
                face = ImageFont.truetype(path, 12, index=index)
            except OSError:
                break
            if face.getname()[0] == family:
                out[key] = (path, index)
                break
    return out


@functools.cache
def _font(key: str, size: int) -> ImageFont.FreeTypeFont:
    have = fonts()
    path, index = have.get(key) or next(iter(have.values()))
    return ImageFont.truetype(path, size, index=index)


# --------------------------------------------------------------------------------------------
# People
# --------------------------------------------------------------------------------------------

_REGIONS = (
    ("110105", "北京市朝阳区", "北京市公安局朝阳分局"),
    ("310115", "上海市浦东新区", "上海市公安局浦东分局"),
    ("440106", "广东省广州市天河区", "广州市公安局天河分局"),
    ("440305", "广东省深圳市南山区", "深圳市公安局南山分局"),
    ("330106", "浙江省杭州市西湖区", "杭州市公安局西湖分局"),
    ("320106", "江苏省南京市鼓楼区", "南京市公安局鼓楼分局"),
    ("510107", "四川省成都市武侯区", "成都市公安局武侯区分局"),
    ("420106", "湖北省武汉市武昌区", "武汉市公安局武昌分局"),
    ("610113", "陕西省西安市雁塔区", "西安市公安局雁塔分局"),
    ("650102", "新疆维吾尔自治区乌鲁木齐市天山区", "乌鲁木齐市公安局天山区分局"),
    ("540102", "西藏自治区拉萨市城关区", "拉萨市公安局城关分局"),
    ("522601", "贵州省黔东南苗族侗族自治州凯里市", "凯里市公安局"),
    ("433101", "湖南省湘西土家族苗族自治州吉首市", "吉首市公安局"),
    ("150102", "内蒙古自治区呼和浩特市新城区", "呼和浩特市公安局新城区分局"),
    ("370102", "山东省济南市历下区", "济南市公安局历下区分局"),
    ("410105", "河南省郑州市金水区", "郑州市公安局金水分局"),
    ("530102", "云南省昆明市五华区", "昆明市公安局五华分局"),
    ("230103", "黑龙江省哈尔滨市南岗区", "哈尔滨市公安局南岗分局"),
    ("350203", "福建省厦门市思明区", "厦门市公安局思明分局"),
    ("360102", "江西省南昌市东湖区", "南昌市公安局东湖分局"),
    ("130104", "河北省石家庄市桥西区", "石家庄市公安局桥西分局"),
    ("341102", "安徽省滁州市琅琊区", "滁州市公安局琅琊分局"),
    ("632821", "青海省海西蒙古族藏族自治州乌兰县", "乌兰县公安局"),
    ("450102", "广西壮族自治区南宁市兴宁区", "南宁市公安局兴宁分局"),
    ("210102", "辽宁省沈阳市和平区", "沈阳市公安局和平分局"),
    ("500103", "重庆市渝中区", "重庆市公安局渝中区分局"),
)
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程"
    "苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝"
)
_COMPOUND = ("欧阳", "司马", "上官", "诸葛", "东方", "慕容", "令狐", "皇甫")
_GIVEN = (
    "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚桂华建国志红文斌辉鹏宇浩然子轩梓涵欣怡思雨"
    "晨阳佳琪俊杰博文嘉怡一诺雅婷晓东海燕春梅玉兰德福永胜建平丽萍淑珍振华天佑心怡若曦紫萱泽宇"
    "翔宁安康乐瑞祥庆丰晶莹雪松立新卫东红梅金凤彩云"
)
_SYLLABLES = "阿依古丽买提艾力热合曼努尔江巴吐逊帕米拉扎西卓玛次仁达娃格桑尼玛央金"
_STREETS = (
    "人民路",
    "解放大道",
    "建设街",
    "幸福里",
    "光明巷",
    "长江路",
    "新华街",
    "和平东路",
    "中山北路",
    "朝阳大街",
    "文化路",
    "青年路",
    "滨江大道",
    "学府路",
    "花园街",
    "胜利西路",
    "团结巷",
    "工农路",
)
_VILLAGES = ("东风村", "红旗村", "新民村", "张家庄", "李家湾", "河西村", "五里铺", "杨柳村")
_TOWNS = ("城关镇", "新安镇", "永和乡", "白沙镇", "清水乡", "石桥镇")

_ETHNIC_RARE = (  # noqa: SIM905 - a word list reads better as one string
    "蒙古 回 藏 维吾尔 苗 彝 壮 布依 朝鲜 满 侗 瑶 白 土家 哈尼 哈萨克 傣 黎 傈僳 佤 畲 高山 拉祜 水 "
    "东乡 纳西 景颇 柯尔克孜 土 达斡尔 仫佬 羌 布朗 撒拉 毛南 仡佬 锡伯 阿昌 普米 塔吉克 怒 乌孜别克 "
    "俄罗斯 鄂温克 德昂 保安 裕固 京 塔塔尔 独龙 鄂伦春 赫哲 门巴 珞巴 基诺"
).split()


def _check_digit(first17: str) -> str:
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    total = sum(int(d) * w for d, w in zip(first17, weights, strict=True))
    return "10X98765432"[total % 11]


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


def _period_years(age: int) -> int | None:
    if age < 16:
        return 5
    if age < 26:
        return 10
    if age < 46:
        return 20
    return None


def _name(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.06:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        return f"{first}·{last}"
    surname = rng.choice(_COMPOUND) if r < 0.1 else rng.choice(_SURNAMES)
    return surname + "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2, 2, 2))))


def _address(rng: random.Random, place: str) -> str:
    if rng.random() < 0.3:
        village = f"{rng.choice(_TOWNS)}{rng.choice(_VILLAGES)}"
        tail = f"{village}{rng.randint(1, 12)}组{rng.randint(1, 99)}号"
    else:
        tail = f"{rng.choice(_STREETS)}{rng.randint(1, 999)}号"
        if rng.random() < 0.6:
            building, unit = rng.randint(1, 40), rng.randint(1, 6)
            room = f"{rng.randint(1, 33)}{rng.randint(1, 6):02d}"
            tail += f"{building}栋{unit}单元{room}室"
        elif rng.random() < 0.5:
            tail += f"附{rng.randint(1, 30)}号"
    return place + tail


def random_person(rng: random.Random) -> dict[str, str]:
    """All nine fields of a fictitious person, consistent with each other."""
    born = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(365 * 70))
    code, place, authority = rng.choice(_REGIONS)
    gender = rng.choice("男女")
    seq = rng.randint(0, 99) * 10 + rng.choice(
        (1, 3, 5, 7, 9) if gender == "男" else (0, 2, 4, 6, 8)
    )
    first17 = f"{code}{born:%Y%m%d}{seq:03d}"
    ethnicity = "汉" if rng.random() < 0.6 else rng.choice(_ETHNIC_RARE)
    issued = born + dt.timedelta(
        days=rng.randrange(max(1, min((dt.date(2026, 6, 1) - born).days, 365 * 30)))
    )
    issued = max(issued, dt.date(2004, 1, 1) + dt.timedelta(days=rng.randrange(365)))
    age = issued.year - born.year - ((issued.month, issued.day) < (born.month, born.day))
    years = _period_years(age)
    return {
        "name": _name(rng),
        "gender": gender,
        "ethnicity": ethnicity,
        "date_of_birth": born.isoformat(),
        "domicile": _address(rng, place),
        "id_number": first17 + _check_digit(first17),
        "issue_authority": authority,
        "valid_from": issued.isoformat(),
        "valid_to": "长期" if years is None else _add_years(issued, years).isoformat(),
    }


FRONT = ("name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number")
BACK = ("issue_authority", "valid_from", "valid_to")

# --------------------------------------------------------------------------------------------
# Drawing the card
# --------------------------------------------------------------------------------------------


@dataclass
class _Style:
    label_face: str
    value_face: str
    number_face: str
    label_rgb: tuple[int, int, int]
    value_rgb: tuple[int, int, int]
    label_size: int
    value_size: int
    tracking: float  # extra space between a label's characters, in em
    value_gap: int  # px between a label and its value
    dx: int
    dy: int


def _style(rng: random.Random) -> _Style:
    have = fonts()
    pick = lambda faces: rng.choice([f for f in faces if f in have] or list(have))
    label_size = rng.randint(22, 27)
    return _Style(
        label_face=pick(_LABEL_FACES),
        value_face=pick(_VALUE_FACES),
        number_face=pick(_NUMBER_FACES),
        label_rgb=(rng.randint(20, 70), rng.randint(80, 130), rng.randint(150, 200)),
        value_rgb=(rng.randint(0, 40),) * 3,
        label_size=label_size,
        value_size=label_size + rng.randint(1, 5),
        tracking=rng.choice((0.0, 0.2, 0.5, 1.0, 1.3)),
        value_gap=rng.choice((6, 14, 24, 40)),
        dx=rng.randint(-12, 12),
        dy=rng.randint(-10, 10),
    )


def _text(
    draw: ImageDraw.ImageDraw,
    x: float,
    y: float,
    s: str,
    font: ImageFont.FreeTypeFont,
    fill: tuple[int, int, int],
    tracking: float = 0.0,
) -> float:
    """Draw ``s`` with extra spacing (in em); returns the x after it."""
    em = font.size
    for ch in s:
        draw.text((x, y), ch, font=font, fill=fill)
        x += font.getlength(ch) + tracking * em
    return x - tracking * em if s else x


def _width(s: str, font: ImageFont.FreeTypeFont, tracking: float = 0.0) -> float:
    return sum(font.getlength(c) for c in s) + tracking * font.size * max(0, len(s) - 1)


def _wrap(s: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    lines, cur = [], ""
    for ch in s:
        if cur and _width(cur + ch, font) > width:
            lines.append(cur)
            cur = ch
        else:
            cur += ch
    return [*lines, cur] if cur else lines


def _background(rng: random.Random) -> Image.Image:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    base = np.array(
        [rng.randint(215, 245), rng.randint(225, 245), rng.randint(230, 250)], np.float32
    )
    tint = np.array([rng.randint(-25, 10), rng.randint(-15, 10), rng.randint(-10, 15)], np.float32)
    t = (x / W * rng.uniform(0.3, 1.0) + y / H * rng.uniform(0.0, 0.7))[..., None]
    img = np.clip(base + tint * t, 0, 255).astype(np.uint8)
    im = Image.fromarray(img, "RGB")
    d = ImageDraw.Draw(im)
    # guilloche: thin waves in two colours
    for _ in range(rng.randint(8, 20)):
        amp, period, phase = rng.uniform(4, 20), rng.uniform(80, 300), rng.uniform(0, 6.3)
        y0 = rng.uniform(0, H)
        colour = (rng.randint(140, 210), rng.randint(160, 210), rng.randint(190, 235))
        pts = [(xx, y0 + amp * math.sin(xx / period * 6.283 + phase)) for xx in range(0, W + 8, 8)]
        d.line(pts, fill=colour, width=1)
    cx, cy = rng.uniform(0.3, 0.7) * W, rng.uniform(0.3, 0.7) * H
    for k in range(rng.randint(0, 10)):
        r = 30 + 12 * k
        d.ellipse(
            (cx - r, cy - r * 0.8, cx + r, cy + r * 0.8),
            outline=(rng.randint(200, 235), rng.randint(185, 215), rng.randint(160, 200)),
        )
    return im


def _portrait(im: Image.Image, rng: random.Random, box: tuple[int, int, int, int]) -> None:
    """A drawn silhouette, clipped to its frame."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    tile = Image.new(
        "RGB", (w, h), (rng.randint(200, 240), rng.randint(215, 240), rng.randint(225, 250))
    )
    d = ImageDraw.Draw(tile)
    cx = w / 2
    skin = (rng.randint(200, 240), rng.randint(160, 200), rng.randint(130, 170))
    d.ellipse(
        (w * 0.05, h * 0.62, w * 0.95, h * 1.4),
        fill=(rng.randint(20, 90), rng.randint(30, 90), rng.randint(60, 120)),
    )
    d.ellipse((cx - w * 0.22, h * 0.15, cx + w * 0.22, h * 0.55), fill=skin)
    d.chord(
        (cx - w * 0.24, h * 0.1, cx + w * 0.24, h * 0.4), 180, 360, fill=(rng.randint(10, 60),) * 3
    )
    im.paste(tile, (x0, y0))


def _draw_front(im: Image.Image, f: dict[str, str], st: _Style, rng: random.Random) -> None:
    _portrait(im, rng, (560 + st.dx // 2, 50, 790 + st.dx // 2, 360))
    d = ImageDraw.Draw(im)
    lf, vf = _font(st.label_face, st.label_size), _font(st.value_face, st.value_size)
    nf = _font(st.value_face, st.value_size + rng.randint(2, 6))
    idf = _font(st.number_face, st.value_size + rng.randint(3, 8))
    lx, ty = 56 + st.dx, 40 + st.dy
    row = st.value_size * rng.uniform(2.0, 2.4)

    def label(y: float, s: str, x: float = lx) -> float:
        return _text(d, x, y, s, lf, st.label_rgb, st.tracking)

    aligned = rng.random() < 0.5  # values in one column, or each after its own label
    col = lx + _width("姓名", lf, st.tracking) + st.value_gap

    def vx(after: float) -> float:
        return col if aligned else after + st.value_gap

    y = ty
    x = label(y + 2, "姓名")
    _text(d, vx(x), y - 2, f["name"], nf, st.value_rgb, rng.choice((0.0, 0.05, 0.15)))
    y += row
    x = label(y, "性别")
    x = _text(d, vx(x), y - 1, f["gender"], vf, st.value_rgb)
    x = label(y, "民族", max(x + rng.randint(50, 110), lx + 190))
    _text(d, x + st.value_gap, y - 1, f["ethnicity"], vf, st.value_rgb)
    y += row
    x = label(y, "出生")
    born = dt.date.fromisoformat(f["date_of_birth"])
    x = vx(x)
    for part, unit in ((str(born.year), "年"), (str(born.month), "月"), (str(born.day), "日")):
        x = _text(d, x, y - 1, part, vf, st.value_rgb) + rng.randint(2, 10)
        x = _text(d, x, y, unit, lf, st.label_rgb) + rng.randint(2, 10)
    y += row
    x = label(y, "住址")
    start = vx(x)
    for i, line in enumerate(_wrap(f["domicile"], vf, 540 + st.dx // 2 - start - 10)[:3]):
        _text(d, start, y - 1 + i * st.value_size * 1.45, line, vf, st.value_rgb)
    y = H - 80 + st.dy // 2
    x = _text(d, lx, y + 4, "公民身份号码", lf, st.label_rgb, min(st.tracking, 0.3))
    _text(
        d,
        max(x + 30, 290 + st.dx),
        y,
        f["id_number"],
        idf,
        st.value_rgb,
        rng.choice((0.02, 0.08, 0.15)),
    )


def _draw_back(im: Image.Image, f: dict[str, str], st: _Style, rng: random.Random) -> None:
    d = ImageDraw.Draw(im)
    cx, cy, r = 120 + st.dx, 125 + st.dy, rng.randint(70, 90)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 30, 30), outline=(240, 190, 40), width=6)
    for k in range(5):
        a = k * 1.2566 - 1.5708
        sx, sy = cx + r * 0.45 * math.cos(a), cy + r * 0.45 * math.sin(a)
        d.regular_polygon((sx, sy, r * 0.14), 5, fill=(250, 210, 40))
    title = _font(rng.choice(("noto-sans-bold", "zenhei", "noto-serif")), rng.randint(36, 44))
    big = _font(rng.choice(("noto-sans-bold", "zenhei", "noto-serif")), rng.randint(56, 70))
    _text(d, 250 + st.dx, 55 + st.dy, "中华人民共和国", title, (20, 20, 20), rng.uniform(0.3, 0.6))
    _text(d, 250 + st.dx, 130 + st.dy, "居民身份证", big, (20, 20, 20), rng.uniform(0.3, 0.6))
    lf, vf = _font(st.label_face, st.label_size), _font(st.value_face, st.value_size)
    lx = 150 + st.dx + rng.randint(-20, 40)
    y = 370 + st.dy
    x = _text(d, lx, y, "签发机关", lf, st.value_rgb, min(st.tracking, 0.5))
    start = x + st.value_gap
    for i, line in enumerate(_wrap(f["issue_authority"], vf, W - 40 - start)[:2]):
        _text(d, start, y - 1 + i * st.value_size * 1.4, line, vf, st.value_rgb)
    y += st.value_size * rng.uniform(2.4, 2.9)
    x = _text(d, lx, y, "有效期限", lf, st.value_rgb, min(st.tracking, 0.5))
    a = f["valid_from"].replace("-", ".")
    b = f["valid_to"] if f["valid_to"] == "长期" else f["valid_to"].replace("-", ".")
    _text(d, x + st.value_gap, y - 1, f"{a}-{b}", vf, st.value_rgb, rng.choice((0.0, 0.03, 0.08)))


def render_card(fields: dict[str, str], side: str, rng: random.Random) -> Image.Image:
    """The card face (856×540) with ``fields`` printed on it."""
    im = _background(rng)
    st = _style(rng)
    (_draw_front if side == "front" else _draw_back)(im, fields, st, rng)
    mask = Image.new("L", im.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, W - 1, H - 1), radius=32, fill=255)
    im.putalpha(mask)
    return im


# --------------------------------------------------------------------------------------------
# Capture: a scan or a phone photo
# --------------------------------------------------------------------------------------------


def _busy_background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    w, h = size
    base = np.array([rng.randint(40, 220) for _ in range(3)], np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(
        0, rng.uniform(4, 18), (h // 8 + 1, w // 8 + 1, 3)
    )
    small = np.clip(base + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(small, "RGB").resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(5, 30)):  # clutter: papers, pens, table edges
        x0, y0 = rng.randrange(w), rng.randrange(h)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            d.rectangle(
                (x0, y0, x0 + rng.randint(20, w // 3), y0 + rng.randint(20, h // 3)), fill=colour
            )
        else:
            d.line(
                (x0, y0, rng.randrange(w), rng.randrange(h)), fill=colour, width=rng.randint(1, 8)
            )
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.5)))


def _photo(card: Image.Image, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    import cv2

    fill = rng.uniform(0.45, 0.85)  # the card's share of the picture's width
    cw = rng.randint(700, 1300)
    bw = int(cw / fill)
    bh = int(bw * rng.choice((0.75, 0.5625, 1.0, 1.2)))
    bg = _busy_background(rng, (bw, bh))
    scale = cw / W
    ch = H * scale
    src = np.float32([[0, 0], [W, 0], [W, H], [0, H]])
    for attempt in range(20):  # the whole card inside the picture, with a margin
        jitter = 0.0 if attempt == 19 else 1.0
        ang = math.radians(rng.uniform(-8, 8) * jitter)
        cx = bw / 2 + rng.uniform(-0.1, 0.1) * bw * jitter
        cy = bh / 2 + rng.uniform(-0.1, 0.1) * bh * jitter
        dst = []
        for px, py in ((-cw / 2, -ch / 2), (cw / 2, -ch / 2), (cw / 2, ch / 2), (-cw / 2, ch / 2)):
            jx, jy = rng.uniform(-0.04, 0.04) * cw, rng.uniform(-0.04, 0.04) * ch  # perspective
            qx, qy = px + jx, py + jy
            dst.append(
                [
                    cx + qx * math.cos(ang) - qy * math.sin(ang),
                    cy + qx * math.sin(ang) + qy * math.cos(ang),
                ]
            )
        xs, ys = [p[0] for p in dst], [p[1] for p in dst]
        if (
            min(xs) > 0.02 * bw
            and max(xs) < 0.98 * bw
            and min(ys) > 0.02 * bh
            and max(ys) < 0.98 * bh
        ):
            break
    else:
        bw, bh = int(bw * 1.3), int(bh * 1.3)
        bg = bg.resize((bw, bh))
        dst = [[x + 0.15 * bw / 1.3, y + 0.15 * bh / 1.3] for x, y in dst]
    m = cv2.getPerspectiveTransform(src, np.float32(dst))
    rgba = np.asarray(card)
    warped = cv2.warpPerspective(
        rgba, m, (bw, bh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0, 0)
    )
    alpha = warped[..., 3:4].astype(np.float32) / 255
    out = np.asarray(bg, np.float32) * (1 - alpha) + warped[..., :3].astype(np.float32) * alpha
    # uneven light and sensor noise
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
    light = 1 + rng.uniform(-0.25, 0.15) * (
        (xx / bw - rng.random()) ** 2 + (yy / bh - rng.random()) ** 2
    )
    out = out * light[..., None] * rng.uniform(0.8, 1.1)
    out += np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(1, 6), out.shape)
    im = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    return im, {"card_width": cw, "skew": round(math.degrees(ang), 1)}


def _scan(card: Image.Image, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    cw = rng.randint(640, 1200)
    im = card.resize((cw, round(cw * H / W)), Image.LANCZOS)
    pad = rng.randint(0, 40)
    page = Image.new(
        "RGB",
        (im.width + 2 * pad, im.height + 2 * pad),
        tuple(rng.randint(225, 255) for _ in range(3)),
    )
    page.paste(im, (pad, pad), im)
    skew = rng.uniform(-2.5, 2.5)
    page = page.rotate(skew, resample=Image.BICUBIC, expand=True, fillcolor=(250, 250, 250))
    return page, {"card_width": cw, "skew": round(skew, 1)}


def make_background(seed: int) -> bytes:
    """A phone photo of a busy table with no card on it (JPEG bytes)."""
    rng = random.Random(seed)
    im = _busy_background(rng, (rng.randint(900, 1600), rng.randint(700, 1200)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=rng.randint(50, 90))
    return buf.getvalue()


def make_sample(
    seed: int,
    side: str | None = None,
    style: str | None = None,
    rotation: int | None = None,
    *,
    hard: bool = False,
) -> tuple[bytes, dict[str, Any]]:
    """One image (JPEG bytes) and its truth: ``{"side", "fields", "style", "rotation", ...}``.
    ``side``, ``style`` ("scan" | "photo") and ``rotation`` (0/90/180/270) are drawn from the
    seed unless given. ``hard``: beyond what a usable capture looks like — the card 380–520 px
    wide, blurred, JPEG quality 15–40 — to see how errors are caught, not to score accuracy."""
    rng = random.Random(seed)
    side = side or rng.choice(("front", "back"))
    style = style or ("photo" if rng.random() < 0.6 else "scan")
    if rotation is None:
        rotation = rng.choices((0, 90, 180, 270), weights=(55, 15, 15, 15))[0]
    person = random_person(rng)
    fields = {k: person[k] for k in (FRONT if side == "front" else BACK)}
    card = render_card(fields, side, rng)
    im, info = (_photo if style == "photo" else _scan)(card, rng)
    blur = rng.choice((0.0, 0.0, 0.5, 0.8, 1.2))
    if hard:
        f = rng.uniform(380, 520) / info["card_width"]
        f = max(f, 260 / min(im.size))  # still within the pipeline's 256 px minimum
        im = im.resize((round(im.width * f), round(im.height * f)), Image.LANCZOS)
        info["card_width"] = round(info["card_width"] * f)
        blur = rng.choice((0.6, 0.9, 1.2))
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    if rotation:
        im = im.rotate(rotation, expand=True)  # counter-clockwise, as a phone held sideways
    longest = max(im.size)
    if longest > 2000:
        s = 2000 / longest
        im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
    quality = rng.randint(15, 40) if hard else rng.randint(35, 92)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    truth = {
        "side": side,
        "fields": fields,
        "style": style,
        "rotation": rotation,
        "blur": blur,
        "jpeg_quality": quality,
        "seed": seed,
        "hard": hard,
        **info,
    }
    return buf.getvalue(), truth
