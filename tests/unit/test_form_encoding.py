"""The form body is built by idocr itself (the generic quoter is too slow for image-sized values):
it must be byte for byte what ``urllib.parse.urlencode`` would send."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import urlencode

import httpx
from hypothesis import given
from hypothesis import strategies as st

from pipeline.providers.base import ImagePayload
from pipeline.providers.http import encode_form, quote_value
from pipeline.providers.ihuyi import IhuyiClient
from pipeline.providers.showapi import ShowapiClient

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@given(st.binary(max_size=300))
def test_base64_values_are_quoted_as_urlencode_quotes_them(data: bytes) -> None:
    b64 = base64.b64encode(data).decode("ascii")
    assert quote_value(b64) == urlencode({"": b64})[1:]


@given(st.lists(st.tuples(_text, _text | st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())), max_size=6))
def test_any_form_is_encoded_as_urlencode_encodes_it(pairs: list[tuple[str, str]]) -> None:
    assert encode_form(pairs) == urlencode(pairs).encode("ascii")


@given(_text, st.binary(max_size=300))
def test_a_base64_value_given_as_bytes_is_encoded_as_its_text(key: str, data: bytes) -> None:
    b64 = base64.b64encode(data)
    assert encode_form([(key, b64), ("t", "1")]) == urlencode({key: b64.decode(), "t": "1"}).encode()


def test_a_near_base64_value_takes_the_generic_path() -> None:
    for v in ("a b", "ab\n", "é+/=", "a-b_c.d~e", "100%", ""):
        assert quote_value(v) == urlencode({"": v})[1:]


class _Recorder:
    def __init__(self, reply: dict) -> None:  # type: ignore[type-arg]
        self.reply, self.bodies = reply, []  # type: ignore[var-annotated]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        return httpx.Response(200, json=self.reply)


def test_ihuyi_prepared_call_is_signed_anew_at_every_send() -> None:
    rec = _Recorder({"code": 4010, "msg": "通道错误"})
    times = iter([1700000000, 1700000009])
    c = IhuyiClient("账户 1", "k+/=", "https://ocr.test", transport=httpx.MockTransport(rec), clock=lambda: next(times))
    data = bytes(range(256)) * 40
    call = c.prepare(ImagePayload(data=data))
    assert "bytes" in repr(call) and "k+/=" not in repr(call)
    c.send(call)
    c.send(call)
    b64 = base64.b64encode(data).decode()
    for body, t in zip(rec.bodies, ("1700000000", "1700000009"), strict=True):
        password = hashlib.md5(f"账户 1k+/=idcard{b64}{t}".encode()).hexdigest()
        assert body == urlencode({"account": "账户 1", "password": password, "app": "idcard", "time": t, "img_base64": b64}).encode()


def test_showapi_body_is_the_urlencoded_form() -> None:
    rec = _Recorder({"showapi_res_code": 0, "showapi_res_body": {"ret_code": 0, "flag": True}})
    c = ShowapiClient("key", "https://route.test", transport=httpx.MockTransport(rec))
    data = b"\xff\xd8\xff" * 500
    c.submit(ImagePayload(data=data, side="back"))
    c.submit(ImagePayload(url="https://b.test/a b.png?X=1&Y=2"))
    assert rec.bodies == [
        urlencode({"type": "2", "needQuality": "1", "imgData": base64.b64encode(data).decode()}).encode(),
        urlencode({"type": "", "needQuality": "1", "imgUrl": "https://b.test/a b.png?X=1&Y=2"}).encode(),
    ]


def test_a_form_goes_to_the_transport_with_the_clients_headers_and_timeouts() -> None:
    """The provider's form skips httpx's client layer (cookies, redirects, hooks), never what
    the request needs: the client's headers, the form's content type, the query, and the
    timeouts (without them a provider that never answers would hold a thread for ever)."""
    from pipeline.providers.http import make_client, post_form

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"code": 2}, headers={"Set-Cookie": "s=1"})

    client = make_client(7.0, httpx.MockTransport(answer))
    body, failure, status = post_form(client, "https://p.example/ocr", b"a=1&b=%2B", {"k": "v"})
    assert (body, failure, status) == ({"code": 2}, None, 200)
    (req,) = seen
    assert req.method == "POST" and str(req.url) == "https://p.example/ocr?k=v"
    assert req.content == b"a=1&b=%2B"
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert req.headers["User-Agent"] == "idocr"
    assert req.headers["Content-Length"] == "9"
    assert req.extensions["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}
    post_form(client, "https://p.example/ocr", b"c=3")
    assert "cookie" not in seen[1].headers  # no cookie jar on this path
    client.close()


def test_without_httpx_transport_lookup_a_form_takes_the_public_path(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The shortcut leans on httpx's private ``_transport_for_url``: an httpx without it still
    sends every form, through ``Client.send``."""
    import pipeline.providers.http as http
    from pipeline.providers.http import make_client, post_form

    monkeypatch.setattr(http, "_TRANSPORT_LOOKUP", "_gone_in_this_httpx")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"code": 2})

    client = make_client(5.0, httpx.MockTransport(answer))
    assert post_form(client, "https://p.example/ocr", b"a=1") == ({"code": 2}, None, 200)
    assert seen[0].content == b"a=1" and seen[0].extensions["timeout"]["read"] == 5.0
    client.close()
