"""The showapi client against seed 003: request shape, both answer layers, normalisation.

An injected transport (httpx.MockTransport) stands in for the server here; the same client is
exercised over real HTTP against the sandbox in tests/integration/test_showapi_sandbox.py.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from pipeline.config import Settings
from pipeline.providers.base import ImagePayload, Outcome
from pipeline.providers.showapi import (
    ENV_AUTH,
    ENV_QUOTA,
    ENV_SYSTEM,
    ShowapiClient,
    classify_envelope,
    parse_body,
)

KEY = "0123456789abcdef0123456789abcdef"  # shaped like a real appKey so leaks are findable


class Recorder:
    def __init__(self, reply: httpx.Response | Exception) -> None:
        self.reply = reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    def form(self, i: int = -1) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.requests[i].content.decode(), keep_blank_values=True).items()}


def client(rec: Recorder, **kw: Any) -> ShowapiClient:
    return ShowapiClient(KEY, "https://route.test/", transport=httpx.MockTransport(rec), **kw)


def envelope(body: Any, code: Any = 0, error: str = "", res_id: str = "ce135f6739294c63be0c021b76b6fbff") -> dict[str, Any]:
    return {"showapi_res_code": code, "showapi_res_error": error, "showapi_res_id": res_id, "showapi_res_body": body}


def answer(body: Any, **kw: Any) -> Recorder:
    return Recorder(httpx.Response(200, json=envelope(body, **kw)))


#: seed 003 §四(二), with the masked values replaced by real-looking ones
SEED_FRONT = {
    "msg": "识别成功!", "birthday": "1985-04-09", "flag": True, "nationality": "汉", "sex": "男",
    "quality": ["photo"], "name": "王小明", "headImgBase64": "若需要该字段值请使用身份证识别返照接口",
    "addr": "湖北省武汉市江岸区某路1号", "ret_code": 0, "idNo": "42010219850409121x",
}
BACK = {
    "ret_code": 0, "flag": True, "msg": "识别成功!", "depInfo": "上海市公安局徐汇分局",
    "effDate": "2005-10-08", "effBeginDate": "2005-10-08", "effEndDate": "2025-10-08",
}


# ---------------------------------------------------------------------------- request shape


def test_bytes_request_shape() -> None:
    rec = answer(SEED_FRONT)
    data = b"\xff\xd8\xff\xe0 not really a jpeg +/="
    client(rec).submit(ImagePayload(data=data, side="front"))
    req = rec.requests[0]
    assert req.method == "POST"
    assert req.url.scheme == "https" and req.url.host == "route.test"
    assert req.url.path == "/1429-1"
    assert dict(req.url.params) == {"appKey": KEY}
    assert req.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert rec.form() == {"imgData": base64.b64encode(data).decode(), "type": "1", "needQuality": "1"}


def test_url_request_shape() -> None:
    rec = answer(BACK)
    client(rec, need_quality=False).submit(ImagePayload(url="https://bucket.test/a b.png?X-Amz=1&y=2", side="back"))
    assert rec.form() == {"imgUrl": "https://bucket.test/a b.png?X-Amz=1&y=2", "type": "2", "needQuality": "0"}
    # the image URL's own query stays in the form, not mixed into ours
    assert dict(rec.requests[0].url.params) == {"appKey": KEY}


@pytest.mark.parametrize("side,param", [("front", "1"), ("back", "2"), (None, "")])
def test_side_becomes_type(side: str | None, param: str) -> None:
    rec = answer(SEED_FRONT)
    client(rec).submit(ImagePayload(data=b"x", side=side))
    assert rec.form()["type"] == param


def test_key_with_reserved_characters_is_encoded() -> None:
    rec = answer(SEED_FRONT)
    ShowapiClient("a&b=c d", "https://route.test", transport=httpx.MockTransport(rec)).submit(ImagePayload(data=b"x"))
    assert dict(rec.requests[0].url.params) == {"appKey": "a&b=c d"}


# ---------------------------------------------------------------------------- identity


def test_account_matches_runtime_identity() -> None:
    from pipeline.config import provider_identity

    c = ShowapiClient(KEY)
    assert c.name == "showapi"
    assert c.account == "key-" + hashlib.sha256(KEY.encode()).hexdigest()[:12]
    settings = Settings(provider="showapi", showapi_app_key=KEY)  # type: ignore[call-arg]
    assert provider_identity(settings) == ("showapi", c.account)
    assert KEY not in c.account
    assert c.balance() is None
    c.close()


def test_name_override() -> None:
    assert ShowapiClient(KEY, name="sandbox").name == "sandbox"


# ---------------------------------------------------------------------------- success


def test_seed_front_example_is_normalised() -> None:
    r = client(answer(SEED_FRONT)).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code, r.msg) == (Outcome.OK, "0", "识别成功!")
    assert r.ocrid == "ce135f6739294c63be0c021b76b6fbff"
    assert r.side == "front"
    assert r.fields == {"name": "王小明", "gender": "男", "ethnicity": "汉", "date_of_birth": "1985-04-09",
                        "domicile": "湖北省武汉市江岸区某路1号", "id_number": "42010219850409121X"}
    assert r.extra == {"quality": ["photo"]}
    assert r.raw == envelope(SEED_FRONT)
    assert r.http_status == 200


def test_back_is_normalised() -> None:
    r = client(answer(BACK)).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.side) == (Outcome.OK, "back")
    assert r.fields == {"issue_authority": "上海市公安局徐汇分局", "valid_from": "2005-10-08", "valid_to": "2025-10-08"}
    assert r.extra == {}  # no quality asked for, none given


@pytest.mark.parametrize("end", ["长期有效", "长期", " 长期有效 "])
def test_long_term(end: str) -> None:
    side, fields, _ = parse_body({"depInfo": "北京市公安局东城分局", "effBeginDate": "2010.01.02", "effEndDate": end})
    assert side == "back"
    assert fields == {"issue_authority": "北京市公安局东城分局", "valid_from": "2010-01-02", "valid_to": "长期"}


def test_valid_from_falls_back_to_eff_date_and_dates_are_normalised() -> None:
    _, fields, _ = parse_body({"depInfo": "x", "effDate": "2005.10.08", "effEndDate": "20251008"})
    assert fields["valid_from"] == "2005-10-08" and fields["valid_to"] == "2025-10-08"
    # effBeginDate wins over effDate when both are there
    _, fields, _ = parse_body({"effDate": "2001-01-01", "effBeginDate": "2005-10-08"})
    assert fields["valid_from"] == "2005-10-08"


def test_a_whole_period_in_eff_date_is_split() -> None:
    _, fields, _ = parse_body({"depInfo": "x", "effDate": "2005.10.08-长期"})
    assert (fields["valid_from"], fields["valid_to"]) == ("2005-10-08", "长期")


def test_unparseable_dates_are_kept_as_read() -> None:
    _, fields, _ = parse_body({"name": "甲", "birthday": "1985年13月40日"})
    assert fields["date_of_birth"] == "1985年13月40日"


def test_side_detection() -> None:
    assert parse_body({"idNo": "1"})[0] == "front"
    assert parse_body({"name": "甲"})[0] == "front"
    assert parse_body({"depInfo": "x"})[0] == "back"
    assert parse_body({"effEndDate": "长期有效"})[0] == "back"
    assert parse_body({"msg": "x", "name": "", "idNo": None})[0] is None
    assert parse_body({"msg": "x", "name": "", "idNo": None})[1] == {}


def test_quality_flags() -> None:
    flags = ["shoot", "photo", "temporary", "edited", "copy"]
    r = client(answer({**SEED_FRONT, "quality": flags})).submit(ImagePayload(data=b"x"))
    assert r.extra == {"quality": flags}
    assert parse_body({"quality": []})[2] == []
    assert parse_body({"quality": "copy"})[2] == ["copy"]
    assert parse_body({})[2] is None


def test_string_typed_codes_and_flag() -> None:
    # seed 003's table types ret_code and flag as String; its example sends number and boolean
    r = client(answer({**SEED_FRONT, "ret_code": "0", "flag": "true"}, code="0")).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code) == (Outcome.OK, "0")
    r = client(answer({"ret_code": "0", "flag": "false", "msg": "未识别"})).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code) == (Outcome.IMAGE, "flag:false")


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "code,error,outcome",
    [
        (ENV_AUTH, "appKey错误", Outcome.AUTH),
        (ENV_AUTH, "", Outcome.AUTH),
        (ENV_QUOTA, "剩余次数不足", Outcome.QUOTA),
        (ENV_QUOTA, "", Outcome.QUOTA),
        (ENV_SYSTEM, "系统繁忙,请稍后重试", Outcome.TRANSIENT),
        (ENV_SYSTEM, "", Outcome.TRANSIENT),
        (-9, "注入的错误", Outcome.TRANSIENT),
        # the text is more specific than the number
        (ENV_SYSTEM, "appKey不存在", Outcome.AUTH),
        (ENV_SYSTEM, "用户未购买该接口", Outcome.AUTH),
        (ENV_SYSTEM, "没有该接口的调用权限", Outcome.AUTH),
        (ENV_SYSTEM, "您的余额不足", Outcome.QUOTA),
        (ENV_AUTH, "账户剩余次数不足", Outcome.QUOTA),
        (ENV_QUOTA, "调用频率超过QPS限制", Outcome.TRANSIENT),
        (7, "something unlisted", Outcome.ERROR),
    ],
)
def test_envelope_errors(code: int, error: str, outcome: Outcome) -> None:
    assert classify_envelope(code, error) is outcome
    r = client(answer({}, code=code, error=error)).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code, r.msg) == (outcome, str(code), error)
    assert r.fields == {} and r.side is None
    assert r.ocrid == "ce135f6739294c63be0c021b76b6fbff"


@pytest.mark.parametrize(
    "body,outcome,code",
    [
        ({"ret_code": -1, "flag": False, "msg": "识别失败:未识别到身份证"}, Outcome.IMAGE, "ret_code:-1"),
        ({"ret_code": "-1", "flag": False, "msg": "识别失败"}, Outcome.IMAGE, "ret_code:-1"),
        ({"ret_code": -5, "flag": False, "msg": "识别失败"}, Outcome.IMAGE, "ret_code:-5"),
        ({"ret_code": 0, "flag": False, "msg": "未识别出身份证信息"}, Outcome.IMAGE, "flag:false"),
        ({"ret_code": 0, "msg": "no flag, no fields"}, Outcome.IMAGE, "flag:false"),
        ({"ret_code": -2, "flag": False, "msg": "imgData和imgUrl必须选一个"}, Outcome.ERROR, "ret_code:-2"),
    ],
)
def test_body_failures(body: dict[str, Any], outcome: Outcome, code: str) -> None:
    r = client(answer(body)).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code, r.msg) == (outcome, code, body["msg"])
    assert r.fields == {} and r.side is None


def test_missing_flag_with_fields_is_ok() -> None:
    body = {k: v for k, v in SEED_FRONT.items() if k != "flag"}
    r = client(answer(body)).submit(ImagePayload(data=b"x"))
    assert r.outcome is Outcome.OK and r.fields["name"] == "王小明"


def test_quality_is_kept_on_a_failed_recognition() -> None:
    r = client(answer({"ret_code": 0, "flag": False, "msg": "未识别", "quality": ["copy"]})).submit(ImagePayload(data=b"x"))
    assert r.outcome is Outcome.IMAGE and r.extra == {"quality": ["copy"]}


# ---------------------------------------------------------------------------- transport and garbage


@pytest.mark.parametrize(
    "reply,outcome,code",
    [
        (httpx.Response(502, text="bad gateway"), Outcome.TRANSIENT, "http_502"),
        (httpx.Response(500, text="oops"), Outcome.TRANSIENT, "http_500"),
        (httpx.Response(403, text="forbidden"), Outcome.AUTH, "http_403"),
        (httpx.Response(200, text="<html>oops</html>"), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json=[1, 2]), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json={"msg": "no envelope"}), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json={"showapi_res_code": "x"}), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json={"showapi_res_code": True}), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json=envelope(None)), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json=envelope("a string")), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json=envelope({"flag": True, "name": "甲"})), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json=envelope({"ret_code": "abc"})), Outcome.TRANSIENT, "garbage"),
        (httpx.ConnectError("refused"), Outcome.TRANSIENT, "connect"),
        (httpx.ConnectTimeout("slow"), Outcome.TRANSIENT, "connect"),
        (httpx.ReadTimeout("slow"), Outcome.UNKNOWN, "timeout"),
        (httpx.WriteTimeout("slow"), Outcome.UNKNOWN, "timeout"),
        (httpx.RemoteProtocolError("closed"), Outcome.UNKNOWN, "lost"),
    ],
)
def test_transport_failures_and_garbage(reply: httpx.Response | Exception, outcome: Outcome, code: str) -> None:
    r = client(Recorder(reply)).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code) == (outcome, code)
    assert r.fields == {}


# ---------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.TooManyRedirects],
)
def test_key_never_in_msg_or_repr(exc: type[httpx.HTTPError]) -> None:
    url = f"https://route.test/1429-1?appKey={KEY}"
    c = client(Recorder(exc(f"error talking to {url}")))
    assert KEY not in repr(c) and KEY not in str(vars(c).get("account"))
    r = c.submit(ImagePayload(data=b"secret-bytes"))
    assert KEY not in r.msg and KEY not in r.code
    assert "secret-bytes" not in r.msg


def test_key_quoted_by_the_provider_is_masked() -> None:
    r = client(answer({}, code=ENV_AUTH, error=f"appKey {KEY} 不存在")).submit(ImagePayload(data=b"x"))
    assert r.outcome is Outcome.AUTH and KEY not in r.msg and "***" in r.msg
    assert KEY not in repr(r.raw)  # raw is stored with the result: masked there too
    r = client(answer({"ret_code": -2, "flag": False, "msg": f"bad {KEY}", "x": [KEY]})).submit(ImagePayload(data=b"x"))
    assert KEY not in r.msg and KEY not in repr(r.raw)


def test_long_provider_messages_are_cut() -> None:
    r = client(answer({"ret_code": -1, "flag": False, "msg": "失" * 5000})).submit(ImagePayload(data=b"x"))
    assert len(r.msg) <= 300


def test_id_number_is_not_in_msg() -> None:
    r = client(answer(SEED_FRONT)).submit(ImagePayload(data=b"x"))
    assert "42010219850409121" not in r.msg
