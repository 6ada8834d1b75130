"""Personal data out of logs and command output: ID numbers (only numbers that are ID
numbers), names, addresses, birth dates and file names masked, in free text and in
structured fields; :class:`PIIFilter` applies it to every log record."""

from __future__ import annotations

import datetime
import logging
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Final

from stdnum.cn import ric

from pipeline.domain.checks import _norm, _parse_date_obj  # the same date reading

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
