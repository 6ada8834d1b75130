"""A local HTTP emulator of both OCR providers, for the demo and the tests.

It speaks ihuyi's protocol (seed 000: ``/ocr/Submit.json``, ``/ocr/GetNum.json``, MD5 dynamic
password, its error codes) and showapi's (seed 003: ``/1429-1?appKey=``, the
``showapi_res_*`` envelope), answers from a :class:`~idocr_sandbox.truth.TruthIndex`, keeps a
paid quota shared by both protocols, and injects faults on a seeded schedule. Everything the
pipeline must get right against the real services — one billed call per image, staying under
the quota, re-signing on a stale time, telling image errors from transient ones — can be
observed here through :class:`SandboxStats`, in-process or over ``/_sandbox/stats``.

Billing model (what a test may rely on):

- a Submit / showapi call that passed authentication, found quota left and got as far as the
  image is billed: success, and also an image the provider could not read (ihuyi 4086, showapi
  ``flag: false``), because the provider did the work;
- authentication failures, parameter errors, 4051/-2, and every injected fault except
  ``lost_after_billing`` are not billed; ``lost_after_billing`` bills, records the ocrid, then
  closes the connection without an answer — the case where the client cannot know.

Nothing here logs image bytes, keys, passwords, query strings or card fields.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx

from pipeline.providers.ihuyi_sign import APP as IHUYI_APP
from pipeline.providers.ihuyi_sign import sign_getnum, sign_submit
from idocr_sandbox.truth import Match, TruthEntry, TruthIndex, decode_image

__all__ = [
    "IHUYI_MESSAGES",
    "SHOWAPI_AUTH",
    "SHOWAPI_QUOTA",
    "SHOWAPI_SYSTEM",
    "BilledCall",
    "FaultPlan",
    "SandboxConfig",
    "SandboxServer",
    "SandboxStats",
    "main",
]

log = logging.getLogger(__name__)

IHUYI_SUBMIT_PATH = "/ocr/Submit.json"
IHUYI_GETNUM_PATH = "/ocr/GetNum.json"
SHOWAPI_PATH = "/1429-1"
CONTROL_PREFIX = "/_sandbox/"

#: seed 000 §2.5 / §3.5, verbatim (including the seed's own spacing variants, normalised).
IHUYI_MESSAGES: dict[int, str] = {
    0: "未知错误",
    1: "提交失败",
    2: "提交成功",
    400: "非法ip访问",
    401: "帐号不能为空",
    402: "密码不能为空",
    403: "应用不存在",
    404: "img_base64或img_url必须传一个",
    405: "API ID或API KEY不正确",
    4050: "账号被冻结",
    40501: "动态密码已过期",
    40502: "动态密码校验失败",
    40505: "没有签定合同",
    4051: "剩余次数不足",
    4052: "访问ip与备案ip不符",
    4086: "图片错误",
    4010: "通道错误",
}

# showapi envelope codes. Seed 003 documents only 0 (success); the others are our choice, made
# to match the taxonomy the pipeline maps them into:
#   -1  authentication / permission (wrong or missing appKey)      → auth: pause, alert
#   -2  quota exhausted ("剩余次数不足")                              → quota: pause, requeue
#   -3  other / system error                                        → transient: retry
SHOWAPI_OK = 0
SHOWAPI_AUTH = -1
SHOWAPI_QUOTA = -2
SHOWAPI_SYSTEM = -3
SHOWAPI_MESSAGES: dict[int, str] = {
    SHOWAPI_AUTH: "appKey错误",
    SHOWAPI_QUOTA: "剩余次数不足",
    SHOWAPI_SYSTEM: "系统繁忙,请稍后重试",
}
# Body ``ret_code`` (inside a 0 envelope): 0 success; -1 the image could not be recognised
# (billed, the image is at fault); -2 a parameter error (not billed, the client is at fault).
SHOWAPI_RET_IMAGE = -1
SHOWAPI_RET_PARAM = -2

# Bodies above this are refused before reading: ihuyi's documented limit is 8 MB after base64
# and urlencoding, so 32 MB leaves room for every legal request and stops runaway clients.
MAX_BODY = 32 * 1024 * 1024
# An img_url may not stream more than this into the sandbox's memory.
MAX_FETCH = 16 * 1024 * 1024
IHUYI_MAX_ENCODED = 8 * 1024 * 1024  # seed 000 §1.6, checked only with check_image_limits
MIN_SIDE, MAX_SIDE = 256, 2048  # seed 000 §1.6
FETCH_TIMEOUT = 10.0

_MD5_RE = re.compile(r"[0-9a-fA-F]{32}")
_TIME_RE = re.compile(r"[0-9]{10}")  # not \d: that also matches non-ASCII digits
_ISO_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# ====================================================================== fault plan


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str  # "timeout" | "http_500" | "garbage" | "code"
    code: int | None = None


def _code_target(key: str) -> tuple[str, int]:
    """``"4010"`` → ihuyi; ``"-2"`` → showapi; ``"ihuyi:1"`` / ``"showapi:-3"`` explicit.

    Unprefixed codes go by sign because the two code spaces do not overlap in practice: ihuyi's
    are non-negative, and showapi's envelope errors are negative by our choice above.
    """
    provider, _, code_s = key.rpartition(":")
    code = int(code_s)
    if not provider:
        provider = "showapi" if code < 0 else "ihuyi"
    if provider not in ("ihuyi", "showapi"):
        raise ValueError(f"fault code {key!r}: provider must be ihuyi or showapi")
    if (provider, code) in (("ihuyi", 2), ("showapi", SHOWAPI_OK)):
        raise ValueError(f"fault code {key!r} is the success code; it cannot be injected")
    return provider, code


@dataclass(slots=True)
class FaultPlan:
    """Per-request fault rates in [0, 1], drawn independently per billable request.

    All kinds are drawn for every request, whatever their rate, so a seeded sandbox produces
    the same fault sequence for the same request sequence. When several fire, the first of
    timeout, http_500, garbage, codes (sorted by key), lost_after_billing wins: a request that
    never reached the provider cannot also have been billed.
    """

    http_500: float = 0.0
    garbage: float = 0.0
    timeout: float = 0.0
    lost_after_billing: float = 0.0
    codes: dict[str, float] = field(default_factory=dict)
    #: longer than any client timeout the pipeline uses, so a "timeout" really times out
    timeout_sleep: float = 30.0

    def __post_init__(self) -> None:
        for name in ("http_500", "garbage", "timeout", "lost_after_billing"):
            _check_rate(name, getattr(self, name))
        for key, rate in self.codes.items():
            _code_target(key)
            _check_rate(f"code:{key}", rate)
        if self.timeout_sleep < 0:
            raise ValueError("timeout_sleep must be >= 0")

    @classmethod
    def parse(cls, text: str | None) -> FaultPlan:
        """``"http_500=0.05,garbage=0.05,code:4010=0.1,lost_after_billing=0.02"``.

        Also ``code:showapi:-2=0.1`` and ``timeout_sleep=5``. Empty or ``none`` is no faults.
        """
        kwargs: dict[str, Any] = {}
        codes: dict[str, float] = {}
        for item in (text or "").split(","):
            item = item.strip()
            if not item or item.lower() == "none":
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"fault plan item {item!r}: expected key=value")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"fault plan item {item!r}: {value!r} is not a number") from None
            if key.startswith("code:"):
                codes[key[len("code:") :]] = number
            elif key in ("http_500", "garbage", "timeout", "lost_after_billing", "timeout_sleep"):
                kwargs[key] = number
            else:
                raise ValueError(f"fault plan item {item!r}: unknown fault {key!r}")
        return cls(codes=codes, **kwargs)

    def __str__(self) -> str:
        parts = [
            f"{name}={getattr(self, name):g}"
            for name in ("http_500", "garbage", "timeout", "lost_after_billing")
            if getattr(self, name)
        ]
        parts += [f"code:{k}={v:g}" for k, v in sorted(self.codes.items()) if v]
        if self.timeout and self.timeout_sleep != 30.0:
            parts.append(f"timeout_sleep={self.timeout_sleep:g}")
        return ",".join(parts) or "none"

    @property
    def active(self) -> bool:
        return any((self.http_500, self.garbage, self.timeout, self.lost_after_billing)) or any(
            self.codes.values()
        )

    def draw(self, rng: random.Random, provider: str) -> tuple[_Fault | None, bool]:
        """(fault answered instead of processing, lost_after_billing) for one request."""
        hit_timeout = rng.random() < self.timeout
        hit_500 = rng.random() < self.http_500
        hit_garbage = rng.random() < self.garbage
        hit_lost = rng.random() < self.lost_after_billing
        code_hit: int | None = None
        for key in sorted(self.codes):
            fired = rng.random() < self.codes[key]
            target, code = _code_target(key)
            if fired and target == provider and code_hit is None:
                code_hit = code
        if hit_timeout:
            return _Fault("timeout"), False
        if hit_500:
            return _Fault("http_500"), False
        if hit_garbage:
            return _Fault("garbage"), False
        if code_hit is not None:
            return _Fault("code", code_hit), False
        return None, hit_lost


def _check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault rate {name}={rate} is outside [0, 1]")


# ====================================================================== config


@dataclass(slots=True)
class SandboxConfig:
    # The keys are the sandbox's own, not secrets, but they stay out of reprs all the same so
    # a habit of printing configs never meets a real key.
    ihuyi_account: str = "sandbox"
    ihuyi_api_key: str = field(default="sandbox-key", repr=False)
    showapi_app_key: str = field(default="sandbox-appkey", repr=False)
    #: billed calls left, shared by both protocols (one paid account behind both)
    quota: int = 10_000
    max_clock_skew: int = 300
    #: seconds slept before every provider answer
    latency: float = 0.0
    faults: FaultPlan = field(default_factory=FaultPlan)
    seed: int | None = None
    #: also enforce seed 000 §1.6 (256–2048 px, ≤ 8 MB encoded, no black-and-white) as 4086 /
    #: showapi image failures; off by default so fixtures of any size work.
    check_image_limits: bool = False

    @classmethod
    def from_env(cls, prefix: str = "IDOCR_SANDBOX_", **overrides: Any) -> SandboxConfig:
        """Read ``{prefix}QUOTA``, ``LATENCY``, ``FAULTS``, ``SEED``, ``MAX_CLOCK_SKEW``,
        ``CHECK_IMAGE_LIMITS``, ``IHUYI_ACCOUNT``, ``IHUYI_API_KEY``, ``SHOWAPI_APP_KEY``."""
        env = os.environ
        kw: dict[str, Any] = {}
        conv: dict[str, Any] = {
            "IHUYI_ACCOUNT": str,
            "IHUYI_API_KEY": str,
            "SHOWAPI_APP_KEY": str,
            "QUOTA": int,
            "MAX_CLOCK_SKEW": int,
            "LATENCY": float,
            "SEED": int,
            "FAULTS": FaultPlan.parse,
            "CHECK_IMAGE_LIMITS": lambda v: v.strip().lower() in ("1", "true", "yes", "on"),
        }
        for name, fn in conv.items():
            raw = env.get(prefix + name)
            if raw is not None and raw != "":
                kw[name.lower()] = fn(raw)
        kw.update(overrides)
        return cls(**kw)


# ====================================================================== stats


@dataclass(frozen=True, slots=True)
class BilledCall:
    at: float
    provider: str
    ocrid: str
    sha256: str | None  # None when no image bytes were obtained (bad base64, failed fetch)
    code: str  # what was (or would have been) answered
    lost: bool = False


class SandboxStats:
    """Thread-safe counters. Every read returns a copy."""

    # Per-second counters are for rate checks over a run, not history: a day is plenty.
    _KEEP_SECONDS = 86_400
    # The per-call log is for inspection; a long demo must not grow it without bound.
    _KEEP_CALLS = 100_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._init()

    def _init(self) -> None:
        self._requests = 0
        self._control = 0
        self._by_endpoint: Counter[str] = Counter()
        self._billed = 0
        self._billed_by_sha: Counter[str] = Counter()
        self._billed_unhashed = 0
        self._per_second: Counter[int] = Counter()
        self._submits_per_second: Counter[int] = Counter()
        self._codes: dict[str, Counter[str]] = {}
        self._http: Counter[int] = Counter()
        self._faults: Counter[str] = Counter()
        self._lost: list[str] = []
        self._calls: deque[BilledCall] = deque(maxlen=self._KEEP_CALLS)

    def reset(self) -> None:
        with self._lock:
            self._init()

    # ---- recording (server side)

    def _record_request(self, endpoint: str, now: float) -> None:
        with self._lock:
            if endpoint == "control":
                self._control += 1
                return
            self._requests += 1
            self._by_endpoint[endpoint] += 1
            sec = int(now)
            self._per_second[sec] += 1
            if endpoint in ("ihuyi.submit", "showapi.ocr"):
                self._submits_per_second[sec] += 1
            if len(self._per_second) > self._KEEP_SECONDS + 3600:
                cutoff = sec - self._KEEP_SECONDS
                for c in (self._per_second, self._submits_per_second):
                    for k in [k for k in c if k < cutoff]:
                        del c[k]

    def _record_answer(self, status: int, codes: dict[str, str]) -> None:
        with self._lock:
            self._http[status] += 1
            for family, code in codes.items():
                self._codes.setdefault(family, Counter())[code] += 1

    def _record_fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    def _record_billed(self, call: BilledCall) -> None:
        with self._lock:
            self._billed += 1
            if call.sha256 is None:
                self._billed_unhashed += 1
            else:
                self._billed_by_sha[call.sha256] += 1
            if call.lost:
                self._lost.append(call.ocrid)
            self._calls.append(call)

    # ---- reading

    @property
    def requests(self) -> int:
        """Provider-protocol requests (control endpoints excluded)."""
        with self._lock:
            return self._requests

    total = requests

    @property
    def control_requests(self) -> int:
        with self._lock:
            return self._control

    @property
    def by_endpoint(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_endpoint)

    @property
    def billed(self) -> int:
        with self._lock:
            return self._billed

    @property
    def billed_by_sha(self) -> dict[str, int]:
        with self._lock:
            return dict(self._billed_by_sha)

    @property
    def billed_unhashed(self) -> int:
        with self._lock:
            return self._billed_unhashed

    def billed_twice(self) -> dict[str, int]:
        """Images billed more than once: what "exactly one billed call per image" forbids."""
        with self._lock:
            return {k: v for k, v in self._billed_by_sha.items() if v > 1}

    @property
    def requests_per_second(self) -> dict[int, int]:
        with self._lock:
            return dict(self._per_second)

    @property
    def submits_per_second(self) -> dict[int, int]:
        """OCR calls (ihuyi Submit, showapi 1429-1) per whole Unix second."""
        with self._lock:
            return dict(self._submits_per_second)

    @property
    def codes(self) -> dict[str, dict[str, int]]:
        """Answered codes per family: ``ihuyi``, ``showapi`` (envelope), ``showapi.ret_code``."""
        with self._lock:
            return {k: dict(v) for k, v in self._codes.items()}

    @property
    def http_status(self) -> dict[int, int]:
        with self._lock:
            return dict(self._http)

    @property
    def faults(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def lost_ocrids(self) -> list[str]:
        with self._lock:
            return list(self._lost)

    def calls(self) -> list[BilledCall]:
        with self._lock:
            return list(self._calls)

    def snapshot(self, include_calls: bool = False) -> dict[str, Any]:
        """JSON-ready; integer keys become strings as JSON requires."""
        with self._lock:
            snap: dict[str, Any] = {
                "requests": self._requests,
                "control_requests": self._control,
                "by_endpoint": dict(self._by_endpoint),
                "billed": self._billed,
                "billed_by_sha": dict(self._billed_by_sha),
                "billed_unhashed": self._billed_unhashed,
                "requests_per_second": {str(k): v for k, v in sorted(self._per_second.items())},
                "submits_per_second": {
                    str(k): v for k, v in sorted(self._submits_per_second.items())
                },
                "codes": {k: dict(v) for k, v in self._codes.items()},
                "http_status": {str(k): v for k, v in self._http.items()},
                "faults": dict(self._faults),
                "lost_ocrids": list(self._lost),
            }
            if include_calls:
                snap["calls"] = [
                    {
                        "at": c.at,
                        "provider": c.provider,
                        "ocrid": c.ocrid,
                        "sha256": c.sha256,
                        "code": c.code,
                        "lost": c.lost,
                    }
                    for c in self._calls
                ]
            return snap


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


def _ihuyi_error(code: int, msg: str | None = None) -> _Reply:
    msg = msg or IHUYI_MESSAGES.get(code, "注入的错误")
    return _json_reply(
        200, {"code": code, "msg": msg, "ocrid": "0", "content": {}}, {"ihuyi": str(code)}
    )


def _getnum_error(code: int) -> _Reply:
    return _json_reply(
        200,
        {"code": code, "msg": IHUYI_MESSAGES.get(code, "注入的错误"), "num": 0},
        {"ihuyi": str(code)},
    )


def _showapi_envelope(code: int, error: str, body: dict[str, Any]) -> _Reply:
    env = {
        "showapi_res_code": code,
        "showapi_res_error": error,
        "showapi_res_id": uuid.uuid4().hex,
        "showapi_res_body": body,
    }
    codes = {"showapi": str(code)}
    if "ret_code" in body:
        codes["showapi.ret_code"] = str(body["ret_code"])
    return _json_reply(200, env, codes)


def _showapi_error(code: int) -> _Reply:
    return _showapi_envelope(code, SHOWAPI_MESSAGES.get(code, "注入的错误"), {})


def _showapi_failure(ret_code: int, msg: str) -> _Reply:
    return _showapi_envelope(SHOWAPI_OK, "", {"ret_code": ret_code, "flag": False, "msg": msg})


def _dots(iso: str) -> str:
    """YYYY-MM-DD → YYYY.MM.DD (ihuyi's date form); anything else passes through unchanged."""
    return iso.replace("-", ".") if _ISO_DATE_RE.fullmatch(iso) else iso


def _ihuyi_content(entry: TruthEntry) -> dict[str, Any]:
    f = entry.fields
    if entry.side == "front":
        return {
            "code": 2,
            "type": "front",
            "name": f.get("name", ""),
            "id_number": f.get("id_number", ""),
            "gender": f.get("gender", ""),
            "ethnicity": f.get("ethnicity", ""),
            # seed 000 spells it data_of_birth; the spec wins over the obvious fix
            "data_of_birth": _dots(f.get("date_of_birth", "")),
            "domicile": f.get("domicile", ""),
        }
    valid_to = f.get("valid_to", "")
    return {
        "code": 2,
        "type": "back",
        "issue_authority": f.get("issue_authority", ""),
        "valid_period": f"{_dots(f.get('valid_from', ''))}-"
        + ("长期" if valid_to == "长期" else _dots(valid_to)),
    }


def _showapi_body(entry: TruthEntry, need_quality: bool) -> dict[str, Any]:
    f = entry.fields
    body: dict[str, Any] = {"ret_code": 0, "flag": True, "msg": "识别成功!"}
    if entry.side == "front":
        body.update(
            name=f.get("name", ""),
            sex=f.get("gender", ""),
            nationality=f.get("ethnicity", ""),
            birthday=f.get("date_of_birth", ""),
            addr=f.get("domicile", ""),
            idNo=f.get("id_number", ""),
        )
    else:
        valid_to = f.get("valid_to", "")
        body.update(
            depInfo=f.get("issue_authority", ""),
            effDate=f.get("valid_from", ""),
            effBeginDate=f.get("valid_from", ""),
            effEndDate="长期有效" if valid_to == "长期" else valid_to,
        )
    if need_quality:
        body["quality"] = list(entry.quality)
    return body


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
            httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=True, trust_env=False) as c,
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
    if all(max(raw[i : i + 3]) - min(raw[i : i + 3]) <= 12 for i in range(0, len(raw), 3)):
        return "不支持黑白图片"
    return None


_MATCH_PROBLEMS = {
    "undecodable": "无法解码的图片",
    "unknown": "未识别到身份证(样本库中无此图片)",
    "ambiguous": "图片无法唯一识别",
}


# ====================================================================== HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 resets connections when a pool of workers bursts at once.
    request_queue_size = 256
    sandbox: SandboxServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real services behind their CDNs
    server_version = "idocr-sandbox/1"
    sys_version = ""
    # Idle keep-alive connections and stalled uploads must not pin a thread forever.
    timeout = 120
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK adds
    # ~40 ms to every keep-alive answer, which would cap a rate test at ~25 calls/s/connection.
    disable_nagle_algorithm = True
    server: _HTTPServer

    # ---- logging: never the request line (GET carries password and img_base64 in the query)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = urlsplit(getattr(self, "path", "") or "").path.partition("&")[0]
        log.debug("%s %s -> %s", getattr(self, "command", "-"), path, code)

    def log_error(self, format: str, *args: Any) -> None:
        # The stdlib passes the raw request line in some of these messages; keep only the code.
        code = args[0] if args and isinstance(args[0], int) else "-"
        log.debug("http error %s", code)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON instead of the stdlib's HTML page, and the connection closed after it."""
        self.log_error("code %d", code)
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = json.dumps({"error": phrase, "status": code}).encode("utf-8")
        self.close_connection = True
        self.server.sandbox.stats._record_answer(code, {})
        if getattr(self, "request_version", "") == "HTTP/0.9":
            # The stdlib assumes 0.9 for an unparseable request line and would then send no
            # status line at all; nobody speaks 0.9 to an OCR API, so answer with a real status.
            self.request_version = "HTTP/1.0"
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    # ---- entry points

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        sandbox = self.server.sandbox
        try:
            reply = self._route(sandbox)
        except Exception as exc:
            # Odd input must never take the server down or leave the client hanging.
            log.error("sandbox handler failed: %s", type(exc).__name__)
            log.debug("sandbox handler traceback", exc_info=True)
            reply = _json_reply(500, {"error": "sandbox internal error"})
            self.close_connection = True
        if reply is None:
            return
        if (
            reply.delay
            and sandbox.config.latency > 0
            and sandbox._stopping.wait(sandbox.config.latency)
        ):
            reply.lost = True  # shutting down: drop rather than answer late
        if reply.lost:
            self._drop_connection()
            return
        self._write(reply)

    def _write(self, reply: _Reply) -> None:
        # Counted before the write: a client that reads the stats right after its answer must
        # find that answer in them.
        if reply.record:
            self.server.sandbox.stats._record_answer(reply.status, reply.codes)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True  # client went away; nothing to answer to

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- request parsing

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering an error (and closing)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            n = int(raw)
        except ValueError:
            self.send_error(400)
            return None
        if n < 0:
            self.send_error(400)
            return None
        if n > MAX_BODY:
            self.send_error(413)
            return None
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            return None
        return data

    def _read_chunked(self) -> bytes | None:
        buf = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.send_error(400)
                return None
            if size == 0:
                # trailers, up to the blank line
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(buf)
            if len(buf) + size > MAX_BODY:
                self.send_error(413)
                return None
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                self.close_connection = True
                return None
            buf += chunk
            self.rfile.readline(8)  # the CRLF after each chunk

    def _body_params(self, body: bytes) -> dict[str, str]:
        if not body:
            return {}
        ctype = self.headers.get("Content-Type", "")
        main_type = ctype.split(";", 1)[0].strip().lower()
        if main_type == "multipart/form-data":
            msg = BytesParser(policy=HTTP_POLICY).parsebytes(
                b"Content-Type: " + ctype.encode("latin-1", "replace") + b"\r\n\r\n" + body
            )
            out: dict[str, str] = {}
            if msg.is_multipart():
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if isinstance(name, str) and name not in out:
                        payload = part.get_payload(decode=True)
                        if isinstance(payload, bytes):
                            out[name] = payload.decode("utf-8", "replace")
            return out
        # Form encoding is the documented one; a missing Content-Type is read the same way.
        return _parse_qs(body.decode("utf-8", "replace"))

    # ---- routing

    def _route(self, sandbox: SandboxServer) -> _Reply | None:
        parts = urlsplit(self.path)
        path, query = parts.path, parts.query
        if not query and path.startswith("/ocr/") and "&" in path:
            # Seed 000's GET examples write "Submit.json&account=…" with no "?": accept it.
            path, _, query = path.partition("&")
        now = time.time()
        endpoint = {
            IHUYI_SUBMIT_PATH: "ihuyi.submit",
            IHUYI_GETNUM_PATH: "ihuyi.getnum",
            SHOWAPI_PATH: "showapi.ocr",
        }.get(path, "control" if path.startswith(CONTROL_PREFIX) else "unknown")
        sandbox.stats._record_request(endpoint, now)
        body = self._read_body()
        if body is None:
            return None
        if endpoint == "control":
            return sandbox._control(self.command, path, query, body)
        if endpoint == "unknown":
            return _json_reply(404, {"error": "unknown path", "path": path[:200]}, {"http": "404"})
        params = _parse_qs(query)
        params.update(self._body_params(body))  # body wins, like PHP's $_REQUEST
        if endpoint == "ihuyi.submit":
            return sandbox._ihuyi_submit(params, now)
        if endpoint == "ihuyi.getnum":
            return sandbox._ihuyi_getnum(params, now)
        return sandbox._showapi(params, now)


def _parse_qs(text: str) -> dict[str, str]:
    if not text:
        return {}
    parsed = parse_qs(text, keep_blank_values=True, encoding="utf-8", errors="replace")
    return {k: v[0] for k, v in parsed.items()}  # first value wins on repeats


def _same(a: str, b: str) -> bool:
    # bytes, because compare_digest refuses non-ASCII str and a client may send anything
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# ====================================================================== the server


class SandboxServer:
    """Both providers on one local port. ``with SandboxServer(truth, config) as s: s.url``."""

    def __init__(
        self,
        truth: TruthIndex,
        config: SandboxConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.truth = truth
        self.config = config or SandboxConfig()
        self.stats = SandboxStats()
        self._lock = threading.Lock()  # quota, fault RNG, fault plan
        self._remaining = self.config.quota
        self._rng = random.Random(self.config.seed)
        # A separate generator, so ocrids never shift the seeded fault sequence.
        self._ocrid_seq = itertools.count(random.Random(self.config.seed).randrange(100_000))
        self._stopping = threading.Event()
        self._host = host
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.sandbox = self
        self._thread: threading.Thread | None = None
        self._serving = False
        self._closed = False

    # ---- lifecycle

    @property
    def url(self) -> str:
        # A wildcard bind is reachable on loopback; a URL naming 0.0.0.0 is not portable.
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> Self:
        if self._thread is not None or self._serving:
            raise RuntimeError("sandbox already running")
        self._serving = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"sandbox:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` or KeyboardInterrupt."""
        if self._thread is not None or self._serving:
            raise RuntimeError("sandbox already running")
        self._serving = True
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._serving = False
            self._stopping.set()
            self._close()

    def stop(self) -> None:
        # Wakes handlers sleeping in latency or a timeout fault, so stop() is prompt.
        self._stopping.set()
        if self._serving:
            # shutdown() waits for serve_forever to exit; calling it when serve_forever never
            # ran would block forever, hence the flag.
            self._httpd.shutdown()
            self._serving = False
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._httpd.server_close()

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- quota and faults

    @property
    def remaining(self) -> int:
        with self._lock:
            return self._remaining

    def set_quota(self, n: int) -> int:
        with self._lock:
            self._remaining = max(0, int(n))
            return self._remaining

    def add_quota(self, n: int) -> int:
        with self._lock:
            self._remaining = max(0, self._remaining + int(n))
            return self._remaining

    def set_faults(self, plan: FaultPlan) -> None:
        with self._lock:
            self.config.faults = plan

    def _try_bill(self) -> bool:
        """Take one call off the quota; False when none is left (the call is then refused)."""
        with self._lock:
            if self._remaining <= 0:
                return False
            self._remaining -= 1
            return True

    def _draw(self, provider: str) -> tuple[_Fault | None, bool]:
        with self._lock:
            return self.config.faults.draw(self._rng, provider)

    def _next_ocrid(self) -> str:
        # 17 digits like seed 000's "22101320041348318": yymmddHHMMSS + a 5-digit sequence.
        return time.strftime("%y%m%d%H%M%S") + f"{next(self._ocrid_seq) % 100_000:05d}"

    def _fault_reply(self, fault: _Fault, provider: str) -> _Reply:
        if fault.kind == "timeout":
            self.stats._record_fault("timeout")
            self._stopping.wait(self.config.faults.timeout_sleep)
            # Not billed. A client patient enough to wait gets a gateway timeout, never a result.
            return _Reply(
                504,
                b"<html><body><h1>504 Gateway Time-out</h1></body></html>",
                "text/html",
                codes={"http": "504"},
                delay=False,
                lost=self._stopping.is_set(),
            )
        if fault.kind == "http_500":
            self.stats._record_fault("http_500")
            return _Reply(
                500,
                b"<html><body><h1>500 Internal Server Error</h1></body></html>",
                "text/html",
                codes={"http": "500"},
            )
        if fault.kind == "garbage":
            self.stats._record_fault("garbage")
            # What a misbehaving CDN or a truncated upstream answer looks like: 200, not JSON.
            return _Reply(
                200,
                b'<html><body>upstream error</body></html>\x00{"code":',
                "text/html",
                codes={"http": "garbage"},
            )
        assert fault.code is not None
        self.stats._record_fault(f"code:{provider}:{fault.code}")
        if provider == "ihuyi":
            return _ihuyi_error(fault.code)
        return _showapi_error(fault.code)

    def _intake(self, data_b64: str, url: str) -> _Image:
        return _decode_base64(data_b64) if data_b64 else _fetch(url)

    def _recognise(self, image: _Image, encoded_len: int) -> tuple[Match | None, str | None]:
        """(match, problem): a found entry, or why the image cannot be answered."""
        if image.data is None:
            return None, image.problem
        if self.config.check_image_limits:
            problem = _limits_problem(image.data, encoded_len)
            if problem:
                return None, problem
        m = self.truth.match(image.data)
        if m.entry is None:
            return m, _MATCH_PROBLEMS.get(m.reason, "未识别到身份证")
        return m, None

    def _bill(self, provider: str, image: _Image, code: str, lost: bool, at: float) -> str:
        """``at``: when the request arrived — what a provider's per-second limit counts."""
        ocrid = self._next_ocrid()
        sha = hashlib.sha256(image.data).hexdigest() if image.data is not None else None
        self.stats._record_billed(BilledCall(at, provider, ocrid, sha, code, lost))
        if lost:
            self.stats._record_fault("lost_after_billing")
        return ocrid

    # ---- ihuyi

    def _ihuyi_auth(self, params: dict[str, str], now: float, submit: bool) -> int | None:
        cfg = self.config
        account = params.get("account", "")
        password = params.get("password", "")
        app = params.get("app", "")
        if not account:
            return 401
        if not password:
            return 402
        if app != IHUYI_APP:
            return 403
        if not _same(account, cfg.ihuyi_account):
            return 405
        b64, url = params.get("img_base64", ""), params.get("img_url", "")
        if submit and bool(b64) == bool(url):
            return 404
        if _same(password, cfg.ihuyi_api_key):
            return None  # plain-key mode: time is optional
        if not _MD5_RE.fullmatch(password):
            # Neither the key nor anything shaped like a dynamic password: a wrong key, which
            # the provider reports as 405 rather than as a failed signature.
            return 405
        t = params.get("time", "")
        if not _TIME_RE.fullmatch(t) or abs(int(t) - now) > cfg.max_clock_skew:
            return 40501
        if submit:
            expected = sign_submit(account, cfg.ihuyi_api_key, b64, url, t, app)
        else:
            expected = sign_getnum(account, cfg.ihuyi_api_key, t, app)
        if not _same(password.lower(), expected):
            return 40502
        return None

    def _ihuyi_submit(self, params: dict[str, str], now: float) -> _Reply:
        err = self._ihuyi_auth(params, now, submit=True)
        if err is not None:
            return _ihuyi_error(err)
        fault, lost = self._draw("ihuyi")
        if fault is not None:
            return self._fault_reply(fault, "ihuyi")
        if not self._try_bill():
            return _ihuyi_error(4051)
        b64, url = params.get("img_base64", ""), params.get("img_url", "")
        image = self._intake(b64, url)
        match, problem = self._recognise(image, len(b64))
        if problem is not None or match is None or match.entry is None:
            self._bill("ihuyi", image, "4086", lost, now)
            if lost:
                return _Reply(0, b"", lost=True)
            return _ihuyi_error(4086, f"{IHUYI_MESSAGES[4086]}:{problem}")
        ocrid = self._bill("ihuyi", image, "2", lost, now)
        if lost:
            return _Reply(0, b"", lost=True)
        return _json_reply(
            200,
            {
                "code": 2,
                "msg": IHUYI_MESSAGES[2],
                "ocrid": ocrid,
                "content": _ihuyi_content(match.entry),
            },
            {"ihuyi": "2"},
        )

    def _ihuyi_getnum(self, params: dict[str, str], now: float) -> _Reply:
        err = self._ihuyi_auth(params, now, submit=False)
        if err is not None:
            return _getnum_error(err)
        return _json_reply(
            200, {"code": 2, "msg": "查询成功", "num": self.remaining}, {"ihuyi": "2"}
        )

    # ---- showapi

    def _showapi(self, params: dict[str, str], now: float) -> _Reply:
        if not _same(params.get("appKey", ""), self.config.showapi_app_key):
            return _showapi_error(SHOWAPI_AUTH)
        fault, lost = self._draw("showapi")
        if fault is not None:
            return self._fault_reply(fault, "showapi")
        side_param = params.get("type", "")
        if side_param not in ("", "1", "2"):
            return _showapi_failure(SHOWAPI_RET_PARAM, "type参数错误,正面1 反面2,或不填")
        img_data, img_url = params.get("imgData", ""), params.get("imgUrl", "")
        if not img_data and not img_url:
            return _showapi_failure(SHOWAPI_RET_PARAM, "imgData和imgUrl必须选一个")
        if not self._try_bill():
            return _showapi_error(SHOWAPI_QUOTA)
        # Both given: imgData is used (seed 003 recommends it; it needs no fetch).
        image = self._intake(img_data, "" if img_data else img_url)
        match, problem = self._recognise(image, len(img_data))
        entry = match.entry if match is not None else None
        if (
            problem is None
            and entry is not None
            and side_param
            and (side_param == "1") != (entry.side == "front")
        ):
            problem = "身份证正反面与type参数不符"
        if problem is not None or entry is None:
            self._bill("showapi", image, f"ret_code:{SHOWAPI_RET_IMAGE}", lost, now)
            if lost:
                return _Reply(0, b"", lost=True)
            return _showapi_failure(SHOWAPI_RET_IMAGE, f"识别失败:{problem}")
        self._bill("showapi", image, "0", lost, now)
        if lost:
            return _Reply(0, b"", lost=True)
        return _showapi_envelope(
            SHOWAPI_OK, "", _showapi_body(entry, params.get("needQuality", "") == "1")
        )

    # ---- control endpoints (for tests and demos in other processes)

    def _control(self, method: str, path: str, query: str, body: bytes) -> _Reply:
        name = path[len(CONTROL_PREFIX) :].strip("/")
        reply = self._control_inner(method, name, query, body)
        reply.delay = False
        reply.record = False
        return reply

    def _control_inner(self, method: str, name: str, query: str, body: bytes) -> _Reply:
        if name == "health" and method == "GET":
            return _json_reply(200, {"ok": True})
        if name == "stats" and method == "GET":
            q = _parse_qs(query)
            snap = self.stats.snapshot(include_calls=q.get("calls", "") in ("1", "true"))
            snap["remaining"] = self.remaining
            return _json_reply(200, snap)
        if name in ("quota", "faults", "reset") and method == "POST":
            try:
                doc = json.loads(body.decode("utf-8") or "{}")
            except (UnicodeDecodeError, json.JSONDecodeError):
                return _json_reply(400, {"error": "body must be JSON"})
            if not isinstance(doc, dict):
                return _json_reply(400, {"error": "body must be a JSON object"})
            if name == "reset":
                self.stats.reset()
                return _json_reply(200, {"ok": True, "remaining": self.remaining})
            if name == "faults":
                try:
                    plan = FaultPlan.parse(str(doc.get("plan", "")))
                except ValueError as exc:
                    return _json_reply(400, {"error": str(exc)})
                self.set_faults(plan)
                return _json_reply(200, {"plan": str(plan)})
            value = doc.get("set", doc.get("add"))
            if not isinstance(value, int) or isinstance(value, bool) or len(doc) != 1:
                return _json_reply(400, {"error": 'expected {"set": n} or {"add": n}'})
            remaining = self.set_quota(value) if "set" in doc else self.add_quota(value)
            return _json_reply(200, {"remaining": remaining})
        if name in ("health", "stats", "quota", "faults", "reset"):
            return _json_reply(405, {"error": "method not allowed"})
        return _json_reply(404, {"error": "unknown control endpoint"})


# ====================================================================== CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m idocr_sandbox.server --truth truth.json --port 8700``.

    Settings not given on the command line come from ``IDOCR_SANDBOX_*`` (see
    :meth:`SandboxConfig.from_env`).
    """
    p = argparse.ArgumentParser(prog="idocr-sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--truth", action="append", default=[], help="truth file (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--quota", type=int)
    p.add_argument("--latency", type=float)
    p.add_argument("--faults", help='e.g. "http_500=0.05,code:4010=0.1"')
    p.add_argument("--seed", type=int)
    p.add_argument("--max-clock-skew", type=int)
    p.add_argument("--check-image-limits", action="store_true", default=None)
    p.add_argument("--url-file", help="write the base URL here once listening")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "quota": a.quota,
            "latency": a.latency,
            "faults": FaultPlan.parse(a.faults) if a.faults is not None else None,
            "seed": a.seed,
            "max_clock_skew": a.max_clock_skew,
            "check_image_limits": a.check_image_limits,
        }.items()
        if v is not None
    }
    config = SandboxConfig.from_env(**overrides)
    truth = TruthIndex.load(*a.truth)
    server = SandboxServer(truth, config, host=a.host, port=a.port)
    if a.url_file:
        with open(a.url_file, "w", encoding="utf-8") as f:
            f.write(server.url + "\n")
    print(
        f"sandbox listening on {server.url} ({len(truth)} truth images, quota {config.quota}, "
        f"faults {config.faults})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
