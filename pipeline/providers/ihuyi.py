"""ihuyi ID-card OCR (seed 000): ``ocr/Submit.json`` and ``ocr/GetNum.json``.

Requests are form POSTs (UTF-8) signed with the MD5 dynamic password and a fresh 10-digit
``time`` for every call, so a retried call is signed anew. Answers are mapped to the one
taxonomy of :class:`~pipeline.providers.base.Outcome` here, at the boundary.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from pipeline.domain.checks import parse_date, parse_valid_period
from pipeline.providers.base import (
    BalanceError,
    ImagePayload,
    Outcome,
    ProviderResult,
)
from pipeline.providers.http import encode_form, make_client, now, post_form
from pipeline.providers.ihuyi_sign import APP, finish, sign_getnum, submit_signer

OK_CODE = "2"
#: seed 000 §2.5; "0 unknown error", "1 submit failed", "4010 channel error" are worth a retry
TRANSIENT_CODES = frozenset({"0", "1", "4010"})
#: the image is at fault ("4086 image error", "404 img_base64 or img_url required")
IMAGE_CODES = frozenset({"4086", "404"})
QUOTA_CODES = frozenset({"4051"})
#: illegal IP, empty account/password, no such app, wrong id/key, frozen, signature check failed,
#: no contract, IP not registered: nothing an item can fix; the operator must act
AUTH_CODES = frozenset({"400", "401", "402", "403", "405", "4050", "40502", "40505", "4052"})
CLOCK_CODES = frozenset({"40501"})  # dynamic password expired: our clock or a stale `time`


def classify(code: str) -> Outcome:
    if code == OK_CODE:
        return Outcome.OK
    if code in TRANSIENT_CODES:
        return Outcome.TRANSIENT
    if code in IMAGE_CODES:
        return Outcome.IMAGE
    if code in QUOTA_CODES:
        return Outcome.QUOTA
    if code in AUTH_CODES:
        return Outcome.AUTH
    if code in CLOCK_CODES:
        return Outcome.CLOCK
    return Outcome.ERROR


def parse_content(content: Any) -> tuple[str | None, dict[str, str]]:
    """The recognised fields in the result record's names; dates as YYYY-MM-DD."""
    if not isinstance(content, dict):
        return None, {}
    side = content.get("type") if content.get("type") in ("front", "back") else None

    def text(key: str) -> str | None:
        v = content.get(key)
        return str(v).strip() if v not in (None, "") else None

    fields: dict[str, str | None] = {}
    if side == "front" or (side is None and "id_number" in content):
        side = "front"
        # The seed spells the field `data_of_birth`; accept the corrected spelling too.
        dob = text("data_of_birth") or text("date_of_birth")
        fields = {
            "name": text("name"),
            "gender": text("gender"),
            "ethnicity": text("ethnicity"),
            "date_of_birth": (parse_date(dob) or dob) if dob else None,
            "domicile": text("domicile"),
            "id_number": (text("id_number") or "").upper() or None,
        }
    elif side == "back" or (side is None and "valid_period" in content):
        side = "back"
        period = text("valid_period")
        valid_from, valid_to = parse_valid_period(period) if period else (None, None)
        fields = {
            "issue_authority": text("issue_authority"),
            "valid_from": valid_from,
            "valid_to": valid_to,
        }
    return side, {k: v for k, v in fields.items() if v is not None}


_APP_TIME = f"&app={APP}&time=".encode("ascii")


@dataclass(frozen=True, slots=True, repr=False)
class PreparedSubmit:
    """A Submit.json request short of its ``time`` and password (:meth:`IhuyiClient.prepare`)."""

    signer: Any  # md5 over account + apikey + app + img_base64 + img_url: never printed
    head: bytes  # account=…&password=
    tail: bytes  # &img_base64=… or &img_url=…

    def __repr__(self) -> str:  # never the image, the URL or the key-derived digest
        return f"PreparedSubmit({len(self.tail)} bytes)"


class IhuyiClient:
    name = "ihuyi"

    def __init__(
        self,
        account: str,
        api_key: str,
        base_url: str = "https://api.ihuyi.com",
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], int] = now,
        name: str = "ihuyi",
    ) -> None:
        self.name = name
        self.account = account
        self._api_key = api_key
        self._base = base_url.rstrip("/")
        self._clock = clock
        self._http = make_client(timeout, transport)

    def __repr__(self) -> str:
        return f"IhuyiClient(account={self.account!r}, base_url={self._base!r})"

    def submit(self, image: ImagePayload) -> ProviderResult:
        return self.send(self.prepare(image))

    def prepare(self, image: ImagePayload) -> PreparedSubmit:
        """Everything of a submission but its ``time`` and password: the base64 text, its form
        encoding and the digest of the signed parts before ``time``. Done before the rate-limiter
        slot, so that after it :meth:`send` has only constant work left."""
        img_base64 = base64.b64encode(image.data) if image.data is not None else b""
        img_url = image.url or ""
        image_field: tuple[str, str | bytes] = (
            ("img_base64", img_base64) if img_base64 else ("img_url", img_url)
        )
        return PreparedSubmit(
            signer=submit_signer(self.account, self._api_key, img_base64, img_url),
            head=encode_form([("account", self.account)]) + b"&password=",
            tail=b"&" + encode_form([image_field]),
        )

    def send(self, call: PreparedSubmit) -> ProviderResult:
        """Sign ``call`` with a fresh ``time`` and send it; each send is a new request."""
        t = self._clock()
        password = finish(call.signer, t)
        body = b"".join(
            (call.head, password.encode("ascii"), _APP_TIME, str(t).encode("ascii"), call.tail)
        )
        body, failure, status = post_form(self._http, f"{self._base}/ocr/Submit.json", body)
        if failure is not None:
            failure.sent_at = t
            return failure
        code = str(body.get("code", "")).strip()
        msg = str(body.get("msg", ""))
        if not code:
            return ProviderResult(
                Outcome.TRANSIENT,
                "garbage",
                "response has no code",
                raw=body,
                http_status=status,
                sent_at=t,
            )
        outcome = classify(code)
        ocrid = str(body.get("ocrid")) if body.get("ocrid") not in (None, "", "0", 0) else None
        side, fields = parse_content(body.get("content")) if outcome is Outcome.OK else (None, {})
        return ProviderResult(
            outcome=outcome,
            code=code,
            msg=msg,
            ocrid=ocrid,
            side=side,
            fields=fields,
            raw=body,
            http_status=status,
            sent_at=t,
        )

    def balance(self) -> int:
        t = self._clock()
        form = {
            "account": self.account,
            "password": sign_getnum(self.account, self._api_key, t),
            "app": APP,
            "time": str(t),
        }
        body, failure, status = post_form(self._http, f"{self._base}/ocr/GetNum.json", form)
        if failure is not None:
            raise BalanceError(failure)
        code = str(body.get("code", "")).strip()
        if code != OK_CODE:
            outcome = classify(code) if code else Outcome.TRANSIENT
            raise BalanceError(
                ProviderResult(
                    outcome,
                    code or "garbage",
                    str(body.get("msg", "")),
                    raw=body,
                    http_status=status,
                )
            )
        try:
            return int(str(body.get("num")).strip())
        except ValueError:
            raise BalanceError(
                ProviderResult(
                    Outcome.TRANSIENT,
                    "garbage",
                    "GetNum answered a non-numeric num",
                    http_status=status,
                )
            ) from None

    def close(self) -> None:
        self._http.close()
