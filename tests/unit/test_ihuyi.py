"""The ihuyi client against the seed (000): signature, request bytes, codes, parsing.

An injected transport (httpx.MockTransport) stands in for the server here; the same client is
exercised over real HTTP against the sandbox in tests/integration and tests/e2e.
"""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import parse_qs

import httpx
import pytest

from pipeline.providers.base import ImagePayload, Outcome
from pipeline.providers.ihuyi import (
    AUTH_CODES,
    IhuyiClient,
    classify,
    parse_content,
)
from pipeline.providers.ihuyi_sign import sign_getnum, sign_submit

SEED_CODES = {
    "0": Outcome.TRANSIENT, "1": Outcome.TRANSIENT, "2": Outcome.OK,
    "400": Outcome.AUTH, "401": Outcome.AUTH, "402": Outcome.AUTH, "403": Outcome.AUTH,
    "404": Outcome.IMAGE, "405": Outcome.AUTH, "4050": Outcome.AUTH, "40501": Outcome.CLOCK,
    "40502": Outcome.AUTH, "40505": Outcome.AUTH, "4051": Outcome.QUOTA, "4052": Outcome.AUTH,
    "4086": Outcome.IMAGE, "4010": Outcome.TRANSIENT,
}


def test_seed_worked_example_submit() -> None:
    # seed 000 §4: md5('test1q784322ba1******idcardhttp://www.xx.com/xxx.png1651544941'),
    # the digest computed independently with coreutils md5sum
    assert (
        sign_submit("test", "1q784322ba1******", "", "http://www.xx.com/xxx.png", 1651544941)
        == "c6d71dab80e1978f6d195f50aecb3ae6"
    )


def test_seed_worked_example_getnum() -> None:
    # md5('test1q784322ba1******idcard1651544941'), by md5sum
    assert sign_getnum("test", "1q784322ba1******", 1651544941) == "386bd904266bedef25a913f534c3b363"


def test_signature_is_lowercase_hex_over_utf8() -> None:
    sig = sign_submit("账户", "key", "", "http://x/图.png", 1651544941)
    assert sig == hashlib.md5("账户keyidcardhttp://x/图.png1651544941".encode()).hexdigest()
    assert sig == sig.lower() and len(sig) == 32


@pytest.mark.parametrize("code,outcome", sorted(SEED_CODES.items()))
def test_every_seed_code_is_classified(code: str, outcome: Outcome) -> None:
    assert classify(code) is outcome


def test_unlisted_code_is_an_error_not_a_retry() -> None:
    assert classify("9999") is Outcome.ERROR
    assert "4051" not in AUTH_CODES


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


def client(rec: Recorder, clock: int = 1700000000) -> IhuyiClient:
    return IhuyiClient("acct", "secret-key", "https://ocr.test", transport=httpx.MockTransport(rec), clock=lambda: clock)


FRONT = {
    "code": 2, "msg": "提交成功", "ocrid": "22101320041348318",
    "content": {"code": 2, "type": "front", "name": "张三", "id_number": "11010119900307803x",
                "gender": "男", "ethnicity": "汉", "data_of_birth": "1990.03.07", "domicile": "北京市东城区"},
}
BACK = {"code": 2, "msg": "提交成功", "ocrid": "22101320041348318",
        "content": {"type": "back", "issue_authority": "上海市公安局徐汇分局", "valid_period": "2005.10.08-2025.10.08"}}


def test_submit_sends_the_seed_form_with_base64() -> None:
    rec = Recorder(httpx.Response(200, json=FRONT))
    data = b"\xff\xd8\xff\xe0 not really a jpeg +/="
    client(rec).submit(ImagePayload(data=data))
    req = rec.requests[0]
    assert req.method == "POST"
    assert str(req.url) == "https://ocr.test/ocr/Submit.json"
    assert req.headers["content-type"].startswith("application/x-www-form-urlencoded")
    form = rec.form()
    b64 = base64.b64encode(data).decode()
    assert form == {
        "account": "acct",
        "password": hashlib.md5(f"acctsecret-keyidcard{b64}1700000000".encode()).hexdigest(),
        "app": "idcard",
        "time": "1700000000",
        "img_base64": b64,
    }


def test_submit_by_url_signs_the_url() -> None:
    rec = Recorder(httpx.Response(200, json=BACK))
    client(rec).submit(ImagePayload(url="https://bucket.test/a b.png?X-Amz=1"))
    form = rec.form()
    assert "img_base64" not in form
    assert form["img_url"] == "https://bucket.test/a b.png?X-Amz=1"
    assert form["password"] == sign_submit("acct", "secret-key", "", form["img_url"], 1700000000)


def test_every_call_is_signed_with_a_fresh_time() -> None:
    rec = Recorder(httpx.Response(200, json={"code": 4010, "msg": "通道错误", "ocrid": "0", "content": {}}))
    times = iter([1700000000, 1700000007])
    c = IhuyiClient("acct", "k", "https://ocr.test", transport=httpx.MockTransport(rec), clock=lambda: next(times))
    c.submit(ImagePayload(data=b"x"))
    c.submit(ImagePayload(data=b"x"))
    assert [rec.form(i)["time"] for i in (0, 1)] == ["1700000000", "1700000007"]
    assert rec.form(0)["password"] != rec.form(1)["password"]


def test_front_is_normalised() -> None:
    r = client(Recorder(httpx.Response(200, json=FRONT))).submit(ImagePayload(data=b"x"))
    assert r.outcome is Outcome.OK and r.code == "2" and r.ocrid == "22101320041348318"
    assert r.side == "front"
    assert r.fields == {"name": "张三", "id_number": "11010119900307803X", "gender": "男",
                        "ethnicity": "汉", "date_of_birth": "1990-03-07", "domicile": "北京市东城区"}
    assert r.raw == FRONT


def test_back_is_normalised_and_long_term_kept() -> None:
    r = client(Recorder(httpx.Response(200, json=BACK))).submit(ImagePayload(data=b"x"))
    assert r.side == "back"
    assert r.fields == {"issue_authority": "上海市公安局徐汇分局", "valid_from": "2005-10-08", "valid_to": "2025-10-08"}
    side, fields = parse_content({"type": "back", "issue_authority": "x", "valid_period": "2010.01.02-长期"})
    assert fields["valid_to"] == "长期" and fields["valid_from"] == "2010-01-02"


def test_failure_example_from_the_seed() -> None:
    body = {"code": 405, "msg": "API ID或API KEY不正确", "ocrid": "0", "content": {}}
    r = client(Recorder(httpx.Response(200, json=body))).submit(ImagePayload(data=b"x"))
    assert r.outcome is Outcome.AUTH and r.code == "405" and r.ocrid is None and r.fields == {}


@pytest.mark.parametrize(
    "reply,outcome,code",
    [
        (httpx.Response(502, text="bad gateway"), Outcome.TRANSIENT, "http_502"),
        (httpx.Response(200, text="<html>oops</html>"), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json=[1, 2]), Outcome.TRANSIENT, "garbage"),
        (httpx.Response(200, json={"msg": "no code"}), Outcome.TRANSIENT, "garbage"),
        (httpx.ConnectError("refused"), Outcome.TRANSIENT, "connect"),
        (httpx.ReadTimeout("slow"), Outcome.UNKNOWN, "timeout"),
        (httpx.RemoteProtocolError("closed"), Outcome.UNKNOWN, "lost"),
    ],
)
def test_transport_failures_are_classified(reply, outcome, code) -> None:  # type: ignore[no-untyped-def]
    r = client(Recorder(reply)).submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code) == (outcome, code)


def test_balance_parses_num_as_string_or_int() -> None:
    for num in (123, "123"):
        rec = Recorder(httpx.Response(200, json={"code": 2, "msg": "查询成功", "num": num}))
        assert client(rec).balance() == 123
    form = rec.form()
    assert form == {"account": "acct", "app": "idcard", "time": "1700000000",
                    "password": sign_getnum("acct", "secret-key", 1700000000)}
    assert str(rec.requests[0].url) == "https://ocr.test/ocr/GetNum.json"


def test_balance_refusal_raises_with_class() -> None:
    from pipeline.providers.base import BalanceError

    rec = Recorder(httpx.Response(200, json={"code": 405, "msg": "API ID或API KEY不正确", "num": 0}))
    with pytest.raises(BalanceError) as info:
        client(rec).balance()
    assert info.value.result.outcome is Outcome.AUTH


def test_nothing_secret_in_repr_or_errors() -> None:
    c = client(Recorder(httpx.ConnectError("https://ocr.test/?appKey=secret-key")))
    assert "secret-key" not in repr(c)
    r = c.submit(ImagePayload(data=b"secret-bytes"))
    assert "secret" not in r.msg
    assert "secret" not in repr(ImagePayload(data=b"secret-bytes"))
