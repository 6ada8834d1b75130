"""The ihuyi protocol (seed 000): ``ocr/Submit.json`` and ``ocr/GetNum.json``, the MD5 dynamic
password, the documented codes and messages."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.providers.ihuyi_sign import APP as IHUYI_APP
from pipeline.providers.ihuyi_sign import sign_getnum, sign_submit

from idocr_sandbox.truth import TruthEntry
from idocr_sandbox.wire import (
    _ISO_DATE_RE,
    _MD5_RE,
    _TIME_RE,
    _json_reply,
    _Reply,
    _same,
)

log = logging.getLogger(__name__)


IHUYI_SUBMIT_PATH = "/ocr/Submit.json"
IHUYI_GETNUM_PATH = "/ocr/GetNum.json"

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


def _ihuyi_error(code: int, msg: str | None = None) -> _Reply:
    msg = msg or IHUYI_MESSAGES.get(code, "注入的错误")
    return _json_reply(
        200,
        {"code": code, "msg": msg, "ocrid": "0", "content": {}},
        {"ihuyi": str(code)},
    )


def _getnum_error(code: int) -> _Reply:
    return _json_reply(
        200,
        {"code": code, "msg": IHUYI_MESSAGES.get(code, "注入的错误"), "num": 0},
        {"ihuyi": str(code)},
    )


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


class IhuyiProtocol:
    """The ihuyi endpoints of :class:`~idocr_sandbox.server.SandboxServer`."""

    # ---- ihuyi

    def _ihuyi_auth(
        self, params: dict[str, str], now: float, submit: bool
    ) -> int | None:
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
