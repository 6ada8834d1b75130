"""The showapi client over real HTTP (127.0.0.1) against the sandbox's showapi emulation.

The sandbox answers from examples/truth.json, so recognised fields must equal the truth exactly;
its billing stats show which answers cost a call.
"""

from __future__ import annotations

import io
import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.providers.base import ImagePayload, Outcome
from pipeline.providers.showapi import ShowapiClient
from idocr_sandbox.server import FaultPlan
from tests.conftest import EXAMPLES

TRUTH: list[dict[str, Any]] = json.loads((EXAMPLES / "truth.json").read_text(encoding="utf-8"))["images"]
FRONTS = [e for e in TRUTH if e["side"] == "front"]
BACKS = [e for e in TRUTH if e["side"] == "back"]
APPKEY = "sandbox-appkey"  # the sandbox's default, not a secret


def image(entry: dict[str, Any]) -> bytes:
    return (EXAMPLES / entry["file"]).read_bytes()


def stranger() -> bytes:
    """A colour image no truth entry matches."""
    rng = random.Random(4242)
    img = Image.new("RGB", (640, 400))
    for r in range(8):
        for c in range(10):
            img.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (c * 65, r * 51, (c + 1) * 65, (r + 1) * 51))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture
def sandbox(sandbox_factory):  # type: ignore[no-untyped-def]
    return sandbox_factory(seed=3)


@pytest.fixture
def showapi(sandbox) -> Iterator[ShowapiClient]:  # type: ignore[no-untyped-def]
    c = ShowapiClient(APPKEY, sandbox.url, timeout=5)
    yield c
    c.close()


@pytest.mark.parametrize("entry", TRUTH, ids=[Path(e["file"]).name for e in TRUTH])
def test_examples_are_recognised_exactly(showapi: ShowapiClient, sandbox, entry: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    for side in (None, entry["side"]):  # auto-detected and told
        r = showapi.submit(ImagePayload(data=image(entry), side=side))
        assert (r.outcome, r.code, r.msg) == (Outcome.OK, "0", "识别成功!")
        assert r.side == entry["side"]
        assert r.fields == entry["fields"]
        assert r.extra == {"quality": ["photo"]}
        assert r.ocrid and len(r.ocrid) == 32 and int(r.ocrid, 16) >= 0
        assert r.http_status == 200
        assert r.raw["showapi_res_code"] == 0
    assert sandbox.stats.billed == 2


def test_long_term_back_is_long_term(showapi: ShowapiClient) -> None:
    entry = next(e for e in BACKS if e["fields"]["valid_to"] == "长期")
    r = showapi.submit(ImagePayload(data=image(entry), side="back"))
    assert r.raw["showapi_res_body"]["effEndDate"] == "长期有效"  # the wire form …
    assert r.fields["valid_to"] == "长期"  # … normalised


def test_without_quality(sandbox) -> None:  # type: ignore[no-untyped-def]
    with_q = ShowapiClient(APPKEY, sandbox.url, timeout=5, need_quality=False)
    r = with_q.submit(ImagePayload(data=image(FRONTS[0])))
    assert r.outcome is Outcome.OK and r.extra == {}
    with_q.close()


@pytest.fixture
def image_host() -> Iterator[str]:
    """A plain HTTP server the sandbox can fetch imgUrl from."""
    files = {"/front.jpg": image(FRONTS[0])}

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = files.get(self.path, b"")
            self.send_response(200 if data else 404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a: object) -> None:  # keep test output quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_image_by_url(showapi: ShowapiClient, image_host: str) -> None:
    r = showapi.submit(ImagePayload(url=f"{image_host}/front.jpg", side="front"))
    assert r.outcome is Outcome.OK and r.fields == FRONTS[0]["fields"]
    r = showapi.submit(ImagePayload(url=f"{image_host}/missing.jpg"))
    assert (r.outcome, r.code) == (Outcome.IMAGE, "ret_code:-1")


def test_wrong_key_is_auth_and_not_billed(sandbox) -> None:  # type: ignore[no-untyped-def]
    wrong = "wrong-appkey-0123456789"
    c = ShowapiClient(wrong, sandbox.url, timeout=5)
    r = c.submit(ImagePayload(data=image(FRONTS[0])))
    assert (r.outcome, r.code) == (Outcome.AUTH, "-1")
    assert wrong not in r.msg and wrong not in repr(c)
    assert r.fields == {}
    assert sandbox.stats.billed == 0
    c.close()


def test_quota_exhausted_is_quota(sandbox_factory) -> None:  # type: ignore[no-untyped-def]
    s = sandbox_factory(quota=0)
    c = ShowapiClient(APPKEY, s.url, timeout=5)
    r = c.submit(ImagePayload(data=image(FRONTS[0])))
    assert (r.outcome, r.code, r.msg) == (Outcome.QUOTA, "-2", "剩余次数不足")
    assert s.stats.billed == 0
    c.close()


def test_unknown_image_is_an_image_error_and_billed(showapi: ShowapiClient, sandbox) -> None:  # type: ignore[no-untyped-def]
    r = showapi.submit(ImagePayload(data=stranger()))
    assert (r.outcome, r.code) == (Outcome.IMAGE, "ret_code:-1")
    assert r.msg.startswith("识别失败") and r.fields == {} and r.side is None
    assert sandbox.stats.billed == 1  # the provider did the work


def test_wrong_side_told_is_an_image_error(showapi: ShowapiClient) -> None:
    r = showapi.submit(ImagePayload(data=image(BACKS[0]), side="front"))
    assert (r.outcome, r.code) == (Outcome.IMAGE, "ret_code:-1")


def test_undecodable_image_is_an_image_error(showapi: ShowapiClient) -> None:
    r = showapi.submit(ImagePayload(data=(EXAMPLES / "images" / "bad" / "truncated.jpg").read_bytes()))
    assert r.outcome is Outcome.IMAGE


@pytest.mark.parametrize(
    "plan,outcome,code",
    [
        ("code:-3=1", Outcome.TRANSIENT, "-3"),
        ("code:showapi:-2=1", Outcome.QUOTA, "-2"),
        ("code:showapi:-7=1", Outcome.TRANSIENT, "-7"),
        ("http_500=1", Outcome.TRANSIENT, "http_500"),
        ("garbage=1", Outcome.TRANSIENT, "garbage"),
        ("lost_after_billing=1", Outcome.UNKNOWN, "lost"),
    ],
)
def test_injected_faults(showapi: ShowapiClient, sandbox, plan: str, outcome: Outcome, code: str) -> None:  # type: ignore[no-untyped-def]
    sandbox.set_faults(FaultPlan.parse(plan))
    r = showapi.submit(ImagePayload(data=image(FRONTS[0])))
    assert (r.outcome, r.code) == (outcome, code)
    assert r.fields == {}
    assert APPKEY not in r.msg
    assert sandbox.stats.billed == (1 if plan.startswith("lost") else 0)


def test_timeout_is_unknown(sandbox) -> None:  # type: ignore[no-untyped-def]
    sandbox.set_faults(FaultPlan.parse("timeout=1,timeout_sleep=3"))
    c = ShowapiClient(APPKEY, sandbox.url, timeout=0.5)
    r = c.submit(ImagePayload(data=image(FRONTS[0])))
    assert (r.outcome, r.code) == (Outcome.UNKNOWN, "timeout")
    assert APPKEY not in r.msg
    c.close()


def test_connection_refused_is_transient() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ShowapiClient(APPKEY, f"http://127.0.0.1:{port}", timeout=2)
    r = c.submit(ImagePayload(data=b"x"))
    assert (r.outcome, r.code) == (Outcome.TRANSIENT, "connect")
    assert APPKEY not in r.msg
    c.close()
