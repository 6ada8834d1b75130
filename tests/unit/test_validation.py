"""Unit tests for pipeline.domain.checks: field checks, period rules, parsing and PII masking."""

from __future__ import annotations

import datetime
import logging

import pytest
from stdnum.cn import ric

from pipeline.domain.checks import LONG_TERM, check_fields, check_pair, parse_date, parse_valid_period
from pipeline.domain.masking import PIIFilter, mask_address, mask_fields, mask_id_number, mask_name, redact_text

TODAY = datetime.date(2025, 6, 1)


def make_id(first17: str) -> str:
    """A number with a correct check digit (stdnum wants the check position present)."""
    assert len(first17) == 17
    return first17 + ric.calc_check_digit(first17 + "0")


def with_wrong_check_digit(number: str) -> str:
    wrong = next(c for c in "0123456789X" if c != number[-1])
    return number[:-1] + wrong


# 110101 = 北京市东城区; sequence 001 (odd → male) and 002 (even → female).
MALE = make_id("11010119900307001")
FEMALE = make_id("11010119900307002")
STDNUM_DOC_EXAMPLE = "360426199101010071"  # from stdnum.cn.ric's own docstring


def _ids_ending_in_x() -> str:
    for seq in range(1, 1000):
        n = make_id(f"11010119850615{seq:03d}")
        if n.endswith("X"):
            return n
    raise AssertionError("no X check digit found")


WITH_X = _ids_ending_in_x()


def front(number: str | None = MALE, **kw: str) -> dict[str, str]:
    fields = {
        "name": "张三",
        "gender": "男",
        "date_of_birth": "1990-03-07",
        "domicile": "北京市东城区某街道1号",
    }
    if number is not None:
        fields["id_number"] = number
    fields.update(kw)
    return fields


def all_details(checks: dict[str, dict]) -> str:
    return " | ".join(c["detail"] for c in checks.values())


# --------------------------------------------------------------------------------------------
# id number: valid numbers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "gender", "dob"),
    [
        (MALE, "男", "1990-03-07"),
        (FEMALE, "女", "1990-03-07"),
        (STDNUM_DOC_EXAMPLE, "男", "1991-01-01"),
        (WITH_X, "男" if int(WITH_X[16]) % 2 else "女", "1985-06-15"),
        (WITH_X.lower(), "男" if int(WITH_X[16]) % 2 else "女", "1985-06-15"),  # lower-case x
    ],
)
def test_valid_numbers_pass_every_front_check(number: str, gender: str, dob: str) -> None:
    checks = check_fields("front", front(number, gender=gender, date_of_birth=dob), today=TODAY)
    assert {k: c["ok"] for k, c in checks.items()} == {
        "id_number_format": True,
        "id_number_checksum": True,
        "id_number_birth_date": True,
        "birth_date_matches": True,
        "gender_matches": True,
        "region_known": True,
    }
    assert checks["region_known"]["level"] == "warning"
    assert checks["id_number_checksum"]["level"] == "error"


def test_x_check_digit_exists_and_is_valid() -> None:
    assert WITH_X.endswith("X")
    assert ric.is_valid(WITH_X)


def test_inner_spaces_from_ocr_are_tolerated() -> None:
    spaced = f"{MALE[:6]} {MALE[6:14]} {MALE[14:]}"
    checks = check_fields("front", front(spaced), today=TODAY)
    assert checks["id_number_format"]["ok"] is True
    assert checks["id_number_checksum"]["ok"] is True


def test_region_detail_names_the_place() -> None:
    checks = check_fields("front", front(), today=TODAY)
    assert "东城区" in checks["region_known"]["detail"]


# --------------------------------------------------------------------------------------------
# id number: each failure kind
# --------------------------------------------------------------------------------------------


def test_checksum_error_is_separate_from_format() -> None:
    bad = with_wrong_check_digit(MALE)
    checks = check_fields("front", front(bad), today=TODAY)
    assert checks["id_number_format"]["ok"] is True
    assert checks["id_number_checksum"]["ok"] is False
    assert checks["id_number_checksum"]["level"] == "error"
    assert f"expected {MALE[-1]}" in checks["id_number_checksum"]["detail"]
    # The digits are still informative: date, gender and region are checked anyway.
    assert checks["birth_date_matches"]["ok"] is True
    assert checks["gender_matches"]["ok"] is True


@pytest.mark.parametrize(
    ("number", "needle"),
    [
        (MALE[:-1], "length 17"),
        (MALE + "1", "length 19"),
        ("110101900307001", "15-digit"),  # first-generation number
        (MALE[:5] + "O" + MALE[6:], "non-digit"),  # letter O read for a zero
        (MALE[:-1] + "A", "last character"),  # stdnum alone calls this a checksum error
    ],
)
def test_format_errors(number: str, needle: str) -> None:
    checks = check_fields("front", front(number), today=TODAY)
    assert checks["id_number_format"]["ok"] is False
    assert needle in checks["id_number_format"]["detail"]
    # Nothing sound to check further: not applicable, not failed.
    for key in ("id_number_checksum", "birth_date_matches", "gender_matches", "region_known"):
        assert checks[key]["ok"] is None, key


def test_impossible_embedded_date() -> None:
    number = make_id("11010119900230001")  # Feb 30
    checks = check_fields("front", front(number), today=TODAY)
    assert checks["id_number_checksum"]["ok"] is True
    assert checks["id_number_birth_date"]["ok"] is False
    assert checks["birth_date_matches"]["ok"] is None
    assert checks["region_known"]["ok"] is None


def test_future_embedded_date_is_an_error() -> None:
    # stdnum accepts it; we do not.
    number = make_id("11010120300101001")
    assert ric.is_valid(number)
    checks = check_fields("front", front(number, date_of_birth="2030-01-01"), today=TODAY)
    assert checks["id_number_birth_date"]["ok"] is False
    assert "future" in checks["id_number_birth_date"]["detail"]


def test_birth_date_mismatch() -> None:
    checks = check_fields("front", front(date_of_birth="1990年3月8日"), today=TODAY)
    assert checks["birth_date_matches"]["ok"] is False
    assert checks["birth_date_matches"]["level"] == "error"
    assert "1990" not in checks["birth_date_matches"]["detail"]  # no birth dates in details


def test_birth_date_printed_form_matches() -> None:
    checks = check_fields("front", front(date_of_birth="1990年3月7日"), today=TODAY)
    assert checks["birth_date_matches"]["ok"] is True


def test_birth_date_field_unparseable() -> None:
    checks = check_fields("front", front(date_of_birth="1990年13月7日"), today=TODAY)
    assert checks["birth_date_matches"]["ok"] is False


@pytest.mark.parametrize(("number", "gender"), [(MALE, "女"), (FEMALE, "男")])
def test_gender_mismatch(number: str, gender: str) -> None:
    checks = check_fields("front", front(number, gender=gender), today=TODAY)
    assert checks["gender_matches"]["ok"] is False
    assert checks["gender_matches"]["level"] == "error"


def test_gender_unrecognised_value() -> None:
    checks = check_fields("front", front(gender="舅"), today=TODAY)
    assert checks["gender_matches"]["ok"] is False


def test_unknown_region_is_only_a_warning() -> None:
    number = make_id("99010119900307001")
    checks = check_fields("front", front(number), today=TODAY)
    assert checks["id_number_checksum"]["ok"] is True
    assert checks["region_known"] == {
        "ok": False,
        "level": "warning",
        "detail": "region code 990101 unknown for birth year 1990",
    }


def test_partial_region_does_not_crash() -> None:
    # Province 11 exists, county 0199 does not: stdnum 2.2 raises a bare KeyError here, even
    # from is_valid().
    number = make_id("11019919900307001")
    with pytest.raises(KeyError):
        ric.is_valid(number)
    checks = check_fields("front", front(number), today=TODAY)
    assert checks["id_number_checksum"]["ok"] is True
    assert checks["region_known"]["ok"] is False
    assert checks["region_known"]["level"] == "warning"


def test_region_code_not_yet_in_use_for_birth_year() -> None:
    # 110118 (密云区) exists only from 2015 on in stdnum's table.
    number = make_id("11011819900307001")
    checks = check_fields("front", front(number), today=TODAY)
    assert checks["region_known"]["ok"] is False


def test_missing_fields_are_not_applicable() -> None:
    checks = check_fields("front", {"name": "张三"}, today=TODAY)
    assert checks and all(c["ok"] is None and c["detail"] == "missing" for c in checks.values())
    checks = check_fields("front", front(gender="", date_of_birth="  "), today=TODAY)
    assert checks["gender_matches"] == {"ok": None, "level": "error", "detail": "missing"}
    assert checks["birth_date_matches"]["detail"] == "missing"


@pytest.mark.parametrize(
    "number",
    [
        MALE,
        with_wrong_check_digit(MALE),
        make_id("99010119900307001"),
        make_id("11010119900230001"),
        MALE[:-1] + "A",
        MALE + "1",
    ],
)
def test_details_never_contain_the_number(number: str) -> None:
    checks = check_fields("front", front(number, gender="女"), today=TODAY)
    details = all_details(checks)
    assert number not in details
    assert number[:17] not in details
    assert number[6:14] not in details  # nor the embedded birth date


def test_unknown_side_is_rejected_and_none_infers() -> None:
    with pytest.raises(ValueError):
        check_fields("left", front(), today=TODAY)
    inferred = check_fields(
        None, {**front(), "valid_from": "2010-01-01", "valid_to": "2030-01-01"}, today=TODAY
    )
    assert "id_number_checksum" in inferred and "valid_period_rule" in inferred


# --------------------------------------------------------------------------------------------
# back side: the validity-period rule and expiry
# --------------------------------------------------------------------------------------------


def back(valid_from: str | None, valid_to: str | None) -> dict[str, str]:
    out = {"issue_authority": "北京市公安局东城分局"}
    if valid_from is not None:
        out["valid_from"] = valid_from
    if valid_to is not None:
        out["valid_to"] = valid_to
    return out


@pytest.mark.parametrize(
    ("valid_from", "valid_to", "detail"),
    [
        ("2005-10-08", "2010-10-08", "5 years"),
        ("2005-10-08", "2015-10-08", "10 years"),
        ("2005-10-08", "2025-10-08", "20 years"),
        ("2005-10-08", LONG_TERM, LONG_TERM),
        ("2005-10-08", "长期有效", LONG_TERM),
        ("2005.10.08", "2025.10.08", "20 years"),  # tolerant of unnormalised input
    ],
)
def test_legal_periods(valid_from: str, valid_to: str, detail: str) -> None:
    check = check_fields("back", back(valid_from, valid_to), today=TODAY)["valid_period_rule"]
    assert check == {"ok": True, "level": "error", "detail": detail}


@pytest.mark.parametrize(
    ("valid_from", "valid_to"),
    [
        ("2005-10-08", "2025-10-07"),  # a day short
        ("2005-10-08", "2025-10-09"),  # a day long
        ("2005-10-08", "2020-10-08"),  # 15 years
        ("2005-10-08", "2035-10-08"),  # 30 years
        ("2005-10-08", "2005-10-08"),
        ("2025-10-08", "2005-10-08"),  # reversed
    ],
)
def test_illegal_periods(valid_from: str, valid_to: str) -> None:
    check = check_fields("back", back(valid_from, valid_to), today=TODAY)["valid_period_rule"]
    assert check["ok"] is False
    assert check["level"] == "error"


@pytest.mark.parametrize("valid_to", ["2018-02-28", "2018-03-01"])
def test_feb_29_issue_ten_years_ends_feb_28_or_mar_1(valid_to: str) -> None:
    check = check_fields("back", back("2008-02-29", valid_to), today=TODAY)["valid_period_rule"]
    assert check["ok"] is True
    assert check["detail"] == "10 years"


def test_feb_29_issue_into_a_leap_year_keeps_feb_29() -> None:
    ok = check_fields("back", back("2004-02-29", "2024-02-29"), today=TODAY)["valid_period_rule"]
    assert ok["ok"] is True
    # Mar 2 is neither side of the missing day.
    bad = check_fields("back", back("2008-02-29", "2018-03-02"), today=TODAY)["valid_period_rule"]
    assert bad["ok"] is False


def test_period_missing_and_unparseable() -> None:
    assert check_fields("back", back(None, "2025-10-08"), today=TODAY)["valid_period_rule"] == {
        "ok": None,
        "level": "error",
        "detail": "missing",
    }
    assert (
        check_fields("back", back("2005-10-08", None), today=TODAY)["valid_period_rule"]["ok"]
        is None
    )
    assert (
        check_fields("back", back("2005-13-08", "2025-10-08"), today=TODAY)["valid_period_rule"][
            "ok"
        ]
        is False
    )
    assert (
        check_fields("back", back("2005-10-08", "永久"), today=TODAY)["valid_period_rule"]["ok"]
        is False
    )


def test_card_expired() -> None:
    checks = check_fields("back", back("2005-10-08", "2025-05-31"), today=TODAY)
    # (not a legal period, but expiry is judged independently)
    assert checks["card_expired"] == {
        "ok": False,
        "level": "warning",
        "detail": "card expired on 2025-05-31",
    }


def test_card_valid_on_its_last_day_and_long_term_never_expires() -> None:
    assert (
        check_fields("back", back("2005-06-01", "2025-06-01"), today=TODAY)["card_expired"]["ok"]
        is True
    )
    long_term = check_fields("back", back("1990-01-01", LONG_TERM), today=datetime.date(2999, 1, 1))
    assert long_term["card_expired"]["ok"] is True
    assert check_fields("back", back("2005-06-01", None), today=TODAY)["card_expired"]["ok"] is None


# --------------------------------------------------------------------------------------------
# check_pair: period against the age at issue
# --------------------------------------------------------------------------------------------

# Born 1990-03-07 (MALE).


@pytest.mark.parametrize(
    ("valid_from", "valid_to", "ok"),
    [
        ("2005-10-08", "2010-10-08", True),  # age 15 → 5 years
        ("2005-10-08", "2015-10-08", False),
        ("2006-03-06", "2011-03-06", True),  # the day before the 16th birthday: still 5
        ("2006-03-07", "2016-03-07", True),  # 16th birthday → 10 years
        ("2006-03-07", "2011-03-07", False),
        ("2015-10-08", "2025-10-08", True),  # age 25 → 10
        ("2016-03-07", "2036-03-07", True),  # 26 → 20
        ("2016-03-07", "2026-03-07", False),
        ("2035-10-08", "2055-10-08", True),  # 45 → 20
        ("2036-03-07", LONG_TERM, True),  # 46 → 长期
        ("2036-03-06", LONG_TERM, False),  # 45 the day before
        ("2015-10-08", LONG_TERM, False),
    ],
)
def test_check_pair_by_age(valid_from: str, valid_to: str, ok: bool) -> None:
    result = check_pair(front(), back(valid_from, valid_to))["valid_period_matches_age"]
    assert result["ok"] is ok
    assert result["level"] == "error"


def test_check_pair_detail() -> None:
    result = check_pair(front(), back("2016-03-07", "2026-03-07"))["valid_period_matches_age"]
    assert result["detail"] == "age 26 at issue requires 20 years, card has 10 years"


def test_check_pair_uses_date_of_birth_when_number_missing_or_bad() -> None:
    fields = front(None, date_of_birth="1990年3月7日")
    assert (
        check_pair(fields, back("2005-10-08", "2010-10-08"))["valid_period_matches_age"]["ok"]
        is True
    )
    fields = front(with_wrong_check_digit(MALE), date_of_birth="1970-01-01")
    # number untrusted → the field (age 35) decides: 20 years
    assert (
        check_pair(fields, back("2005-10-08", "2025-10-08"))["valid_period_matches_age"]["ok"]
        is True
    )


def test_check_pair_grace_days_for_application_before_birthday() -> None:
    # Applied at 15, issued a month after the 16th birthday with a 5-year card.
    strict = check_pair(front(), back("2006-04-07", "2011-04-07"))["valid_period_matches_age"]
    assert strict["ok"] is False
    lenient = check_pair(front(), back("2006-04-07", "2011-04-07"), grace_days=60)
    assert lenient["valid_period_matches_age"]["ok"] is True


def test_check_pair_not_applicable() -> None:
    key = "valid_period_matches_age"
    assert check_pair({}, back("2005-10-08", "2010-10-08"))[key]["ok"] is None
    assert check_pair(front(), back(None, "2010-10-08"))[key]["ok"] is None
    assert (
        check_pair(front(), back("2005-10-08", "2017-10-08"))[key]["ok"] is None
    )  # illegal length
    assert check_pair(front(), back("1980-10-08", "1990-10-08"))[key]["ok"] is False  # before birth


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1990.03.07", "1990-03-07"),
        ("1990-03-07", "1990-03-07"),
        ("19900307", "1990-03-07"),
        ("1990年03月07日", "1990-03-07"),
        ("1990 年 3 月 7 日", "1990-03-07"),  # as printed on the front
        ("1990年3月7", "1990-03-07"),
        (" 1990 . 03 . 07 ", "1990-03-07"),
        ("１９９０．０３．０７", "1990-03-07"),  # full-width
        ("2000.02.29", "2000-02-29"),
        ("1900.02.29", None),  # not a leap year
        ("1990-02-30", None),
        ("1990.13.01", None),
        ("1990.03-07", None),  # mixed separators
        ("199037", None),
        ("", None),
        ("长期", None),
    ],
)
def test_parse_date(text: str, expected: str | None) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2005.10.08-2025.10.08", ("2005-10-08", "2025-10-08")),
        ("2005.10.08-长期", ("2005-10-08", LONG_TERM)),
        ("2005.10.08-长期有效", ("2005-10-08", LONG_TERM)),
        ("2005.10.08 — 2025.10.08", ("2005-10-08", "2025-10-08")),
        ("2005.10.08–2025.10.08", ("2005-10-08", "2025-10-08")),
        ("2005.10.08至2025.10.08", ("2005-10-08", "2025-10-08")),
        ("2005.10.08 至 长期", ("2005-10-08", LONG_TERM)),
        ("2005-10-08-2025-10-08", ("2005-10-08", "2025-10-08")),  # dash is also the date separator
        ("20051008-20251008", ("2005-10-08", "2025-10-08")),
        ("2005年10月08日-2025年10月08日", ("2005-10-08", "2025-10-08")),
        ("2005.10.08一2025.10.08", ("2005-10-08", "2025-10-08")),  # dash OCR'd as 一
        ("２００５．１０．０８－２０２５．１０．０８", ("2005-10-08", "2025-10-08")),
        ("2005.13.08-2025.10.08", (None, "2025-10-08")),
        ("2005.10.08-2025.02.30", ("2005-10-08", None)),
        ("garbage-2025.10.08", (None, "2025-10-08")),
        ("2005.10.08-garbage", ("2005-10-08", None)),
        ("2005.10.08-", ("2005-10-08", None)),
        ("nonsense", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_valid_period(text: str, expected: tuple[str | None, str | None]) -> None:
    assert parse_valid_period(text) == expected


# --------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------


def test_mask_id_number() -> None:
    assert mask_id_number("11010119900307123X") == "110101********123X"
    assert len(mask_id_number(MALE)) == 18
    assert mask_id_number("110101900307001") == "*************01"  # 15 digits: odd
    assert mask_id_number("12345") == "***45"
    assert mask_id_number("1234") == "****"
    assert mask_id_number("") == ""


def test_mask_name() -> None:
    assert mask_name("张三") == "张*"
    assert mask_name("张三丰") == "张**"
    assert mask_name("欧阳娜娜") == "欧阳**"
    assert mask_name("欧阳") == "欧*"  # never the whole name
    assert mask_name("李") == "*"
    assert mask_name("买买提·艾力") == "买*****"


def test_mask_address() -> None:
    assert mask_address("北京市东城区某某街道1号楼2单元301") == "北京市东城区***"
    assert mask_address("北京市东城区某") == "北京市东城区***"
    assert mask_address("北京市") == "北***"  # short: never the whole of it


def test_mask_fields() -> None:
    fields = {
        "name": "张三",
        "id_number": "11010119900307123X",
        "domicile": "北京市东城区某某街道1号",
        "date_of_birth": "1990-03-07",
        "gender": "男",
        "ethnicity": "汉",
        "valid_to": None,
    }
    masked = mask_fields(fields)
    assert masked == {
        "name": "张*",
        "id_number": "110101********123X",
        "domicile": "北京市东城区***",
        "date_of_birth": "1990-**-**",
        "gender": "男",
        "ethnicity": "汉",
        "valid_to": None,
    }
    assert fields["name"] == "张三"  # the input is not modified


def test_redact_text() -> None:
    text = f"item 7 id={MALE}; old 110101900307001; X form {WITH_X.lower()}; 身份证号{FEMALE}。"
    out = redact_text(text)
    for secret in (MALE, "110101900307001", WITH_X.lower(), FEMALE):
        assert secret not in out
    assert mask_id_number(MALE) in out
    assert "item 7" in out


def test_redact_text_leaves_other_numbers() -> None:
    text = "sha 1234567890123456 ts 1717171717 order 12345678901234567890"
    assert redact_text(text) == text  # 16, 10 and 20 digits are not ID numbers


def _capture_logger(name: str) -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = ListHandler()
    handler.addFilter(PIIFilter())
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, lines


def test_pii_filter_masks_message_and_args() -> None:
    logger, lines = _capture_logger("idocr.test.pii")
    logger.info("recognised %s for item %d", MALE, 42)
    logger.info(f"inline {FEMALE}")
    logger.info("dict %(n)s", {"n": WITH_X})

    class Card:
        def __str__(self) -> str:
            return f"Card({MALE})"

    logger.warning("object %s", Card())
    joined = "\n".join(lines)
    for secret in (MALE, FEMALE, WITH_X):
        assert secret not in joined
    assert f"recognised {mask_id_number(MALE)} for item 42" in lines[0]


def test_pii_filter_masks_tracebacks() -> None:
    logger, lines = _capture_logger("idocr.test.pii.exc")
    try:
        raise ValueError(f"bad number {MALE}")
    except ValueError:
        logger.exception("failed")
    assert lines and "Traceback" in lines[0]
    assert MALE not in lines[0]
    assert mask_id_number(MALE) in lines[0]
