"""Provider-independent checks on recognised ID-card fields.

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
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from stdnum.cn import ric
from stdnum.exceptions import (
    InvalidChecksum,
    InvalidComponent,
    InvalidFormat,
    InvalidLength,
    ValidationError,
)

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
