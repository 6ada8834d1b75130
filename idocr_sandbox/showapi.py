"""The showapi protocol (seed 003): ``/1429-1?appKey=``, the ``showapi_res_*`` envelope, quality
flags."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from idocr_sandbox.truth import TruthEntry
from idocr_sandbox.wire import _json_reply, _Reply, _same

log = logging.getLogger(__name__)


SHOWAPI_PATH = "/1429-1"

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
    return _showapi_envelope(
        SHOWAPI_OK, "", {"ret_code": ret_code, "flag": False, "msg": msg}
    )


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


class ShowapiProtocol:
    """The showapi endpoint of :class:`~idocr_sandbox.server.SandboxServer`."""

    # ---- showapi

    def _showapi(self, params: dict[str, str], now: float) -> _Reply:
        if not _same(params.get("appKey", ""), self.config.showapi_app_key):
            return _showapi_error(SHOWAPI_AUTH)
        fault, lost = self._draw("showapi")
        if fault is not None:
            return self._fault_reply(fault, "showapi")
        side_param = params.get("type", "")
        if side_param not in ("", "1", "2"):
            return _showapi_failure(
                SHOWAPI_RET_PARAM, "type参数错误,正面1 反面2,或不填"
            )
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
