"""What reaches a log handler: ID numbers, names, addresses and file names masked; every other
number (latencies, timestamps, byte counts, task ids) intact."""

from __future__ import annotations

import datetime
import logging
import re
import uuid

from hypothesis import assume, example, given
from hypothesis import strategies as st
from stdnum.cn import ric

from pipeline.domain.masking import PIIFilter, is_id_number, mask_file_name, mask_id_number, redact_personal_text, redact_text

PROVINCES = ["11", "12", "31", "44", "51", "65", "71", "81", "82"]


@st.composite
def id_numbers(draw: st.DrawFn) -> str:
    """Valid 18-character numbers (check digit computed) and 15-digit first-generation ones."""
    region = draw(st.sampled_from(PROVINCES)) + f"{draw(st.integers(0, 9999)):04d}"
    born = draw(st.dates(datetime.date(1900, 1, 1), datetime.date(2025, 12, 31)))
    seq = f"{draw(st.integers(0, 999)):03d}"
    if draw(st.booleans()):
        first17 = f"{region}{born:%Y%m%d}{seq}"
        number = first17 + ric.calc_check_digit(first17 + "0")
        return number.lower() if draw(st.booleans()) else number
    return f"{region}{born:%y%m%d}{seq}"


def standalone(prefix: str, suffix: str) -> bool:
    # A number glued to more digits, or the fraction / integer part of a decimal, is another
    # number: the rule leaves those alone by design.
    return not (re.search(r"\d\.?$", prefix) or re.match(r"\.?\d", suffix))


@given(id_numbers(), st.text(max_size=40), st.text(max_size=40))
@example("110101199003070011", "身份证号", "。")
@example("110101199003070011", "file:///scans/", ".jpg")
@example("110101900307001", "old=", "")
def test_every_id_number_in_any_text_is_masked(number: str, prefix: str, suffix: str) -> None:
    assume(standalone(prefix, suffix))
    assert is_id_number(number)
    for redact in (redact_text, redact_personal_text):
        out = redact(prefix + number + suffix)
        assert number not in out
        assert number.upper() not in out.upper()


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_untouched(x: float) -> None:
    for text in (f"succeeded in {x}s", f"took {x!r}", f"{x:.15f} s", f"{x:.18f}", f"{x:e}"):
        assert redact_personal_text(text) == text


@given(st.integers())
def test_integers_are_untouched_unless_they_are_id_numbers(n: int) -> None:
    digits = str(abs(n))
    assume(not (len(digits) in (15, 18) and is_id_number(digits)))
    text = f"item {n}: {n} bytes, offset {n:,}"
    assert redact_personal_text(text) == text


@given(st.uuids(), st.datetimes(), st.integers(0, 2**64))
def test_ids_and_timestamps_are_untouched(
    task_id: uuid.UUID, when: datetime.datetime, ns: int
) -> None:
    # a 15- or 18-digit count that has an ID number's shape is masked like one, on purpose
    assume(not is_id_number(str(ns)))
    text = (
        f"Task idocr.ocr.submit[{task_id}] received at {when.isoformat()} "
        f"({when.timestamp() if when.year > 1970 else 0}) {ns} ns {task_id.hex}"
    )
    assert redact_personal_text(text) == text


def test_latency_with_fifteen_decimals_is_not_an_id_number() -> None:
    # Celery's "succeeded in %ss" prints the runtime with every digit of the float.
    text = (
        "Task idocr.ocr.submit[1b4e28ba-2fa1-11d2-883f-0016d3cca427] succeeded in "
        "0.110101900307001s"
    )
    assert redact_personal_text(text) == text
    assert redact_text("3.110101199003070011") == "3.110101199003070011"


def test_what_counts_as_an_id_number() -> None:
    valid = "110101199003070011"
    assert is_id_number(valid)
    assert not is_id_number(valid[:-1] + "2")  # check digit
    assert is_id_number(valid[:-1] + "X")  # X: never a plain number, masked even if misread
    assert not is_id_number("001011990030700" + "11")  # no province 00
    assert not is_id_number("110101199013070011")  # month 13
    assert is_id_number("110101900307001")  # 15 digits, 1990-03-07
    assert not is_id_number("110101903007001")  # 15 digits, month 30
    assert not is_id_number("123456789012345")  # month 90


def test_names_addresses_and_file_names_in_text() -> None:
    text = "item 7 scans/张三 正面.jpg failed: 住址北京市东城区某某街道1号 (欧阳娜娜, 男)"
    out = redact_personal_text(text)
    for secret in ("张三", "北京市东城区", "某某街道", "欧阳娜娜", "娜娜"):
        assert secret not in out
    assert out == "item 7 scans/张* 正面.jpg failed: 住址北*********1号 (欧***, 男)"
    assert redact_personal_text(out) == out  # masking twice changes nothing


def test_file_names_keep_side_words_and_folders() -> None:
    assert mask_file_name("2026-11/p9/zhangsan_front.png") == "2026-11/p9/z*******_front.png"
    assert mask_file_name("scans/张三 正面.jpg") == "scans/张* 正面.jpg"
    assert mask_file_name("s3://bucket/王五/IMG_0001.JPG") == "s3://bucket/王*/IMG_0001.JPG"
    assert mask_file_name("110101199003070011.jpg") == "110101********0011.jpg"
    out = redact_personal_text("read file:///data/in/lisi_back.bmp: ok")
    assert out == "read file:///data/in/l***_back.bmp: ok"


def capture(name: str, fmt: str = "%(message)s") -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = ListHandler()
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(PIIFilter())
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, lines


def test_filter_masks_file_name_arguments_whole() -> None:
    log, lines = capture("idocr.test.mask.args")
    log.info("item %d: %s rejected", 7, "zhang san front.jpg")
    log.info("item %d: %s", 8, "scans/张三 正面.jpg")
    assert lines == ["item 7: z**** s** front.jpg rejected", "item 8: scans/张* 正面.jpg"]


def test_filter_masks_extra_fields_by_their_meaning() -> None:
    log, lines = capture(
        "idocr.test.mask.extra", "%(message)s|%(source_key)s|%(domicile)s|%(id_number)s|%(n)s"
    )
    log.warning(
        "write failed",
        extra={
            "source_key": "p1/李四 反面.png",
            "domicile": "北京市东城区某某街道1号",
            "id_number": "110101199003070011",
            "n": 123456789012345678,
        },
    )
    assert lines == [
        "write failed|p1/李* 反面.png|北京市东城区***|110101********0011|123456789012345678"
    ]


def test_filter_keeps_celery_task_lines_readable() -> None:
    log, lines = capture("idocr.test.mask.celery")
    log.info(
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
        {
            "name": "idocr.ocr.submit",
            "id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "runtime": 0.123456789012345,
            "return_value": "succeeded",
        },
    )
    assert lines == [
        "Task idocr.ocr.submit[1b4e28ba-2fa1-11d2-883f-0016d3cca427] succeeded in "
        "0.123456789012345s: succeeded"
    ]


def test_filter_masks_database_errors_in_tracebacks() -> None:
    log, lines = capture("idocr.test.mask.exc")
    try:
        raise RuntimeError(
            'duplicate key value violates unique constraint "uq_items"\n'
            "DETAIL:  Key (source_key)=(张三 正面.jpg) already exists; "
            "failing row contains (赵六, 女, 汉, 1990-03-07, 上海市浦东新区某路1号, 110101199003070011)"
        )
    except RuntimeError:
        log.exception("result write failed for item %d", 42)
    (line,) = lines
    assert "result write failed for item 42" in line and "Traceback" in line
    for secret in ("张三", "赵六", "浦东新区", "110101199003070011"):
        assert secret not in line
    assert mask_id_number("110101199003070011") in line


def test_long_unbroken_strings_take_linear_time() -> None:
    # A base64 blob or a long run of digits in a message: each pattern must be tried at token
    # starts only. Quadratic matching took 13 s on 20 KB of "a." here, so 200 KB would take
    # over twenty minutes; linear takes milliseconds.
    import time

    for text in ("a." * 100_000, "1" * 200_000, "张" * 200_000, "ab/" * 70_000):
        started = time.monotonic()
        redact_personal_text(text)
        assert time.monotonic() - started < 20
