"""showapi (万维易源) ID-card OCR, API 1429-1 (seed 003): ``POST {base}/1429-1?appKey=…``.

The request is a UTF-8 form (``imgData`` base64 or ``imgUrl``, ``type``, ``needQuality``); the
appKey travels in the URL query, so nothing here ever formats a URL or an httpx error into a
message (:func:`~pipeline.providers.http.post_form` already summarises exceptions by class).

The answer has two layers, and both are read here, at the boundary:

* the platform envelope ``showapi_res_code`` / ``showapi_res_error`` / ``showapi_res_id``
  (0 = the platform accepted the call), then
* the API body ``showapi_res_body`` with ``ret_code`` (0 = the call succeeded) and ``flag``
  (true = a card was recognised).

Seed 003 documents only the success values. The error codes below are the ones the sandbox
emulates (``idocr_sandbox/server.py``), and envelope error texts are also read, because
the real platform words its refusals ("appKey不存在", "用户未购买该接口", "剩余次数不足") more
reliably than it numbers them.

``code`` of a result, and the outcome it maps to (first matching line wins)::

    answer                                     code              outcome
    env ≠ 0, text says 频率/频繁/QPS/并发/繁忙     "<env>"           TRANSIENT (busy, rate limited)
    env ≠ 0, text says 余额/次数/欠费/quota       "<env>"           QUOTA
    env ≠ 0, text says appKey/权限/未购买/不存在/  "<env>"           AUTH
             未授权/未开通/无权/禁用/冻结
    env -1                                     "-1"              AUTH
    env -2                                     "-2"              QUOTA
    env -3 or any other negative               "-3", …           TRANSIENT (platform failure)
    env positive                               "<env>"           ERROR (unlisted, as for ihuyi)
    env 0, body/ret_code missing or not a num  "garbage"         TRANSIENT
    env 0, ret_code -2                         "ret_code:-2"     ERROR (parameter error: ours)
    env 0, ret_code other non-zero             "ret_code:<n>"    IMAGE (recognition failed)
    env 0, ret_code 0, flag false              "flag:false"      IMAGE (nothing recognised)
    env 0, ret_code 0, flag absent, no fields  "flag:false"      IMAGE
    env 0, ret_code 0, flag true (or absent    "0"               OK
           with recognised fields)
    no envelope code / not JSON / not object   "garbage"         TRANSIENT
    HTTP and transport failures                see post_form     TRANSIENT / UNKNOWN / AUTH / ERROR

Envelope codes are bare numbers (as the platform numbers them); body failures are prefixed with
the field that failed (``ret_code:`` / ``flag:``), the same spelling the sandbox records its
billed calls with, so a code names its layer at a glance. The error text is looked at before
the number because it is the more specific of the two. ``ocrid`` is ``showapi_res_id``;
``raw`` is the whole parsed response (envelope and body), with the key masked should the
platform ever quote it.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import httpx

from pipeline.domain.checks import LONG_TERM, parse_date, parse_valid_period
from pipeline.providers.base import ImagePayload, Outcome, ProviderResult
from pipeline.providers.http import encode_form, make_client, post_form

API_PATH = "/1429-1"

ENV_OK = 0
ENV_AUTH = -1  # wrong or missing appKey, no permission (the sandbox's choice)
ENV_QUOTA = -2  # paid calls used up (the sandbox's choice; seed 003 is silent)
ENV_SYSTEM = -3  # platform busy or failing: worth a retry

RET_OK = 0
RET_IMAGE = -1  # the image could not be recognised; billed, the image is at fault
RET_PARAM = -2  # a parameter error: our request is wrong, re-sending it will not help

OK_CODE = "0"
FLAG_FALSE_CODE = "flag:false"
GARBAGE_CODE = "garbage"

#: error-text markers, checked in this order (first match wins). Busy/rate wording comes first
#: so "调用次数超过QPS限制" is a retry, not a paid-quota pause; quota wording before auth so
#: "账户余额不足" pauses as quota even when it also mentions the account.
TRANSIENT_MARKERS = ("频率", "频繁", "qps", "并发", "繁忙", "busy", "rate limit")
QUOTA_MARKERS = ("余额", "次数", "欠费", "quota", "balance")
AUTH_MARKERS = (
    "appkey",
    "权限",
    "未购买",
    "不存在",
    "未授权",
    "未开通",
    "无权",
    "禁用",
    "冻结",
    "unauthor",
    "permission",
    "forbidden",
)

SIDE_PARAM = {"front": "1", "back": "2"}  # anything else: "" = let showapi detect the side
#: provider texts are stored and printed; a runaway message is cut rather than kept whole
MAX_MSG = 300


def account_for(app_key: str) -> str:
    """The account name limits and quota are kept under: showapi has none apart from the key,
    so a digest names it without revealing it (the same as ``runtime.provider_identity``)."""
    return "key-" + hashlib.sha256(app_key.encode()).hexdigest()[:12]


def classify_envelope(code: int, error: str) -> Outcome:
    """The outcome of a non-zero envelope code and its error text."""
    text = error.lower()
    if any(m in text for m in TRANSIENT_MARKERS):
        return Outcome.TRANSIENT
    if any(m in text for m in QUOTA_MARKERS):
        return Outcome.QUOTA
    if any(m in text for m in AUTH_MARKERS):
        return Outcome.AUTH
    if code == ENV_AUTH:
        return Outcome.AUTH
    if code == ENV_QUOTA:
        return Outcome.QUOTA
    if code < 0:
        # -3 and any other negative code: the platform's own failures, which pass
        return Outcome.TRANSIENT
    return Outcome.ERROR


def classify_body(ret_code: int, flag: bool | None, recognised: bool) -> tuple[Outcome, str]:
    """(outcome, code) of a body inside an accepted (0) envelope."""
    if ret_code == RET_PARAM:
        return Outcome.ERROR, f"ret_code:{ret_code}"
    if ret_code != RET_OK:
        return Outcome.IMAGE, f"ret_code:{ret_code}"
    # The seed always sends flag; if it is ever left out, recognised fields decide.
    if flag is False or (flag is None and not recognised):
        return Outcome.IMAGE, FLAG_FALSE_CODE
    return Outcome.OK, OK_CODE


def _as_int(v: Any) -> int | None:
    """Seed 003 types ret_code as String while its example sends a number: accept both."""
    if isinstance(v, bool):  # bool is an int subclass; True is not a code
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def _as_flag(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return None


def _valid_to(text: str) -> str:
    if LONG_TERM in text:  # "长期" and the "长期有效" the seed says may come back
        return LONG_TERM
    return parse_date(text) or text


def parse_body(body: dict[str, Any]) -> tuple[str | None, dict[str, str], list[str] | None]:
    """(side, fields in the result record's names, quality flags) of a showapi body.

    Quality flags (seed 003): shoot = maybe re-photographed, photo = a real card, temporary =
    a temporary card, edited = maybe edited, copy = maybe a photocopy; passed on as given.
    """

    def text(key: str) -> str | None:
        v = body.get(key)
        return (str(v).strip() or None) if v is not None else None

    dob = text("birthday")
    id_no = text("idNo")
    fields: dict[str, str | None] = {
        "name": text("name"),
        "gender": text("sex"),
        "ethnicity": text("nationality"),
        # unparseable dates are kept as read, so the validity checks can say what is wrong
        "date_of_birth": (parse_date(dob) or dob) if dob else None,
        "domicile": text("addr"),
        "id_number": id_no.upper() if id_no else None,
    }
    begin = text("effBeginDate") or text("effDate")
    end = text("effEndDate")
    valid_from = (parse_date(begin) or begin) if begin else None
    if begin and not end and parse_date(begin) is None:
        # A whole period in one field ("2005.10.08-2025.10.08"): split it rather than lose it.
        a, b = parse_valid_period(begin)
        if a or b:
            valid_from, end = a, b
    fields.update(
        issue_authority=text("depInfo"),
        valid_from=valid_from,
        valid_to=_valid_to(end) if end else None,
    )
    clean = {k: v for k, v in fields.items() if v is not None}

    if "issue_authority" in clean or "valid_to" in clean:
        side: str | None = "back"
    elif "name" in clean or "id_number" in clean:
        side = "front"
    else:
        side = None

    q = body.get("quality")
    if isinstance(q, str):
        quality: list[str] | None = [q] if q else []
    elif isinstance(q, list):
        quality = [str(x) for x in q]
    else:
        quality = None
    return side, clean, quality


class ShowapiClient:
    name = "showapi"

    def __init__(
        self,
        app_key: str,
        base_url: str = "https://route.showapi.com",
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        name: str = "showapi",
        need_quality: bool = True,
    ) -> None:
        self.name = name
        self.account = account_for(app_key)
        self._app_key = app_key
        self._base = base_url.rstrip("/")
        self._need_quality = need_quality
        self._http = make_client(timeout, transport)

    def __repr__(self) -> str:
        return f"ShowapiClient(account={self.account!r}, base_url={self._base!r})"

    def _clean(self, msg: Any) -> str:
        """A provider text fit for msg: never the key (a refusal could quote it), never long."""
        s = "" if msg is None else str(msg)
        if self._app_key:
            s = s.replace(self._app_key, "***")
        return s[:MAX_MSG]

    def _scrub(self, v: Any) -> Any:
        """``v`` with the key masked in every string (a copy only where something changed)."""
        if isinstance(v, str):
            return v.replace(self._app_key, "***") if self._app_key and self._app_key in v else v
        if isinstance(v, dict):
            return {k: self._scrub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self._scrub(x) for x in v]
        return v

    def submit(self, image: ImagePayload) -> ProviderResult:
        return self.send(self.prepare(image))

    def prepare(self, image: ImagePayload) -> bytes:
        """The form body, encoded before the rate-limiter slot (showapi signs nothing per call)."""
        form: dict[str, str | bytes] = {
            "type": SIDE_PARAM.get(image.side or "", ""),
            "needQuality": "1" if self._need_quality else "0",
        }
        if image.data is not None:
            form["imgData"] = base64.b64encode(image.data)
        else:
            form["imgUrl"] = image.url or ""
        return encode_form(form.items())

    def send(self, call: bytes) -> ProviderResult:
        body, failure, status = post_form(
            self._http, f"{self._base}{API_PATH}", call, params={"appKey": self._app_key}
        )
        if failure is not None:
            return failure
        # raw is stored with the result: a refusal quoting the key must not carry it there
        body = self._scrub(body)

        def garbage(why: str) -> ProviderResult:
            return ProviderResult(
                Outcome.TRANSIENT, GARBAGE_CODE, why, raw=body, http_status=status
            )

        env = _as_int(body.get("showapi_res_code"))
        if env is None:
            return garbage("response has no showapi_res_code")
        res_id = body.get("showapi_res_id")
        ocrid = str(res_id) if res_id not in (None, "") else None
        if env != ENV_OK:
            error = self._clean(body.get("showapi_res_error"))
            return ProviderResult(
                outcome=classify_envelope(env, error),
                code=str(env),
                msg=error,
                ocrid=ocrid,
                raw=body,
                http_status=status,
            )
        inner = body.get("showapi_res_body")
        if not isinstance(inner, dict):
            return garbage("response has no showapi_res_body object")
        ret_code = _as_int(inner.get("ret_code"))
        if ret_code is None:
            return garbage("response body has no ret_code")
        side, fields, quality = parse_body(inner)
        outcome, code = classify_body(ret_code, _as_flag(inner.get("flag")), bool(fields))
        ok = outcome is Outcome.OK
        return ProviderResult(
            outcome=outcome,
            code=code,
            msg=self._clean(inner.get("msg")),
            ocrid=ocrid,
            side=side if ok else None,
            fields=fields if ok else {},
            # kept on failures too: "copy" or "shoot" may be why nothing was recognised
            extra={"quality": quality} if quality is not None else {},
            raw=body,
            http_status=status,
        )

    #: no balance query: `balance()` makes no request
    has_balance = False

    def balance(self) -> int | None:
        """showapi has no balance call; the quota ledger counts calls instead."""
        return None

    def close(self) -> None:
        self._http.close()
