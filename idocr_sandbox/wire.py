"""What both protocols share on the wire: replies, the image a request carries (base64 or
a URL the sandbox fetches), the documented limits, and request helpers."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx

from idocr_sandbox.truth import decode_image

log = logging.getLogger(__name__)


# Bodies above this are refused before reading: ihuyi's documented limit is 8 MB after base64
# and urlencoding, so 32 MB leaves room for every legal request and stops runaway clients.
MAX_BODY = 32 * 1024 * 1024
# An img_url may not stream more than this into the sandbox's memory.
MAX_FETCH = 16 * 1024 * 1024
IHUYI_MAX_ENCODED = (
    8 * 1024 * 1024
)  # seed 000 §1.6, checked only with check_image_limits
MIN_SIDE, MAX_SIDE = 256, 2048  # seed 000 §1.6
FETCH_TIMEOUT = 10.0

_MD5_RE = re.compile(r"[0-9a-fA-F]{32}")
_TIME_RE = re.compile(r"[0-9]{10}")  # not \d: that also matches non-ASCII digits
_ISO_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# ====================================================================== replies


@dataclass(slots=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    codes: dict[str, str] = field(default_factory=dict)  # for stats
    lost: bool = False  # close the connection instead of answering
    delay: bool = True  # apply the configured latency
    record: bool = True  # count in the stats (control answers are not provider answers)


def _json_reply(status: int, obj: Any, codes: dict[str, str] | None = None) -> _Reply:
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return _Reply(status, body, codes=codes or {})


# ====================================================================== image intake


@dataclass(slots=True)
class _Image:
    data: bytes | None
    problem: str | None  # why there is no usable image, worded for the provider's msg


def _decode_base64(text: str) -> _Image:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return _Image(None, "图片base64编码无效")
    if not data:
        return _Image(None, "图片内容为空")
    return _Image(data, None)


def _fetch(url: str) -> _Image:
    # The URL itself is never logged or echoed: presigned S3 URLs carry credentials.
    try:
        # trust_env=False: a proxy from the environment must not intercept local fixture URLs.
        with (
            httpx.Client(
                timeout=FETCH_TIMEOUT, follow_redirects=True, trust_env=False
            ) as c,
            c.stream("GET", url) as r,
        ):
            if r.status_code != 200:
                return _Image(None, f"图片下载失败(HTTP {r.status_code})")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > MAX_FETCH:
                    return _Image(None, "图片下载失败(文件过大)")
        if not buf:
            return _Image(None, "图片下载失败(内容为空)")
        return _Image(bytes(buf), None)
    except Exception as exc:  # noqa: BLE001 -- bad URL, DNS, refused, timeout: all "could not fetch"
        return _Image(None, f"图片下载失败({type(exc).__name__})")


def _limits_problem(data: bytes, encoded_len: int) -> str | None:
    if encoded_len > IHUYI_MAX_ENCODED:
        return "图片文件过大"
    img = decode_image(data)
    if img is None:
        return None  # reported by the truth lookup as undecodable
    w, h = img.size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_SIDE:
        return f"图片尺寸不符({w}x{h},要求{MIN_SIDE}-{MAX_SIDE}像素)"
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return "不支持黑白图片"
    # A colour-mode file with only grey pixels is still a black-and-white scan.
    thumb = img.convert("RGB").resize((32, 32))
    raw = thumb.tobytes()
    if all(
        max(raw[i : i + 3]) - min(raw[i : i + 3]) <= 12 for i in range(0, len(raw), 3)
    ):
        return "不支持黑白图片"
    return None


_MATCH_PROBLEMS = {
    "undecodable": "无法解码的图片",
    "unknown": "未识别到身份证(样本库中无此图片)",
    "ambiguous": "图片无法唯一识别",
}


def _parse_qs(text: str) -> dict[str, str]:
    if not text:
        return {}
    parsed = parse_qs(text, keep_blank_values=True, encoding="utf-8", errors="replace")
    return {k: v[0] for k, v in parsed.items()}  # first value wins on repeats


def _same(a: str, b: str) -> bool:
    # bytes, because compare_digest refuses non-ASCII str and a client may send anything
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
