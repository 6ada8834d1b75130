"""Provider-independent checks on recognised ID-card fields, and PII masking.

Everything here works on the result record's field names (see DESIGN "The result record") and
never calls a provider. A check is ``{"ok": bool | None, "level": "error" | "warning",
"detail": str}``; ``ok`` is ``None`` when the check does not apply (an input is missing, or an
earlier check already failed so this one has nothing sound to look at). Details are stored with
the record and may be printed, so they never contain the full ID number or the birth date.

The ID-number arithmetic (ISO 7064 MOD 11-2 check digit, embedded birth date, region table) is
python-stdnum's :mod:`stdnum.cn.ric`; this module only maps its outcomes to separate checks.
Behaviour of stdnum 2.2 that this module works around (covered by the tests):

* ``validate`` raises ``InvalidComponent`` for both an impossible birth date and an unknown
  region, so those are asked for separately (``get_birth_date``, ``get_birth_place``).
* ``get_birth_place`` (and so ``validate`` and even ``is_valid``) raises a bare ``KeyError``
  when the province part of the code exists but the county part does not (e.g. ``110199``).
* ``InvalidLength`` is a subclass of ``InvalidFormat``: it must be caught first.
* The last character is never checked for being a digit or X: ``…001A`` is reported as a
  checksum error, so that case is classified as a format error here.
* Embedded birth dates in the future are accepted; ``compact`` removes no inner spaces.
"""

from __future__ import annotations

import datetime
import logging
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Final, Literal, TypedDict

from stdnum.cn import ric
from stdnum.exceptions import (
    InvalidChecksum,
    InvalidComponent,
    InvalidFormat,
    InvalidLength,
    ValidationError,
)

__all__ = [
    "LONG_TERM",
    "Check",
    "PIIFilter",
    "check_fields",
    "check_pair",
    "expected_period_years",
    "is_id_number",
    "mask_address",
    "mask_date_of_birth",
    "mask_fields",
    "mask_file_name",
    "mask_id_number",
    "mask_name",
    "parse_date",
    "parse_valid_period",
    "period_years",
    "redact_personal_text",
    "redact_text",
]

LONG_TERM = "长期"

Level = Literal["error", "warning"]


class Check(TypedDict):
    ok: bool | None
    level: Level
    detail: str


def _check(ok: bool | None, detail: str, level: Level = "error") -> Check:
    return {"ok": ok, "level": level, "detail": detail}


def _missing(level: Level = "error") -> Check:
    return _check(None, "missing", level)


def _norm(s: str) -> str:
    # NFKC folds full-width digits and punctuation (１９９０．０３) that OCR engines emit
    # into ASCII;
    # it leaves 年月日 and 长期 alone.
    return unicodedata.normalize("NFKC", s).strip()


# ---------------------------------------------------------------------------------------------
# Parsing helpers (used by the provider clients to normalise their fields)
# ---------------------------------------------------------------------------------------------

# The front of the card prints the birth date as "1990 年 3 月 7 日" (no leading zeros), the back
# prints "2005.10.08"; providers add their own variants, so 1–2 digit months/days are accepted
# whenever there is a separator. The separator must be the same twice (backreference) so a stray
# character does not make a date out of unrelated numbers.
_SEP_DATE = re.compile(r"(\d{4})\s*([.\-/])\s*(\d{1,2})\s*\2\s*(\d{1,2})")
_CJK_DATE = re.compile(r"(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*日?")
_COMPACT_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
# The same shapes, without groups, for finding dates inside a validity period.
_DATE_PATTERN = (
    r"\d{4}\s*(?:[.\-/]\s*\d{1,2}\s*[.\-/]\s*\d{1,2}|年\s*\d{1,2}\s*月\s*\d{1,2}\s*日?|\d{4})"
)


def _to_date(year: str, month: str, day: str) -> datetime.date | None:
    try:
        return datetime.date(int(year), int(month), int(day))
    except ValueError:
        return None


def _parse_date_obj(s: str | None) -> datetime.date | None:
    if not isinstance(s, str):
        return None
    text = _norm(s)
    for pattern in (_SEP_DATE, _CJK_DATE, _COMPACT_DATE):
        m = pattern.fullmatch(text)
        if m:
            g = m.groups()
            # _SEP_DATE captures the separator as group 2
            y, mo, d = (g[0], g[2], g[3]) if pattern is _SEP_DATE else g
            return _to_date(y, mo, d)
    return None


def parse_date(s: str) -> str | None:
    """``"YYYY.MM.DD"``, ``"YYYY-MM-DD"``, ``"YYYYMMDD"``, ``"YYYY年MM月DD日"`` (spaces allowed)
    → ``"YYYY-MM-DD"``; ``None`` if the text is not one of these or not a real date."""
    d = _parse_date_obj(s)
    return d.isoformat() if d else None


# Separators seen between the two dates of a validity period. "一" (CJK "one") is there because
# OCR engines regularly read the printed dash as it; it never occurs inside a date.
_PERIOD_SEP = r"(?:[-—–―~至到一]+)"
_PERIOD_RE = re.compile(
    rf"(?P<a>{_DATE_PATTERN})?\s*{_PERIOD_SEP}\s*(?P<b>{_DATE_PATTERN}|{LONG_TERM})?"
)
_UNAMBIGUOUS_SEP = re.compile(r"[—–―~至到一]+")


def _parse_end(s: str) -> str | None:
    s = s.strip()
    if s == LONG_TERM:
        return LONG_TERM
    return parse_date(s)


def parse_valid_period(s: str) -> tuple[str | None, str | None]:
    """``"2005.10.08-2025.10.08"`` → ``("2005-10-08", "2025-10-08")``;
    ``"2005.10.08-长期"`` → ``("2005-10-08", "长期")``. Unparseable parts are ``None``."""
    if not isinstance(s, str):
        return None, None
    text = _norm(s).replace("长期有效", LONG_TERM)
    # "-" is both the date separator and the period separator ("2005-10-08-2025-10-08"), so the
    # whole shape is matched first and only then split on a separator.
    m = _PERIOD_RE.fullmatch(text)
    if m:
        a, b = m.group("a"), m.group("b")
        return (parse_date(a) if a else None), (_parse_end(b) if b else None)
    # Garbage on one side: split on an unambiguous separator, or on the only "-" there is.
    parts = _UNAMBIGUOUS_SEP.split(text, maxsplit=1)
    if len(parts) != 2 and text.count("-") == 1:
        parts = text.split("-")
    if len(parts) == 2:
        return parse_date(parts[0].strip()), _parse_end(parts[1])
    return None, None


# ---------------------------------------------------------------------------------------------
# Validity periods (居民身份证法 Art. 5)
# ---------------------------------------------------------------------------------------------

_LEGAL_PERIODS = (5, 10, 20)


def _anniversaries(start: datetime.date, years: int) -> set[datetime.date]:
    """The day(s) ``years`` after ``start``. From Feb 29 into a non-leap year the calendar has no
    such day and cards are seen either way, so both Feb 28 and Mar 1 are accepted."""
    try:
        return {start.replace(year=start.year + years)}
    except ValueError:
        y = start.year + years
        return {datetime.date(y, 2, 28), datetime.date(y, 3, 1)}


def period_years(valid_from: datetime.date, valid_to: datetime.date) -> int | None:
    """5, 10 or 20 if ``valid_to`` is exactly that many years after ``valid_from``, else None."""
    for years in _LEGAL_PERIODS:
        if valid_to in _anniversaries(valid_from, years):
            return years
    return None


def expected_period_years(age_at_issue: int) -> int | str:
    """Art. 5: under 16 → 5 years, 16–25 → 10, 26–45 → 20, 46 and over → 长期."""
    if age_at_issue < 16:
        return 5
    if age_at_issue <= 25:
        return 10
    if age_at_issue <= 45:
        return 20
    return LONG_TERM


def age_on(birth: datetime.date, day: datetime.date) -> int:
    # Completed years; someone born on Feb 29 turns a year older on Mar 1 in non-leap years.
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


# ---------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------

_FRONT_FIELDS = ("name", "gender", "ethnicity", "date_of_birth", "domicile", "id_number")
_BACK_FIELDS = ("issue_authority", "valid_from", "valid_to")

_MALE = {"男", "m", "male"}
_FEMALE = {"女", "f", "female"}


def _present(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def _compact_id(raw: str) -> str:
    # OCR output sometimes splits the number into groups; stdnum's compact keeps inner spaces.
    return ric.compact("".join(_norm(raw).split()))


def _id_number_checks(
    number_raw: str, fields: Mapping[str, Any], today: datetime.date
) -> dict[str, Check]:
    number = _compact_id(number_raw)
    na = "not applicable: id_number format invalid"
    out: dict[str, Check] = {}

    # 1. Format and checksum, told apart by stdnum's exception classes.
    fmt: Check
    checksum: Check
    try:
        ric.validate(number)
        fmt, checksum = _check(True, "18 characters"), _check(True, "check digit ok")
    except InvalidLength:  # subclass of InvalidFormat: must come first
        detail = f"length {len(number)}, expected 18"
        if len(number) == 15 and number.isdigit():
            detail += " (15-digit first-generation number)"
        fmt, checksum = _check(False, detail), _check(None, na)
    except InvalidFormat:
        fmt, checksum = _check(False, "non-digit among the first 17 characters"), _check(None, na)
    except InvalidChecksum:
        if not (number[-1].isdigit() or number[-1] == "X"):
            # stdnum compares any last character with the check digit; a letter other than X is
            # a misread, not an arithmetic failure.
            fmt = _check(False, "last character must be a digit or X")
            checksum = _check(None, na)
        else:
            fmt = _check(True, "18 characters")
            checksum = _check(
                False, f"check digit is {number[-1]}, expected {ric.calc_check_digit(number)}"
            )
    except (InvalidComponent, KeyError):
        # stdnum checks length, format and checksum before the components, so reaching a
        # component error means those passed; KeyError is stdnum's own bug for partial regions.
        fmt, checksum = _check(True, "18 characters"), _check(True, "check digit ok")
    out["id_number_format"] = fmt
    out["id_number_checksum"] = checksum
    if fmt["ok"] is not True:
        for key in ("id_number_birth_date", "birth_date_matches", "gender_matches"):
            out[key] = _check(None, na)
        out["region_known"] = _check(None, na, "warning")
        return out

    # 2. The birth date embedded in the number: a real date, and not in the future (stdnum
    # accepts any calendar date, including ones after today).
    try:
        embedded: datetime.date | None = ric.get_birth_date(number)
    except (InvalidComponent, ValueError):
        embedded = None
    if embedded is None:
        out["id_number_birth_date"] = _check(False, "digits 7-14 are not a real date")
    elif embedded > today:
        out["id_number_birth_date"] = _check(False, "birth date in the number is in the future")
    elif embedded.year < 1900:
        out["id_number_birth_date"] = _check(False, "birth date in the number is before 1900")
    else:
        out["id_number_birth_date"] = _check(True, "real date")

    # 3. Birth date: number vs the printed field (dates themselves are not put in the detail).
    dob_raw = _present(fields, "date_of_birth")
    if dob_raw is None:
        out["birth_date_matches"] = _missing()
    elif embedded is None:
        out["birth_date_matches"] = _check(None, "not applicable: no real date in the number")
    else:
        dob = _parse_date_obj(dob_raw)
        if dob is None:
            out["birth_date_matches"] = _check(False, "date_of_birth is not a date")
        elif dob == embedded:
            out["birth_date_matches"] = _check(True, "date_of_birth matches the number")
        else:
            out["birth_date_matches"] = _check(False, "date_of_birth differs from the number")

    # 4. Gender: the 17th digit is odd for men, even for women.
    gender_raw = _present(fields, "gender")
    if gender_raw is None:
        out["gender_matches"] = _missing()
    else:
        g = gender_raw.lower()
        number_male = int(number[16]) % 2 == 1
        says = "男" if number_male else "女"
        if g not in _MALE and g not in _FEMALE:
            out["gender_matches"] = _check(False, "gender is neither 男 nor 女")
        elif (g in _MALE) == number_male:
            out["gender_matches"] = _check(True, f"17th digit says {says}")
        else:
            out["gender_matches"] = _check(
                False, f"17th digit says {says}, gender says {gender_raw}"
            )

    # 5. Region: only a warning, stdnum's table (from Wikipedia) lags and trails real changes.
    region = number[:6]
    if embedded is None:
        # stdnum's lookup needs the birth year to pick the code's period of use
        out["region_known"] = _check(None, "not applicable: no real date in the number", "warning")
    else:
        try:
            place = ric.get_birth_place(number)
            name = " ".join(v for v in (place.get("province"), place.get("county")) if v)
            out["region_known"] = _check(True, f"{region} {name}".strip(), "warning")
        except (InvalidComponent, KeyError):
            out["region_known"] = _check(
                False, f"region code {region} unknown for birth year {embedded.year}", "warning"
            )
    return out


def _front_checks(fields: Mapping[str, Any], today: datetime.date) -> dict[str, Check]:
    number_raw = _present(fields, "id_number")
    if number_raw is None:
        checks = {
            key: _missing()
            for key in (
                "id_number_format",
                "id_number_checksum",
                "id_number_birth_date",
                "birth_date_matches",
                "gender_matches",
            )
        }
        checks["region_known"] = _missing("warning")
        return checks
    return _id_number_checks(number_raw, fields, today)


def _date_or_long_term(raw: str) -> datetime.date | str | None:
    if raw == LONG_TERM or _norm(raw) in (LONG_TERM, "长期有效"):
        return LONG_TERM
    return _parse_date_obj(raw)


def _back_checks(fields: Mapping[str, Any], today: datetime.date) -> dict[str, Check]:
    out: dict[str, Check] = {}
    from_raw, to_raw = _present(fields, "valid_from"), _present(fields, "valid_to")
    valid_from = _parse_date_obj(from_raw) if from_raw else None
    valid_to = _date_or_long_term(to_raw) if to_raw else None

    if from_raw is None or to_raw is None:
        out["valid_period_rule"] = _missing()
    elif valid_from is None:
        out["valid_period_rule"] = _check(False, "valid_from is not a date")
    elif valid_to is None:
        out["valid_period_rule"] = _check(False, "valid_to is neither a date nor 长期")
    elif valid_to == LONG_TERM:
        # Only holders aged 46+ get 长期; the back has no birth date, check_pair verifies it.
        out["valid_period_rule"] = _check(True, "长期")
    else:
        assert isinstance(valid_to, datetime.date)
        years = period_years(valid_from, valid_to)
        if years is not None:
            out["valid_period_rule"] = _check(True, f"{years} years")
        elif valid_to <= valid_from:
            out["valid_period_rule"] = _check(False, "valid_to is not after valid_from")
        else:
            out["valid_period_rule"] = _check(
                False, "period is not exactly 5, 10 or 20 years (same month and day) nor 长期"
            )

    # card_expired: ok False means expired; a warning because an expired card is still a
    # correctly read card.
    if to_raw is None:
        out["card_expired"] = _missing("warning")
    elif valid_to == LONG_TERM:
        out["card_expired"] = _check(True, "长期: never expires", "warning")
    elif valid_to is None:
        out["card_expired"] = _check(None, "not applicable: valid_to is not a date", "warning")
    else:
        assert isinstance(valid_to, datetime.date)
        if valid_to < today:
            out["card_expired"] = _check(
                False, f"card expired on {valid_to.isoformat()}", "warning"
            )
        else:
            out["card_expired"] = _check(True, f"valid until {valid_to.isoformat()}", "warning")
    return out


def check_fields(
    side: str | None, fields: Mapping[str, Any], *, today: datetime.date
) -> dict[str, Check]:
    """Run the checks of one side (``"front"`` or ``"back"``) over normalised ``fields``.

    ``side=None`` (a provider that did not say) runs the checks of whichever side's fields are
    present. ``today`` is explicit so results are reproducible and testable.
    """
    if side == "front":
        return _front_checks(fields, today)
    if side == "back":
        return _back_checks(fields, today)
    if side is None or side == "":
        out: dict[str, Check] = {}
        if any(_present(fields, k) for k in _FRONT_FIELDS):
            out.update(_front_checks(fields, today))
        if any(_present(fields, k) for k in _BACK_FIELDS):
            out.update(_back_checks(fields, today))
        return out
    raise ValueError(f"side must be 'front' or 'back', not {side!r}")


def _birth_date_for_pair(front: Mapping[str, Any]) -> datetime.date | None:
    # The number, when its check digit holds, is a better witness than the OCR'd date text.
    number_raw = _present(front, "id_number")
    if number_raw:
        number = _compact_id(number_raw)
        try:
            ric.validate(number)
            good = True
        except (InvalidComponent, KeyError):
            good = True  # checksum passed; the date itself is re-checked below
        except ValidationError:
            good = False
        if good:
            try:
                return ric.get_birth_date(number)
            except (InvalidComponent, ValueError):
                pass
    dob_raw = _present(front, "date_of_birth")
    return _parse_date_obj(dob_raw) if dob_raw else None


def check_pair(
    front_fields: Mapping[str, Any], back_fields: Mapping[str, Any], *, grace_days: int = 0
) -> dict[str, Check]:
    """Checks that need both sides of one person's card: the validity period against the age at
    issue (``valid_period_matches_age``).

    The law ties the period to the age when the card is *applied for*, while valid_from is the
    issue date, a few weeks later. ``grace_days`` > 0 also accepts the period due at
    ``valid_from - grace_days``, for cards applied for just before a 16th/26th/46th birthday.
    """
    key = "valid_period_matches_age"
    from_raw, to_raw = _present(back_fields, "valid_from"), _present(back_fields, "valid_to")
    birth = _birth_date_for_pair(front_fields)
    if from_raw is None or to_raw is None or birth is None:
        return {key: _missing()}
    valid_from = _parse_date_obj(from_raw)
    valid_to = _date_or_long_term(to_raw)
    if valid_from is None or valid_to is None:
        return {key: _check(None, "not applicable: validity period unparseable")}
    if valid_from < birth:
        return {key: _check(False, "valid_from is before the birth date")}
    if valid_to == LONG_TERM:
        actual: int | str = LONG_TERM
    else:
        assert isinstance(valid_to, datetime.date)
        years = period_years(valid_from, valid_to)
        if years is None:
            return {key: _check(None, "not applicable: period is not a legal length")}
        actual = years

    age = age_on(birth, valid_from)
    expected = expected_period_years(age)
    accepted = {expected}
    if grace_days > 0:
        applied = valid_from - datetime.timedelta(days=grace_days)
        if applied >= birth:
            accepted.add(expected_period_years(age_on(birth, applied)))

    def show(p: int | str) -> str:
        return p if isinstance(p, str) else f"{p} years"

    if actual in accepted:
        return {key: _check(True, f"age {age} at issue: {show(actual)}")}
    return {
        key: _check(False, f"age {age} at issue requires {show(expected)}, card has {show(actual)}")
    }


# ---------------------------------------------------------------------------------------------
# Masking (DESIGN: recognised PII is masked in logs and CLI output by default)
# ---------------------------------------------------------------------------------------------


def mask_id_number(s: str) -> str:
    """18 characters → first 6 (region) and last 4 kept: ``110101********123X``. Anything else
    (short, 15-digit, garbage) → all asterisks but the last 2, length preserved."""
    if not s:
        return s
    s = s.strip()
    if len(s) == 18:
        return s[:6] + "*" * 8 + s[-4:]
    if len(s) <= 4:
        return "*" * len(s)  # keeping 2 of 4 or fewer characters would reveal too much
    return "*" * (len(s) - 2) + s[-2:]


# Two-character surnames: keeping only their first character would be an odd half-surname, and
# keeping the whole surname reveals no more than "张*" does for a one-character one.
_COMPOUND_SURNAMES = frozenset(
    (  # noqa: SIM905 - a word list reads better as one string
        "欧阳 司马 诸葛 上官 东方 皇甫 尉迟 公孙 慕容 长孙 宇文 司徒 司空 夏侯 轩辕 令狐 "
        "端木 西门 南宫 独孤 百里 呼延 澹台 公冶 太史 申屠 钟离 闻人 赫连 万俟 濮阳 淳于 "
        "单于 拓跋 东郭 南门 羊舌 微生 梁丘 左丘 第五 谷梁 乐正 公羊 仲孙 叔孙 宗政 颛孙 "
        "巫马 公西 漆雕 壤驷 公良 段干 司寇 子车 亓官 鲜于 闾丘 东门 胡母 纳兰 爱新觉罗"
    ).split()
)


def mask_name(s: str) -> str:
    """Keep the surname's first character (a known compound surname whole): ``张*``,
    ``欧阳**``; every other character becomes ``*``."""
    if not s:
        return s
    s = s.strip()
    if len(s) == 1:
        return "*"  # keeping the first character of a one-character name would keep all of it
    for surname in sorted(_COMPOUND_SURNAMES, key=len, reverse=True):
        if s.startswith(surname) and len(s) > len(surname):
            return surname + "*" * (len(s) - len(surname))
    return s[:1] + "*" * (len(s) - 1)


def mask_address(s: str) -> str:
    """Keep the first 6 characters (province/city level), then ``***`` whatever the length, so
    the length tells nothing. Addresses of 6 characters or fewer keep only their first half."""
    if not s:
        return s
    s = s.strip()
    keep = 6 if len(s) > 6 else len(s) // 2
    return s[:keep] + "***"


def mask_date_of_birth(s: str) -> str:
    """Keep the year only: ``1990-**-**``."""
    if not s:
        return s
    d = _parse_date_obj(s)
    if d is not None:
        return f"{d.year:04d}-**-**"
    m = re.match(r"\s*(\d{4})", _norm(s))
    return f"{m.group(1)}-**-**" if m else "****-**-**"


_MASKERS = {
    "name": mask_name,
    "id_number": mask_id_number,
    "domicile": mask_address,
    "date_of_birth": mask_date_of_birth,
}


def mask_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` with name, id_number, domicile and date_of_birth masked; other keys
    and non-string values are passed through unchanged."""
    out = dict(fields)
    for key, mask in _MASKERS.items():
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = mask(value)
    return out


# --- ID numbers in free text ------------------------------------------------------------------
#
# A run of 18 characters (17 digits + a digit or X) or of 15 digits, not part of a longer run of
# digits, is masked only when it *is* an ID number, so that latencies (``0.123456789012345s``),
# timestamps, byte counts and ids pass intact:
#   * 18 characters: a province code (GB/T 2260's first two digits, or 9x for the foreigners'
#     permanent residence card) and a real birth date in digits 7-14, and the GB 11643 check
#     digit holds (or the last character is X: an ID number with one misread digit is still
#     personal, and no plain number ends in X);
#   * 15 digits (first-generation numbers, 1984-1999): a province code and a real date 19YYMMDD
#     in digits 7-12.
# A digit run right after "<digit>." or right before ".<digit>" is part of a decimal number and
# never an ID number. Only digit boundaries count otherwise: "ID110101…" or "号110101…" is caught.
_PROVINCES: Final = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 "
    "61 62 63 64 65 71 81 82 83 91 92 93 94 95 96 97 98".split()
)
_ID_CANDIDATE: Final = re.compile(r"(?<!\d)(?<!\d\.)(?:\d{17}[\dXx]|\d{15})(?!\d)(?!\.\d)")


def _real_date(year: int, month: int, day: int) -> bool:
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


def is_id_number(s: str) -> bool:
    """True when ``s`` (18 or 15 characters, see the rule above ``_ID_CANDIDATE``) is an ID
    number: the test the log masking applies to every candidate it finds."""
    s = unicodedata.normalize("NFKC", s).upper()
    if not (s[:-1].isascii() and s[:-1].isdigit()) or s[:2] not in _PROVINCES:
        return False
    if len(s) == 18:
        if not (s[-1].isdigit() or s[-1] == "X"):
            return False
        if not _real_date(int(s[6:10]), int(s[10:12]), int(s[12:14])):
            return False
        # stdnum wants the check position present and ignores it
        return s[-1] == "X" or ric.calc_check_digit(s) == s[-1]
    if len(s) == 15:
        return s[-1].isdigit() and _real_date(1900 + int(s[6:8]), int(s[8:10]), int(s[10:12]))
    return False


def redact_text(s: str) -> str:
    """Mask every ID number in free text (see :func:`is_id_number`); other numbers stay."""
    if not s:
        return s
    return _ID_CANDIDATE.sub(
        lambda m: mask_id_number(m.group(0)) if is_id_number(m.group(0)) else m.group(0), s
    )


# --- names and addresses in free text --------------------------------------------------------
#
# The program's own log messages are English, so Chinese text in a log line came from the data:
# a file name (``张三 正面.jpg``), a recognised field, a provider's or the database's message
# quoting one. A name or an address cannot be told from other Chinese text, so every run of
# Chinese characters is masked like a name: its first character kept (a surname, a province),
# every other one replaced by ``*``, so ``张三`` becomes ``张*`` and ``北京市东城区某某街道``
# ``北*********``. Known non-personal words inside a run stay readable: the side words that pair
# the two sides of a card (正面, 国徽面, …) and the card's printed labels. A single character
# is kept (at most a surname, a gender or an ethnicity, none of which identifies anyone).
#
# File names are personal in Latin letters too (``zhangsan_front.jpg``): in a token that ends in
# an image or document extension, or in a ``file://`` / ``s3://`` URI, the last component's
# stem has each word of two or more letters masked the same way (side words and the extension
# kept). Directories keep their Latin names (``2026-11/batch3/``) but not their Chinese ones.
# Whole values whose meaning the code knows are masked by their field's masker instead (see
# :class:`PIIFilter`).
_KEPT_WORDS: Final = (
    # side words (the same as pipeline.domain.pairing's)
    "人像面 国徽面 正面 反面 背面 人像 国徽 "
    # the card's printed labels and words about the card
    "中华人民共和国 居民身份证 身份证 公民身份号码 签发机关 有效期限 长期有效 长期 "
    "姓名 性别 民族 出生 住址 复印件 扫描件 照片"
).split()
_LATIN_KEPT: Final = frozenset(
    {"front", "back", "obverse", "reverse", "face", "emblem", "id", "card", "scan", "img"}
)
_HAN: Final = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# A run of Han characters; a middle dot joins the parts of a transliterated name (买买提·艾力).
_HAN_RUN: Final = re.compile(rf"[{_HAN}]+(?:[·•・][{_HAN}]+)*")
_KEPT_IN_RUN: Final = re.compile("|".join(sorted(_KEPT_WORDS, key=len, reverse=True)))
_DOC_EXT: Final = r"jpe?g|png|bmp|pdf|gif|webp|tiff?|heic|heif|avif|txt|csv|json"
# A token starts only where a token can (after a space, a quote, a bracket or the start): tried
# at every character instead, a long unbroken string would take quadratic time.
_FILE_TOKEN: Final = re.compile(
    rf"(?<![^\s\"'<>|(\[])(?:(?:file|s3)://[^\s\"'<>|]*|[^\s\"'<>|(\[]*\.(?:{_DOC_EXT}))"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_FILE_VALUE: Final = re.compile(rf"(?:file|s3)://.*|.*\.(?:{_DOC_EXT})", re.IGNORECASE | re.DOTALL)
_LATIN_WORD: Final = re.compile(r"[A-Za-z]{2,}")


def _mask_word(word: str) -> str:
    return word[:1] + "*" * (len(word) - 1)


def _mask_han_run(m: re.Match[str]) -> str:
    run = m.group(0)
    out, pos = [], 0
    for kept in _KEPT_IN_RUN.finditer(run):
        if kept.start() > pos:
            out.append(_mask_word(run[pos : kept.start()]))
        out.append(kept.group(0))
        pos = kept.end()
    if pos < len(run):
        out.append(_mask_word(run[pos:]))
    return "".join(out)


def _mask_stem_word(m: re.Match[str]) -> str:
    word = m.group(0)
    return word if word.lower() in _LATIN_KEPT else _mask_word(word)


def mask_file_name(path: str) -> str:
    """A file name or URI as it may be logged: the stem of its last component has every Latin
    word masked (side words kept), Chinese runs are masked everywhere, ID numbers too.
    ``scans/张三 正面.jpg`` → ``scans/张* 正面.jpg``, ``p9/zhangsan_front.png`` →
    ``p9/z*******_front.png``."""
    if not path:
        return path
    head, sep, last = path.rpartition("/")
    stem, dot, ext = last.rpartition(".")
    if not dot or not stem:
        stem, dot, ext = last, "", ""
    masked = head + sep + _LATIN_WORD.sub(_mask_stem_word, stem) + dot + ext
    return redact_text(_HAN_RUN.sub(_mask_han_run, masked))


def redact_personal_text(s: str) -> str:
    """What log masking applies to free text: ID numbers (:func:`redact_text`), file names
    (:func:`mask_file_name`), and every run of Chinese characters (see the rule above)."""
    if not s:
        return s
    s = _FILE_TOKEN.sub(lambda m: mask_file_name(m.group(0)), s)
    return redact_text(_HAN_RUN.sub(_mask_han_run, s))


# Keys whose values are known to be personal, and how each is masked; any other string gets
# the free-text masking. Not "name": LogRecord has its own (the logger's), and Celery's task
# messages pass the task's name under it.
_PATH_KEYS: Final = frozenset({"key", "source_key", "path", "file", "uri", "source_uri", "source"})
_EXTRA_MASKERS: Final = {
    "id_number": mask_id_number,
    "domicile": mask_address,
    "address": mask_address,
    "date_of_birth": mask_date_of_birth,
    **{key: mask_file_name for key in _PATH_KEYS},
}
_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _mask_value(key: str | None, value: Any) -> Any:
    if isinstance(value, str):
        masker = _EXTRA_MASKERS.get(key or "")
        if masker is not None:
            return masker(value)
        if _FILE_VALUE.fullmatch(value):
            return mask_file_name(value)
        return redact_personal_text(value)
    if isinstance(value, Mapping):
        return {k: _mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask_value(key, v) for v in value)
    return value


class PIIFilter(logging.Filter):
    """Logging safety net, attached to every handler: masks personal data in the record.

    * ``args``: a string that is a file name or URI is masked as one (the whole of it, spaces
      included: ``张三 正面.jpg``); a mapping's values by their keys (``{"name": …}``).
    * ``extra`` attributes: ``id_number``, ``domicile``/``address``, ``date_of_birth`` by
      their field maskers, ``key``/``source_key``/``path``/``uri`` as file
      names, any other string as free text; numbers, booleans and None pass unchanged.
    * the formatted message, the traceback and the stack: ID numbers, file names and Chinese
      text (:func:`redact_personal_text`). Numbers that are not ID numbers stay intact.

    Args are folded into ``msg`` (always, not only when something matched) so a later formatter
    cannot re-render an unmasked arg, e.g. an object whose str() has a number. Attach it to
    *handlers* (``handler.addFilter(PIIFilter())``): a filter on a logger does not see records
    propagated from its child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in list(record.__dict__.items()):
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                record.__dict__[key] = _mask_value(key, value)
        args = record.args
        if isinstance(args, Mapping):
            record.args = _mask_value(None, args)
        elif isinstance(args, tuple):
            record.args = tuple(
                mask_file_name(a) if isinstance(a, str) and _FILE_VALUE.fullmatch(a) else a
                for a in args
            )
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not leak its args
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact_personal_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            # Formatter.format reuses exc_text when set, so the traceback is rendered here once
            # and the masked text is what every handler prints.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_personal_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_personal_text(record.stack_info)
        return True
