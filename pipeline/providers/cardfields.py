"""Key-value extraction from the text boxes of one side of a resident ID card.

The input is what an OCR engine returns — text boxes with a recognition score — already turned
into the card's upright frame (x to the right, y down, any scale). Extraction is geometry, not
one regular expression over the joined text:

1. **Rows.** Boxes that overlap vertically form a row, read left to right. Each character gets
   an approximate x position inside its box, so a label merged with its value ("姓名李勇志") and
   a label split from it ("姓 名" | "李勇志") look the same.
2. **Anchors.** Labels are found on the rows (only their CJK characters are compared, so stray
   punctuation inside a label does not hide it; long labels tolerate a misread character).
   Where a label is unreadable, the card's fixed row order and the content stand in for it:
   an 18-character number row, a ``年 … 月`` date row, a validity period.
3. **Values.** A field is the characters to the right of its label on the label's row; the
   address and the issuing authority also take the rows below that start in the value column,
   until the next field's row.
4. **Constraints.** Each field is cleaned with what the card can print: the ID number's charset
   is ``[0-9X]`` (common look-alikes mapped), ethnicity is one of the 56 official names, dates
   are normalised to YYYY-MM-DD, names keep CJK characters and the middle dot, the authority
   keeps CJK characters.

Nothing is ever filled in from another field (no birth date or gender from the ID number, no
check-digit repair): a value is what the image shows, and disagreements are left to the checks
(:func:`pipeline.domain.checks.check_fields`). Each field's confidence is the lowest recognition
score among the boxes its characters came from.
"""

from __future__ import annotations

import datetime
import re
import statistics
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

__all__ = ["ETHNICITIES", "Allowed", "CardReading", "TextBox", "extract"]

#: a character set to decode a line within: its characters, or a test on one character
Allowed = str | Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class TextBox:
    """One recognised text line in the card's upright frame.

    ``char_x`` (optional) is each character's x position, from the recogniser's time steps;
    without it positions are spread over the box by character width. ``decode`` (optional)
    decodes the line again within an allowed character set: ``decode(allowed) -> (text, score,
    char_x)``; without it a field's character set is applied to the text as read.
    ``likelihood`` (optional) scores a candidate reading of the whole line (log probability),
    to choose among a field's legal values when what was read is none of them.
    """

    text: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float
    char_x: tuple[float, ...] | None = field(default=None, compare=False, repr=False)
    decode: Callable[[Allowed], tuple[str, float, tuple[float, ...]]] | None = field(
        default=None, compare=False, repr=False
    )
    likelihood: Callable[[str], float] | None = field(default=None, compare=False, repr=False)

    @property
    def height(self) -> float:
        return max(self.y1 - self.y0, 1e-6)

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


@dataclass(slots=True)
class CardReading:
    """What :func:`extract` found: ``side`` is None when the boxes are not an ID card."""

    side: str | None
    fields: dict[str, str] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)
    why: str = ""
    #: fields whose label was found but no value beside it (the detector can miss a lone
    #: character): where to look again, in the upright frame (x0, y0, x1, y1), and within what
    retry: dict[str, tuple[tuple[float, float, float, float], Allowed]] = field(
        default_factory=dict
    )


#: the 56 ethnic groups as the card prints them (without 族), longest first so that 土家 is
#: preferred to 土 and 蒙古 to nothing
ETHNICITIES: tuple[str, ...] = tuple(
    sorted(
        (  # noqa: SIM905 - a word list reads better as one string
            "汉 蒙古 回 藏 维吾尔 苗 彝 壮 布依 朝鲜 满 侗 瑶 白 土家 哈尼 哈萨克 傣 黎 傈僳 佤 畲 "
            "高山 拉祜 水 东乡 纳西 景颇 柯尔克孜 土 达斡尔 仫佬 羌 布朗 撒拉 毛南 仡佬 锡伯 阿昌 "
            "普米 塔吉克 怒 乌孜别克 俄罗斯 鄂温克 德昂 保安 裕固 京 塔塔尔 独龙 鄂伦春 赫哲 门巴 "
            "珞巴 基诺"
        ).split(),
        key=len,
        reverse=True,
    )
)

LONG_TERM = "长期"
#: lines recognised with less confidence than this are background, not print
MIN_SCORE = 0.35
#: A legal value chosen by likelihood must not cost more than this (log probability per
#: character) against the line read without it. Printed but misread names measured -0.5 to
#: -3; a name imagined onto blank card measured below -11.
MIN_GAIN_PER_CHAR = -6.0

_LABEL_NAME = "姓名"
_LABEL_GENDER = "性别"
_LABEL_ETHNICITY = "民族"
_LABEL_BIRTH = "出生"
_LABEL_ADDRESS = "住址"
_LABEL_ID = "公民身份号码"
_LABEL_AUTHORITY = "签发机关"
_LABEL_PERIOD = "有效期限"
_BACK_TITLES = ("中华人民共和国", "居民身份证")

# Look-alikes the recogniser emits inside an ID number (the charset is [0-9X]).
_ID_LOOKALIKE = str.maketrans(
    {
        "O": "0",
        "o": "0",
        "D": "0",
        "Q": "0",
        "U": "0",
        "〇": "0",
        "I": "1",
        "l": "1",
        "i": "1",
        "|": "1",
        "!": "1",
        "J": "1",
        "L": "1",
        "Z": "2",
        "z": "2",
        "S": "5",
        "s": "5",
        "B": "8",
        "b": "6",
        "G": "6",
        "g": "9",
        "q": "9",
        "T": "7",
        "x": "X",
        "×": "X",
        "メ": "X",
        "Ⅹ": "X",
    }
)
# The same for dates, where X is no digit.
_DIGIT_LOOKALIKE = str.maketrans(
    {
        "O": "0",
        "o": "0",
        "D": "0",
        "Q": "0",
        "〇": "0",
        "I": "1",
        "l": "1",
        "i": "1",
        "|": "1",
        "!": "1",
        "Z": "2",
        "z": "2",
        "S": "5",
        "s": "5",
        "B": "8",
    }
)
_GENDER_LOOKALIKE = {"男": "男", "女": "女", "另": "男", "勇": "男", "田": "男", "安": "女"}

# Characters that carry no meaning around names and authorities (punctuation, rules of the
# background pattern read as strokes).
_STRAY = frozenset("一丨丶丿乙亅ー－_|/\\~～·.,，。:：;；'\"`^*+=-—()（）[]【】<>《》!！?？")


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def _norm(text: str) -> str:
    # NFKC folds the full-width digits, letters and punctuation recognisers emit into ASCII.
    return "".join(unicodedata.normalize("NFKC", text).split())


def _char_width(ch: str) -> float:
    if _is_cjk(ch):
        return 1.0
    if ch.isalnum():
        return 0.6
    return 0.4


@dataclass(slots=True)
class _Char:
    ch: str
    x: float
    box: int


@dataclass(slots=True)
class _Row:
    boxes: list[int]
    chars: list[_Char]
    y0: float
    y1: float
    height: float

    @property
    def text(self) -> str:
        return "".join(c.ch for c in self.chars)

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


def _chars_of(box: TextBox, index: int) -> list[_Char]:
    if box.char_x is not None and len(box.char_x) == len(box.text):
        return [
            _Char(c, x, index)
            for raw, x in zip(box.text, box.char_x, strict=True)
            for c in _norm(raw)
        ]
    text = _norm(box.text)
    if not text:
        return []
    widths = [_char_width(c) for c in text]
    total = sum(widths)
    span = box.x1 - box.x0
    out, acc = [], 0.0
    for ch, w in zip(text, widths, strict=True):
        out.append(_Char(ch, box.x0 + (acc + w / 2) / total * span, index))
        acc += w
    return out


def _row_chars(boxes: Sequence[TextBox], band: Sequence[int]) -> list[_Char]:
    """The row's characters left to right. A box lying within another (a second look at a
    stretch already partly read) is dropped; where two boxes overlap (the detector cut one line
    twice), the earlier box's characters inside the later box are: read once, not twice."""

    def within(inner: TextBox, outer: TextBox) -> bool:
        tol = 0.3 * outer.height
        return (
            outer.x0 - tol <= inner.x0
            and inner.x1 <= outer.x1 + tol
            and ((inner.x1 - inner.x0, len(inner.text)) < (outer.x1 - outer.x0, len(outer.text)))
        )

    band = [j for j in band if not any(k != j and within(boxes[j], boxes[k]) for k in band)]
    chars: list[_Char] = []
    for k, j in enumerate(band):
        own = _chars_of(boxes[j], j)
        if k + 1 < len(band):
            nxt = boxes[band[k + 1]]
            # boxes that overlap by more than a sliver read the shared character twice
            overlapping = boxes[j].x1 - nxt.x0 > 0.25 * nxt.height
            edge = nxt.x0 - 0.3 * nxt.height if overlapping else nxt.x0
            own = [c for c in own if c.x < edge or c.x > nxt.x1]
            first = _norm(nxt.text)[:1]
            if overlapping and own and first and own[-1].ch == first:
                own.pop()
        chars.extend(own)
    return chars


def _rows(boxes: Sequence[TextBox]) -> list[_Row]:
    """Group boxes into rows by vertical overlap (half of the smaller height)."""
    order = sorted(range(len(boxes)), key=lambda i: boxes[i].cy)
    bands: list[list[int]] = []
    for i in order:
        b = boxes[i]
        best, best_overlap = None, 0.0
        for band in bands:
            y0 = statistics.median(boxes[j].y0 for j in band)
            y1 = statistics.median(boxes[j].y1 for j in band)
            overlap = min(y1, b.y1) - max(y0, b.y0)
            if overlap > 0.5 * min(y1 - y0, b.height) and overlap > best_overlap:
                best, best_overlap = band, overlap
        if best is None:
            bands.append([i])
        else:
            best.append(i)
    rows = []
    for band in bands:
        band.sort(key=lambda j: boxes[j].x0)
        chars = _row_chars(boxes, band)
        if not chars:
            continue
        rows.append(
            _Row(
                boxes=band,
                chars=chars,
                y0=statistics.median(boxes[j].y0 for j in band),
                y1=statistics.median(boxes[j].y1 for j in band),
                height=statistics.median(boxes[j].height for j in band),
            )
        )
    rows.sort(key=lambda r: r.cy)
    return rows


@dataclass(frozen=True, slots=True)
class _Label:
    row: int
    start: int  # index into the row's chars of the label's first character
    end: int  # index just past its last character
    exact: bool


def _find_label(row: _Row, label: str, row_index: int, *, anywhere: bool = True) -> _Label | None:
    """The label among the row's CJK characters: exactly, or with one misread character (two
    for the 6-character label) as long as its first or last character is right. A 2-character
    label is only taken misread where it opens the row; ``anywhere=False`` looks only at the
    row's first two CJK characters (labels stand in the left column)."""
    return (
        _match_label(row, label, row_index, anywhere, strays="", fuzzy=False)
        # a background stroke read between a label's spaced-out characters ("姓一名")
        or _match_label(row, label, row_index, anywhere, strays="一丨丿丶亅", fuzzy=False)
        or _match_label(row, label, row_index, anywhere, strays="", fuzzy=True)
    )


def _match_label(
    row: _Row, label: str, row_index: int, anywhere: bool, strays: str, fuzzy: bool
) -> _Label | None:
    cjk = [i for i, c in enumerate(row.chars) if _is_cjk(c.ch) and c.ch not in strays]
    seq = "".join(row.chars[i].ch for i in cjk)
    n = len(label)
    last = len(seq) - n + 1
    positions = range(max(0, last if anywhere else min(2, last)))
    for p in positions:
        if seq[p : p + n] == label:
            return _Label(row_index, cjk[p], cjk[p + n - 1] + 1, True)
    if not fuzzy:
        return None
    allowed = 2 if n >= 6 else 1
    # a 2-character label opening the row with something read between its characters: a
    # half of one of them cut off as a character of its own ("住主址": 住 and its right half)
    if n == 2 and not anywhere and seq[:1] == label[0] and seq[2:3] == label[1]:
        return _Label(row_index, cjk[0], cjk[2] + 1, False)
    # one character of a two-character label lost (not detected, or read as something else):
    # its other character opening the row still marks where the value starts
    if (
        n == 2
        and seq[:2] != label
        and not anywhere
        and (seq[:1] == label[1] or (seq[:1] == label[0] and seq[1:2] != label[1:]))
    ):
        return _Label(row_index, cjk[0], cjk[0] + 1, False)
    for p in positions:
        if n == 2 and p > 0:
            break
        window = seq[p : p + n]
        misses = sum(1 for a, b in zip(window, label, strict=True) if a != b)
        if misses <= allowed and (window[0] == label[0] or window[-1] == label[-1]):
            return _Label(row_index, cjk[p], cjk[p + n - 1] + 1, False)
    return None


def _first_label(
    rows: list[_Row], label: str, *, anywhere: bool = True, candidates: Sequence[int] | None = None
) -> _Label | None:
    idx = range(len(rows)) if candidates is None else candidates
    exact = fuzzy = None
    for r in idx:
        found = _find_label(rows[r], label, r, anywhere=anywhere)
        if found is None:
            continue
        if found.exact:
            exact = exact or found
        else:
            fuzzy = fuzzy or found
    return exact or fuzzy


@dataclass(slots=True)
class _Value:
    text: str
    boxes: set[int]


def _take(chars: Sequence[_Char]) -> _Value:
    return _Value("".join(c.ch for c in chars), {c.box for c in chars})


def _confidence(boxes: Sequence[TextBox], value: _Value) -> float:
    if not value.boxes:
        return 0.0
    return round(min(float(boxes[i].score) for i in value.boxes), 4)


def _contiguous(chars: Sequence[_Char], height: float) -> list[_Char]:
    """The first run of characters without a gap wider than ~2 characters (stray marks and
    text far to the right of a value are not part of it)."""
    out: list[_Char] = []
    for c in chars:
        if out and c.x - out[-1].x > 2.5 * height:
            break
        out.append(c)
    return out


# --------------------------------------------------------------------------------------------
# Field cleaners
# --------------------------------------------------------------------------------------------

_ID_CANDIDATE = re.compile(r"[0-9X]{15,}")


def clean_id_number(text: str) -> str | None:
    """The longest run of ID characters after mapping look-alikes; an over-long run keeps its
    last 18 (the label side is where stray characters join)."""
    mapped = _norm(text).translate(_ID_LOOKALIKE).upper()
    runs = _ID_CANDIDATE.findall(re.sub(r"[^0-9X]", "", mapped)) if mapped else []
    if not runs:
        digits = re.sub(r"[^0-9X]", "", mapped)
        return digits or None
    run = max(runs, key=len)
    if len(run) > 18:
        run = run[-18:]
    return run


_DATE3 = re.compile(r"((?:19|20)\d{2})\D{0,3}?(\d{1,2})\D{1,3}(\d{1,2})")


def _to_iso(y: str, m: str, d: str) -> str | None:
    try:
        return datetime.date(int(y), int(m), int(d)).isoformat()
    except ValueError:
        return None


def clean_birth_date(text: str) -> str | None:
    """``1959年10月9日`` (and misreadings of 年/月/日) → ``1959-10-09``; unparseable text is
    kept as read, so the checks report it."""
    t = _norm(text).translate(_DIGIT_LOOKALIKE)
    m = _DATE3.search(t)
    if m:
        iso = _to_iso(*m.groups())
        if iso:
            return iso
    digits = re.sub(r"\D", "", t)
    if len(digits) == 8:
        iso = _to_iso(digits[:4], digits[4:6], digits[6:])
        if iso:
            return iso
    kept = re.sub(r"[^0-9年月日]", "", t)
    return kept or None


_PERIOD_DATE = re.compile(r"(\d{4})\D?(\d{2})\D?(\d{2})")


def clean_period(text: str) -> tuple[str | None, str | None]:
    """``2019.06.25-长期`` / ``2010.03.01-2030.03.01`` (separators misread or missing) →
    (from, to) as YYYY-MM-DD or 长期."""
    t = _norm(text).translate(_DIGIT_LOOKALIKE)
    dates = []
    pos = 0
    for m in _PERIOD_DATE.finditer(t):
        dates.append((_to_iso(*m.groups()) or m.group(0), m.end()))
        pos = m.end()
    if not dates:
        digits = re.sub(r"\D", "", t)
        if len(digits) >= 8:
            dates = [(_to_iso(digits[:4], digits[4:6], digits[6:8]) or digits[:8], len(t))]
            if len(digits) >= 16:
                dates.append(
                    (_to_iso(digits[8:12], digits[12:14], digits[14:16]) or digits[8:16], len(t))
                )
    valid_from = dates[0][0] if dates else None
    tail = t[dates[0][1] :] if dates else t
    if len(dates) >= 2:
        valid_to: str | None = dates[1][0]
    elif "长" in tail or "期" in tail:
        valid_to = LONG_TERM
    else:
        valid_to = None
    del pos
    return valid_from, valid_to


def clean_name(text: str) -> str | None:
    """CJK characters and the middle dot of transliterated names; stray marks at either end
    and label remnants go."""
    t = _norm(text).replace("•", "·").replace("・", "·")
    kept = "".join(c for c in t if _is_cjk(c) or c == "·")
    kept = kept.strip("·")
    # a label read again at the start ("姓名" in a second box) is not the name
    for remnant in (_LABEL_NAME, "名"):
        if kept.startswith(remnant) and len(kept) - len(remnant) >= 2:
            kept = kept[len(remnant) :]
            break
    # strokes of the background read as characters (一 and 乙 are real given names)
    kept = kept.strip("丨丿丶亅").lstrip(_LEADING_STROKES)
    return kept or None


def clean_gender(text: str) -> str | None:
    for c in _norm(text):
        if c in _GENDER_LOOKALIKE:
            return _GENDER_LOOKALIKE[c]
    return None


def clean_ethnicity(text: str) -> str | None:
    """One of the 56 names where the reading says which: the name it starts with, or the only
    name it is part of ("柯尔克" of 柯尔克孜); anything else is returned as read, for the
    engine's likelihood (or :func:`nearest_ethnicity`) to settle."""
    t = "".join(c for c in _norm(text) if _is_cjk(c))
    t = t.removesuffix("族")
    if not t:
        return None
    for name in ETHNICITIES:
        if t.startswith(name):
            return name
    holders = [name for name in ETHNICITIES if t in name]
    if len(holders) == 1 and len(t) >= 2:
        return holders[0]
    return t


def nearest_ethnicity(text: str) -> str:
    """Without an engine to ask: the multi-character name sharing most characters in place
    with the reading (at least half of them), else the reading itself."""
    best, best_score = text, 0.0
    for name in ETHNICITIES:
        common = sum(1 for a, b in zip(text, name, strict=False) if a == b)
        if len(name) > 1 and len(text) > 1 and common:
            score = common / max(len(name), len(text))
            if score > best_score and score >= 0.5:
                best, best_score = name, score
    return best


#: background strokes read in front of a value that never starts with them (a province, a
#: city, a surname)
_LEADING_STROKES = "一丨丿丶亅"

_AUTHORITY_ENDINGS = ("公安局", "分局", "公安处", "公安分局")


def clean_authority(text: str) -> str | None:
    kept = "".join(c for c in _norm(text) if _is_cjk(c))
    kept = kept.removeprefix(_LABEL_AUTHORITY).lstrip(_LEADING_STROKES)
    # anything read after the usual ending (a stray mark from the background) goes
    for ending in ("分局", "公安局", "公安处"):
        pos = kept.rfind(ending)
        if pos > 0 and pos + len(ending) < len(kept) and len(kept) - pos - len(ending) <= 2:
            kept = kept[: pos + len(ending)]
            break
    return kept or None


def clean_address(text: str) -> str | None:
    t = _norm(text)
    kept = "".join(c for c in t if _is_cjk(c) or c.isalnum() or c in "-—()（）#·")
    kept = kept.strip("-—·").lstrip(_LEADING_STROKES)
    return kept or None


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------

_ID_ROW = re.compile(r"[0-9Xx]{15,}")
_BIRTH_ROW = re.compile(r"\d{4}\D{0,2}年|年\D{0,2}\d{1,2}\D{0,2}月")
_PERIOD_ROW = re.compile(r"\d{4}\D?\d{2}\D?\d{2}")


def _after(
    row: _Row, label: _Label | None, value_x: float | None, label_text: str = ""
) -> list[_Char]:
    """The row's characters right of its label; without a label found, those right of the
    label column, less any of the label's characters opening them."""
    if label is not None:
        return row.chars[label.end :]
    chars = list(row.chars)
    if value_x is not None:
        chars = [c for c in chars if c.x >= value_x - 1.5 * row.height]
    while chars and chars[0].ch in label_text:
        chars = chars[1:]
    return chars


def _value_x(rows: list[_Row], labels: Sequence[_Label | None]) -> float | None:
    xs = [
        rows[lab.row].chars[lab.end].x - 0.5 * rows[lab.row].height
        for lab in labels
        if lab is not None and lab.end < len(rows[lab.row].chars)
    ]
    return statistics.median(xs) if xs else None


def _name_char(ch: str) -> bool:
    return (_is_cjk(ch) and ch not in "丨丿丶亅") or ch == "·"


def _address_char(ch: str) -> bool:
    return (_is_cjk(ch) and ch not in "丨丿丶亅") or ch.isascii() and (ch.isalnum() or ch in "-()#")


def _authority_char(ch: str) -> bool:
    return _is_cjk(ch) and ch not in "丨丿丶亅"


#: what each row can print, labels included (a line is decoded again within it)
_GENDER_SET = "".join(sorted(set(_LABEL_GENDER + _LABEL_ETHNICITY + "男女" + "".join(ETHNICITIES))))
_ETHNICITY_SET = "".join(sorted(set("".join(ETHNICITIES) + "族")))
_BIRTH_SET = _LABEL_BIRTH + "年月日0123456789"
_ID_SET = _LABEL_ID + "0123456789X"
_PERIOD_SET = _LABEL_PERIOD + "0123456789.-" + LONG_TERM


def _constrain(rows: list[_Row], boxes: list[TextBox], r: int, allowed: Allowed) -> None:
    """Decode the row's lines again within ``allowed`` (where the engine can)."""
    row = rows[r]
    changed = False
    for j in row.boxes:
        b = boxes[j]
        if b.decode is None:
            continue
        text, score, xs = b.decode(allowed)
        boxes[j] = replace(b, text=text, score=score, char_x=xs)
        changed = True
    if changed:
        row.chars = _row_chars(boxes, row.boxes)


def _relabel(rows: list[_Row], label: _Label | None, text: str, anywhere: bool) -> _Label | None:
    if label is None:
        return None
    return _find_label(rows[label.row], text, label.row, anywhere=anywhere) or label


def _look_again(
    out: CardReading,
    row: _Row,
    label: _Label | None,
    next_label: _Label | None,
    key: str,
    allowed: str,
) -> None:
    """A field with its label read but no value: the label and the stretch right of it, up to
    the next label (or a few characters on), to be read again within the label's and the
    field's characters. The label is part of it so that a value whose first character the
    label's box swallowed is read whole."""
    if key in out.fields or label is None:
        return
    h = row.height
    x0 = row.chars[label.start].x - 0.6 * h
    x1 = (
        row.chars[next_label.start].x - 0.6 * h
        if next_label is not None
        else row.chars[label.end - 1].x + 5.5 * h
    )
    if x1 - row.chars[label.end - 1].x < 1.2 * h:
        return
    text = "".join(c.ch for c in row.chars[label.start : label.end])
    out.retry[key] = ((x0, row.y0 - 0.25 * h, x1, row.y1 + 0.25 * h), text + allowed)


def _look_further(out: CardReading, row: _Row, key: str, allowed: Allowed) -> None:
    """A value cut short at its end (the detector's box stopped early): the stretch right of
    its last character, to be read again within the field's characters."""
    if not row.chars:
        return
    h = row.height
    x0 = row.chars[-1].x + 0.4 * h
    out.retry[key] = ((x0, row.y0 - 0.25 * h, x0 + 6 * h, row.y1 + 0.25 * h), allowed)


def _look_below(out: CardReading, last: _Row, left: float, key: str, allowed: Allowed) -> None:
    """A value that does not end as such values do: the start of the line below its last
    line, to be read again (the wrapped rest, a character or two the detector missed)."""
    h = last.height
    out.retry[key] = ((left - 0.8 * h, last.y1 + 0.1 * h, left + 4 * h, last.y1 + 1.5 * h), allowed)


def _best_reading(
    boxes: list[TextBox],
    row: _Row,
    holder: int | None,
    label: _Label | None,
    candidates: Sequence[str],
) -> str | None:
    """The candidate that, after the box's text before the value, best explains the line (by
    the engine's likelihood, per character). None where the engine cannot score, or where even
    the best one explains the line little better than nothing at all (:data:`MIN_GAIN_PER_CHAR`)."""
    if holder is None or boxes[holder].likelihood is None:
        return None
    score = boxes[holder].likelihood
    assert score is not None
    start = label.end if label is not None and row.chars[label.end - 1].box == holder else 0
    before = "".join(c.ch for c in row.chars[:start] if c.box == holder)
    # per character: a name of two characters is not worse for needing two
    base = score(before)
    gain = {name: (score(before + name) - base) / len(name) for name in candidates}
    best = max(candidates, key=gain.__getitem__)
    return best if gain[best] >= MIN_GAIN_PER_CHAR else None


def _front(rows: list[_Row], boxes: list[TextBox]) -> CardReading:
    out = CardReading("front")
    texts = [r.text for r in rows]

    # The ID number row: its label, else the lowest row carrying an 18-character run.
    id_label = _first_label(rows, _LABEL_ID)
    id_row = id_label.row if id_label else None

    def has_number(r: int) -> bool:
        return r < len(rows) and bool(_ID_ROW.search(texts[r].translate(_ID_LOOKALIKE)))

    if id_row is not None and not has_number(id_row) and has_number(id_row + 1):
        id_row, id_label = id_row + 1, None  # the number printed on the line below its label
    if id_row is None:
        runs = [i for i, t in enumerate(texts) if _ID_ROW.search(t.translate(_ID_LOOKALIKE))]
        id_row = runs[-1] if runs else None
    above = range(id_row) if id_row is not None else range(len(rows))

    name_l = _first_label(rows, _LABEL_NAME, anywhere=False, candidates=above)
    gender_l = _first_label(rows, _LABEL_GENDER, anywhere=False, candidates=above)
    eth_l = _first_label(rows, _LABEL_ETHNICITY, candidates=above)
    birth_l = _first_label(rows, _LABEL_BIRTH, anywhere=False, candidates=above)
    addr_l = _first_label(rows, _LABEL_ADDRESS, anywhere=False, candidates=above)

    gender_row = gender_l.row if gender_l else eth_l.row if eth_l else None
    birth_row = birth_l.row if birth_l else None
    if birth_row is None:
        dated = [i for i in above if _BIRTH_ROW.search(texts[i])]
        birth_row = dated[0] if dated else None
    name_row = name_l.row if name_l else None
    if name_row is None and gender_row is not None and gender_row > 0:
        name_row = gender_row - 1
    if gender_row is None and name_row is not None and name_row + 1 < len(rows):
        gender_row = name_row + 1
    addr_row = addr_l.row if addr_l else None
    if (
        addr_row is None
        and birth_row is not None
        and birth_row + 1 < (id_row if id_row is not None else len(rows))
    ):
        addr_row = birth_row + 1
    if birth_row is None and addr_row is not None and addr_row > 0:
        birth_row = addr_row - 1
    if eth_l is not None and eth_l.row != gender_row:
        eth_l = None
    stop = id_row if id_row is not None else min(len(rows), (addr_row or 0) + 4)
    addr_rows = list(range(addr_row, stop)) if addr_row is not None else []

    # Each row decoded again within what it can print; its label found again in the new text.
    for r, allowed in (
        (id_row, _ID_SET),
        (gender_row, _GENDER_SET),
        (birth_row, _BIRTH_SET),
        (name_row, _name_char),
    ):
        if r is not None:
            _constrain(rows, boxes, r, allowed)
    for r in addr_rows:
        _constrain(rows, boxes, r, _address_char)
    id_label = _relabel(rows, id_label, _LABEL_ID, True)
    gender_l = _relabel(rows, gender_l, _LABEL_GENDER, False)
    eth_l = _relabel(rows, eth_l, _LABEL_ETHNICITY, True)
    birth_l = _relabel(rows, birth_l, _LABEL_BIRTH, False)
    name_l = _relabel(rows, name_l, _LABEL_NAME, False)
    addr_l = _relabel(rows, addr_l, _LABEL_ADDRESS, False)

    value_x = _value_x(rows, [name_l, birth_l, addr_l])

    def put(key: str, cleaned: str | None, value: _Value) -> None:
        if cleaned:
            out.fields[key] = cleaned
            out.confidence[key] = _confidence(boxes, value)

    if name_row is not None:
        row = rows[name_row]
        chars = _contiguous(
            [c for c in _after(row, name_l, value_x, _LABEL_NAME) if _is_cjk(c.ch) or c.ch in "·•"],
            row.height,
        )
        v = _take(chars)
        put("name", clean_name(v.text), v)

    if gender_row is not None:
        row = rows[gender_row]
        start = gender_l.end if gender_l else 0
        stop_at = eth_l.start if eth_l else len(row.chars)
        g_chars = row.chars[start:stop_at]
        if gender_l is None and value_x is not None:
            g_chars = [c for c in g_chars if c.x >= value_x - 0.6 * row.height]
        gv = _take(g_chars)
        put("gender", clean_gender(gv.text), gv)
        if eth_l is not None:
            e_chars = row.chars[eth_l.end :]
        else:
            # no label read: what follows the gender character, minus label remnants
            gpos = next(
                (i for i, c in enumerate(row.chars[start:], start) if c.ch in _GENDER_LOOKALIKE),
                None,
            )
            e_chars = [
                c
                for c in row.chars[(gpos + 1 if gpos is not None else start) :]
                if c.ch not in "民族"
            ]
        ev = _take(_contiguous([c for c in e_chars if _is_cjk(c.ch)], row.height))
        eth = clean_ethnicity(ev.text)
        if eth not in ETHNICITIES:
            # None of the 56 read (or nothing within their characters): where the line shows
            # something after the label, the official name that best explains it wins.
            holder = (
                min(ev.boxes)
                if ev.boxes
                else (row.chars[eth_l.end - 1].box if eth_l is not None else None)
            )
            scored = _best_reading(boxes, row, holder, eth_l, ETHNICITIES)
            if scored is not None:
                eth, ev = scored, _Value(scored, {holder} if holder is not None else set())
            elif eth is not None:
                eth = nearest_ethnicity(eth)
        put("ethnicity", eth, ev)

    if gender_row is not None:
        _look_again(out, rows[gender_row], gender_l, eth_l, "gender", "男女")
        _look_again(out, rows[gender_row], eth_l, None, "ethnicity", _ETHNICITY_SET)

    if birth_row is not None:
        bv = _take(_after(rows[birth_row], birth_l, value_x, _LABEL_BIRTH))
        put("date_of_birth", clean_birth_date(bv.text), bv)

    if addr_row is not None:
        first = _after(rows[addr_row], addr_l, value_x, _LABEL_ADDRESS)
        chars = list(first)
        left = min((c.x for c in first), default=value_x)
        for r in addr_rows[1:]:
            row = rows[r]
            # continuation lines start in the value column; anything left of it is not address
            chars.extend(c for c in row.chars if left is None or c.x >= left - 1.5 * row.height)
        av = _take(chars)
        put("domicile", clean_address(av.text), av)
        if left is not None and out.fields.get("domicile", "x")[-1:].isdigit():
            # an address ends in 号/室/组…: the rest wrapped onto a line of its own, too short
            # for the detector
            _look_below(out, rows[addr_rows[-1]], left, "domicile", _address_char)

    if id_row is not None:
        row = rows[id_row]
        chars = row.chars[id_label.end :] if id_label else row.chars
        iv = _take([c for c in chars if c.ch.isalnum() or c.ch in "|!×"])
        put("id_number", clean_id_number(iv.text), iv)
        if len(out.fields.get("id_number", "")) < 18:
            _look_further(out, row, "id_number", "0123456789X")
    return out


def _back(rows: list[_Row], boxes: list[TextBox]) -> CardReading:
    out = CardReading("back")
    texts = [r.text for r in rows]
    auth_l = _first_label(rows, _LABEL_AUTHORITY)
    period_l = _first_label(rows, _LABEL_PERIOD)
    period_row = period_l.row if period_l else None
    period_top = period_row  # the period's label row, which may sit above the value
    if period_row is not None and not _PERIOD_ROW.search(
        texts[period_row].translate(_DIGIT_LOOKALIKE)
    ):
        # the period printed on the line below its label
        nxt = period_row + 1
        if nxt < len(rows) and _PERIOD_ROW.search(texts[nxt].translate(_DIGIT_LOOKALIKE)):
            period_row, period_l = nxt, None
    if period_row is None:
        dated = [
            i for i, t in enumerate(texts) if _PERIOD_ROW.search(t.translate(_DIGIT_LOOKALIKE))
        ]
        period_row = period_top = dated[-1] if dated else None
    auth_row = auth_l.row if auth_l else None
    if auth_row is None and period_top is not None and period_top > 0:
        auth_row = period_top - 1
    if auth_row is None:
        auth_rows: list[int] = []
    else:
        stop = period_top if period_top is not None and period_top > auth_row else auth_row + 2
        auth_rows = list(range(auth_row, min(stop, len(rows))))

    for r in auth_rows:
        _constrain(rows, boxes, r, _authority_char)
    if period_row is not None:
        _constrain(rows, boxes, period_row, _PERIOD_SET)
    auth_l = _relabel(rows, auth_l, _LABEL_AUTHORITY, True)
    period_l = _relabel(rows, period_l, _LABEL_PERIOD, True)
    value_x = _value_x(rows, [auth_l, period_l])

    if auth_rows:
        row = rows[auth_rows[0]]
        chars = list(_after(row, auth_l, value_x, _LABEL_AUTHORITY))
        left = min((c.x for c in chars), default=value_x)
        for r in auth_rows[1:]:
            chars.extend(
                c for c in rows[r].chars if left is None or c.x >= left - 1.5 * rows[r].height
            )
        v = _take(chars)
        cleaned = clean_authority(v.text)
        if cleaned:
            out.fields["issue_authority"] = cleaned
            out.confidence["issue_authority"] = _confidence(boxes, v)
            if left is not None and not cleaned.endswith(("局", "处")):
                _look_below(out, rows[auth_rows[-1]], left, "issue_authority", _authority_char)

    if period_row is not None:
        row = rows[period_row]
        v = _take(_after(row, period_l, value_x, _LABEL_PERIOD))
        valid_from, valid_to = clean_period(v.text)
        conf = _confidence(boxes, v)
        if valid_from:
            out.fields["valid_from"] = valid_from
            out.confidence["valid_from"] = conf
        if valid_to:
            out.fields["valid_to"] = valid_to
            out.confidence["valid_to"] = conf
        elif valid_from:
            _look_further(out, row, "valid_to", _PERIOD_SET)
    return out


def side_scores(rows: list[_Row]) -> tuple[int, int]:
    """(front, back) anchor counts: labels found, plus the content only one side prints."""
    texts = [r.text for r in rows]
    front = sum(
        1
        for label in (
            _LABEL_NAME,
            _LABEL_GENDER,
            _LABEL_ETHNICITY,
            _LABEL_BIRTH,
            _LABEL_ADDRESS,
            _LABEL_ID,
        )
        if _first_label(rows, label) is not None
    )
    if any(_ID_ROW.search(t.translate(_ID_LOOKALIKE)) for t in texts):
        front += 2
    if any(_BIRTH_ROW.search(t) for t in texts):
        front += 1
    back = sum(
        1
        for label in (_LABEL_AUTHORITY, _LABEL_PERIOD, *_BACK_TITLES)
        if _first_label(rows, label) is not None
    )
    if any(
        re.search(
            r"\d{4}\D?\d{2}\D?\d{2}.{0,3}(\d{4}\D?\d{2}\D?\d{2}|长期)",
            t.translate(_DIGIT_LOOKALIKE),
        )
        for t in texts
    ):
        back += 2
    if any("公安" in t for t in texts):
        back += 1
    return front, back


def extract(boxes: Sequence[TextBox], side: str | None = None) -> CardReading:
    """Fields of the card side the boxes show; ``side`` forces front or back."""
    # a copy (constrained lines replace entries), without what the recogniser itself doubts:
    # background patterns read as a character or two
    boxes = [b for b in boxes if _norm(b.text) and b.score >= MIN_SCORE]
    rows = _rows(boxes)
    if side is None:
        front, back = side_scores(rows)
        if max(front, back) < 2:
            return CardReading(None, why="no ID-card labels or card content recognised")
        side = "front" if front >= back else "back"
    reading = _front(rows, boxes) if side == "front" else _back(rows, boxes)
    if not reading.fields:
        return CardReading(None, why=f"no {side} field could be read")
    return reading
