"""The sandbox over real HTTP on 127.0.0.1: both provider protocols, quota, faults, truth lookup."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipeline.providers.ihuyi_sign import sign_getnum, sign_submit
from idocr_sandbox.server import FaultPlan, SandboxConfig, SandboxServer
from idocr_sandbox.truth import TruthIndex, dhash

ACCOUNT, KEY, APPKEY = "sandbox", "sandbox-key", "sandbox-appkey"

FRONT = {
    "name": "张三",
    "gender": "男",
    "ethnicity": "汉",
    "date_of_birth": "1990-03-07",
    "domicile": "上海市徐汇区某路1号",
    "id_number": "110101199003074514",
}
BACK = {
    "issue_authority": "上海市公安局徐汇分局",
    "valid_from": "2005-10-08",
    "valid_to": "2025-10-08",
}
BACK_LONG = {
    "issue_authority": "北京市公安局东城分局",
    "valid_from": "2010-01-02",
    "valid_to": "长期",
}


def make_image(
    seed: int, size: tuple[int, int] = (640, 400), fmt: str = "JPEG", **save: int
) -> bytes:
    """A colour image of random blocks: distinct per seed, with structure a dhash can see."""
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    cols, rows = 10, 8
    bw, bh = size[0] // cols + 1, size[1] // rows + 1
    for r in range(rows):
        for c in range(cols):
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            img.paste(colour, (c * bw, r * bh, (c + 1) * bw, (r + 1) * bh))
    return encode(img, fmt, **save)


def encode(img: Image.Image, fmt: str = "JPEG", **save: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" and not save else save))
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {
        "front": make_image(1),
        "back": make_image(2),
        "back_long": make_image(3),
        "stranger": make_image(99),
    }


@pytest.fixture(scope="module")
def truth(images: dict[str, bytes]) -> TruthIndex:
    t = TruthIndex()
    t.add(images["front"], "front", FRONT)
    t.add(images["back"], "back", BACK)
    t.add(images["back_long"], "back", BACK_LONG)
    return t


@pytest.fixture
def server(truth: TruthIndex) -> Iterator[SandboxServer]:
    with SandboxServer(truth, SandboxConfig(seed=7)) as s:
        yield s


@pytest.fixture
def client(server: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as c:
        yield c


def submit(
    client: httpx.Client,
    img: bytes | None = None,
    *,
    url: str = "",
    account: str = ACCOUNT,
    key: str = KEY,
    t: int | str | None = None,
    password: str | None = None,
    app: str = "idcard",
    method: str = "POST",
) -> dict:
    img_b64 = b64(img) if img is not None else ""
    t = int(time.time()) if t is None else t
    params = {
        "account": account,
        "password": password
        if password is not None
        else sign_submit(account, key, img_b64, url, t, app),
        "app": app,
        "img_base64": img_b64,
        "img_url": url,
        "time": str(t),
    }
    if method == "GET":
        r = client.get("/ocr/Submit.json", params=params)
    else:
        r = client.post("/ocr/Submit.json", data=params)
    assert r.status_code == 200
    return r.json()


def getnum(client: httpx.Client, *, key: str = KEY, t: int | None = None) -> dict:
    t = int(time.time()) if t is None else t
    r = client.post(
        "/ocr/GetNum.json",
        data={
            "account": ACCOUNT,
            "password": sign_getnum(ACCOUNT, key, t),
            "app": "idcard",
            "time": str(t),
        },
    )
    assert r.status_code == 200
    return r.json()


def showapi(client: httpx.Client, img: bytes | None, appkey: str = APPKEY, **form: str) -> dict:
    data = {"imgData": b64(img) if img is not None else "", "type": "", "needQuality": "0"}
    data.update(form)
    r = client.post("/1429-1", params={"appKey": appkey}, data=data)
    assert r.status_code == 200
    return r.json()


# ---------------------------------------------------------------------------- ihuyi


def test_ihuyi_front_success_in_ihuyi_format(client, server, images):
    before = server.remaining
    res = submit(client, images["front"])
    assert res["code"] == 2 and res["msg"] == "提交成功"
    assert len(res["ocrid"]) == 17 and res["ocrid"].isdigit()
    assert res["content"] == {
        "code": 2,
        "type": "front",
        "name": "张三",
        "id_number": "110101199003074514",
        "gender": "男",
        "ethnicity": "汉",
        "data_of_birth": "1990.03.07",  # seed 000's spelling and date form
        "domicile": "上海市徐汇区某路1号",
    }
    assert server.remaining == before - 1
    assert server.stats.billed_by_sha == {hashlib.sha256(images["front"]).hexdigest(): 1}


def test_ihuyi_back_valid_period(client, images):
    res = submit(client, images["back"])
    assert res["content"] == {
        "code": 2,
        "type": "back",
        "issue_authority": "上海市公安局徐汇分局",
        "valid_period": "2005.10.08-2025.10.08",
    }
    res = submit(client, images["back_long"])
    assert res["content"]["valid_period"] == "2010.01.02-长期"


def test_ocrids_are_unique(client, images):
    ids = {submit(client, images["front"])["ocrid"] for _ in range(5)}
    assert len(ids) == 5


def test_signature_rejected_and_stale_time(client, server, images):
    assert submit(client, images["front"], key="wrong-key")["code"] == 40502
    stale = int(time.time()) - 310
    assert submit(client, images["front"], t=stale)["code"] == 40501
    future = int(time.time()) + 310
    assert submit(client, images["front"], t=future)["code"] == 40501
    # within the skew is fine
    assert submit(client, images["front"], t=int(time.time()) - 200)["code"] == 2
    # a dynamic password needs a 10-digit time
    pw = sign_submit(ACCOUNT, KEY, b64(images["front"]), "", "123")
    assert submit(client, images["front"], t="123", password=pw)["code"] == 40501
    assert server.stats.billed == 1


def test_plain_key_mode_time_optional(client, images):
    r = client.post(
        "/ocr/Submit.json",
        data={
            "account": ACCOUNT,
            "password": KEY,
            "app": "idcard",
            "img_base64": b64(images["front"]),
        },
    )
    assert r.json()["code"] == 2
    # a wrong plain key is a wrong key, not a failed signature
    res = submit(client, images["front"], password="not-the-key")
    assert res["code"] == 405


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"account": ""}, 401),
        ({"password": ""}, 402),
        ({"app": "bankcard"}, 403),
        ({"account": "someone"}, 405),
        ({"img_base64": ""}, 404),
        ({"img_url": "http://127.0.0.1:9/x.jpg"}, 404),  # both given
    ],
)
def test_ihuyi_auth_codes(client, server, images, change, code):
    img_b64 = b64(images["front"])
    t = str(int(time.time()))
    params = {
        "account": ACCOUNT,
        "password": sign_submit(ACCOUNT, KEY, img_b64, "", t),
        "app": "idcard",
        "img_base64": img_b64,
        "time": t,
    }
    params.update(change)
    res = client.post("/ocr/Submit.json", data=params).json()
    assert res["code"] == code
    assert res["ocrid"] == "0" and res["content"] == {}
    assert server.stats.billed == 0


def test_auth_check_order(client):
    # everything wrong at once: the first check in seed order answers
    res = client.post("/ocr/Submit.json", data={"app": "x"}).json()
    assert res["code"] == 401
    res = client.post("/ocr/Submit.json", data={"account": "x", "app": "x"}).json()
    assert res["code"] == 402


def test_ihuyi_get_and_seed_url_quirk(client, images):
    assert submit(client, images["front"], method="GET")["code"] == 2
    # seed 000 §2.6 writes "Submit.json&account=…" with no "?"
    r = client.get(f"/ocr/Submit.json&account={ACCOUNT}&password={KEY}&app=idcard&img_url=")
    assert r.json()["code"] == 404


def test_quota_countdown_to_4051_and_getnum(client, server, images):
    server.set_quota(2)
    assert getnum(client) == {"code": 2, "msg": "查询成功", "num": 2}
    assert submit(client, images["front"])["code"] == 2
    assert getnum(client)["num"] == 1
    assert submit(client, images["back"])["code"] == 2
    res = submit(client, images["front"])
    assert res["code"] == 4051 and res["msg"] == "剩余次数不足"
    assert getnum(client)["num"] == 0
    assert server.stats.billed == 2  # the refused call is not billed
    server.add_quota(1)
    assert submit(client, images["front"])["code"] == 2
    assert server.remaining == 0


def test_getnum_auth(client):
    assert getnum(client, key="wrong")["code"] == 40502
    assert getnum(client, t=int(time.time()) - 1000)["code"] == 40501
    r = client.get(
        "/ocr/GetNum.json", params={"account": ACCOUNT, "password": KEY, "app": "idcard"}
    )
    assert r.json()["code"] == 2
    r = client.get(
        "/ocr/GetNum.json", params={"account": "nobody", "password": KEY, "app": "idcard"}
    )
    assert r.json() == {"code": 405, "msg": "API ID或API KEY不正确", "num": 0}


def test_unknown_and_undecodable_images_are_4086_and_billed(client, server, images):
    res = submit(client, images["stranger"])
    assert res["code"] == 4086 and "样本库" in res["msg"]
    res = submit(client, b"this is not an image")
    assert res["code"] == 4086 and "解码" in res["msg"]
    r = client.post(
        "/ocr/Submit.json",
        data={"account": ACCOUNT, "password": KEY, "app": "idcard", "img_base64": "@@not base64@@"},
    )
    assert r.json()["code"] == 4086 and "base64" in r.json()["msg"]
    assert server.stats.billed == 3
    assert server.stats.billed_unhashed == 1  # the bad base64 had no bytes to hash
    assert server.stats.codes["ihuyi"] == {"4086": 3}


@pytest.fixture
def image_host(images) -> Iterator[str]:
    """A plain HTTP server the sandbox can fetch img_url from."""
    files = {"/front.jpg": images["front"]}

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = files.get(self.path)
            self.send_response(200 if data else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *a: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_img_url(client, server, image_host):
    res = submit(client, url=f"{image_host}/front.jpg")
    assert res["code"] == 2 and res["content"]["type"] == "front"
    res = submit(client, url=f"{image_host}/missing.jpg")
    assert res["code"] == 4086 and "HTTP 404" in res["msg"]
    res = submit(client, url="http://127.0.0.1:9/refused.jpg")
    assert res["code"] == 4086 and "下载失败" in res["msg"]
    assert server.stats.billed == 3


# ---------------------------------------------------------------------------- showapi


def test_showapi_front(client, images):
    res = showapi(client, images["front"], type="1")
    assert res["showapi_res_code"] == 0 and res["showapi_res_error"] == ""
    assert len(res["showapi_res_id"]) == 32
    int(res["showapi_res_id"], 16)
    assert res["showapi_res_body"] == {
        "ret_code": 0,
        "flag": True,
        "msg": "识别成功!",
        "name": "张三",
        "sex": "男",
        "nationality": "汉",
        "birthday": "1990-03-07",
        "addr": "上海市徐汇区某路1号",
        "idNo": "110101199003074514",
    }
    res = showapi(client, images["front"], needQuality="1")
    assert res["showapi_res_body"]["quality"] == ["photo"]


def test_showapi_back(client, images):
    body = showapi(client, images["back"], type="2")["showapi_res_body"]
    assert body["depInfo"] == "上海市公安局徐汇分局"
    assert body["effDate"] == body["effBeginDate"] == "2005-10-08"
    assert body["effEndDate"] == "2025-10-08"
    assert "quality" not in body
    body = showapi(client, images["back_long"])["showapi_res_body"]
    assert body["effEndDate"] == "长期有效"


def test_showapi_errors(client, server, images):
    res = showapi(client, images["front"], appkey="wrong")
    assert res["showapi_res_code"] == -1 and "appKey" in res["showapi_res_error"]
    r = client.post("/1429-1", data={"imgData": b64(images["front"])})  # no appKey at all
    assert r.json()["showapi_res_code"] == -1
    assert server.stats.billed == 0

    body = showapi(client, images["stranger"])["showapi_res_body"]
    assert body["ret_code"] != 0 and body["flag"] is False and body["msg"]
    body = showapi(client, images["back"], type="1")["showapi_res_body"]  # wrong side asked
    assert body["flag"] is False
    assert server.stats.billed == 2

    body = showapi(client, None)["showapi_res_body"]  # no image: a parameter error
    assert body["flag"] is False
    body = showapi(client, images["front"], type="3")["showapi_res_body"]
    assert body["flag"] is False
    assert server.stats.billed == 2


def test_showapi_quota_shared_with_ihuyi(client, server, images):
    server.set_quota(1)
    assert submit(client, images["front"])["code"] == 2
    res = showapi(client, images["front"])
    assert res["showapi_res_code"] == -2 and res["showapi_res_error"] == "剩余次数不足"
    assert server.stats.billed == 1


def test_showapi_img_url(client, image_host):
    r = client.post(
        "/1429-1", params={"appKey": APPKEY}, data={"imgUrl": f"{image_host}/front.jpg"}
    )
    assert r.json()["showapi_res_body"]["idNo"] == "110101199003074514"


# ---------------------------------------------------------------------------- faults


def faulty(truth: TruthIndex, plan: str, **kw) -> SandboxServer:
    return SandboxServer(truth, SandboxConfig(faults=FaultPlan.parse(plan), seed=42, **kw)).start()


def test_fault_http_500_and_garbage_not_billed(truth, images):
    with faulty(truth, "http_500=1") as s, httpx.Client(base_url=s.url, trust_env=False) as c:
        for _ in range(3):
            assert (
                c.post(
                    "/ocr/Submit.json",
                    data={
                        "account": ACCOUNT,
                        "password": KEY,
                        "app": "idcard",
                        "img_base64": b64(images["front"]),
                    },
                ).status_code
                == 500
            )
        r = c.post("/1429-1", params={"appKey": APPKEY}, data={"imgData": b64(images["front"])})
        assert r.status_code == 500
        # auth is checked before faults: a wrong key is still answered as such
        assert submit(c, images["front"], key="wrong")["code"] == 40502
        assert s.stats.billed == 0 and s.stats.faults == {"http_500": 4}
        assert getnum(c)["code"] == 2  # GetNum is not a billable request: no faults
    with faulty(truth, "garbage=1") as s, httpx.Client(base_url=s.url, trust_env=False) as c:
        r = c.post(
            "/ocr/Submit.json",
            data={
                "account": ACCOUNT,
                "password": KEY,
                "app": "idcard",
                "img_base64": b64(images["front"]),
            },
        )
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.text)
        assert s.stats.billed == 0


def test_fault_codes(truth, images):
    with (
        faulty(truth, "code:4010=1,code:-3=1") as s,
        httpx.Client(base_url=s.url, trust_env=False) as c,
    ):
        res = submit(c, images["front"])
        assert res == {"code": 4010, "msg": "通道错误", "ocrid": "0", "content": {}}
        assert showapi(c, images["front"])["showapi_res_code"] == -3
        assert s.stats.billed == 0
        assert s.stats.faults == {"code:ihuyi:4010": 1, "code:showapi:-3": 1}


def test_fault_plan_is_deterministic_with_a_seed(truth, images):
    def run() -> list[int]:
        out = []
        with (
            faulty(truth, "http_500=0.3,code:1=0.3") as s,
            httpx.Client(base_url=s.url, trust_env=False) as c,
        ):
            for _ in range(30):
                r = c.post(
                    "/ocr/Submit.json",
                    data={
                        "account": ACCOUNT,
                        "password": KEY,
                        "app": "idcard",
                        "img_base64": b64(images["front"]),
                    },
                )
                out.append(
                    r.status_code * 100_000 + (r.json()["code"] if r.status_code == 200 else 0)
                )
        return out

    first, second = run(), run()
    assert first == second
    assert len(set(first)) == 3  # 500s, code 1 and successes all occurred


def test_fault_timeout_not_billed(truth, images):
    with (
        faulty(truth, "timeout=1,timeout_sleep=3") as s,
        httpx.Client(base_url=s.url, trust_env=False, timeout=0.5) as c,
    ):
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            submit(c, images["front"])
        assert time.monotonic() - t0 < 2
        assert s.stats.billed == 0 and s.stats.faults == {"timeout": 1}
        assert s.remaining == 10_000
        t0 = time.monotonic()
    # stop() woke the sleeping handler instead of waiting the 3 s out
    assert time.monotonic() - t0 < 2


def test_fault_lost_after_billing(truth, images):
    with (
        faulty(truth, "lost_after_billing=1") as s,
        httpx.Client(base_url=s.url, trust_env=False) as c,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            submit(c, images["front"])
        with pytest.raises(httpx.RemoteProtocolError):
            showapi(c, images["back"])
        assert s.stats.billed == 2 and s.remaining == 9_998
        lost = s.stats.lost_ocrids
        assert len(lost) == 2 and all(len(o) == 17 for o in lost)
        assert [c.lost for c in s.stats.calls()] == [True, True]
        s.set_quota(0)  # nothing left to bill: the answer comes through
        assert submit(c, images["front"])["code"] == 4051


def test_fault_plan_parse():
    p = FaultPlan.parse("http_500=0.05, garbage=0.05,code:4010=0.1,lost_after_billing=0.02")
    assert (p.http_500, p.garbage, p.lost_after_billing, p.codes) == (
        0.05,
        0.05,
        0.02,
        {"4010": 0.1},
    )
    assert FaultPlan.parse(str(p)) == p
    assert FaultPlan.parse("") == FaultPlan() == FaultPlan.parse("none")
    assert not FaultPlan().active and p.active
    assert FaultPlan.parse("code:showapi:-2=0.5,timeout=0.1,timeout_sleep=2").timeout_sleep == 2
    for bad in (
        "http_500=2",
        "nonsense=0.1",
        "http_500",
        "code:2=0.1",
        "code:abc=0.1",
        "garbage=x",
    ):
        with pytest.raises(ValueError):
            FaultPlan.parse(bad)


def test_latency(truth, images):
    with (
        SandboxServer(truth, SandboxConfig(latency=0.3)) as s,
        httpx.Client(base_url=s.url, trust_env=False) as c,
    ):
        t0 = time.monotonic()
        assert submit(c, images["front"])["code"] == 2
        assert time.monotonic() - t0 >= 0.3


# ---------------------------------------------------------------------------- truth lookup


def test_perceptual_match_after_reencode_and_resize(client, truth, images):
    original = Image.open(io.BytesIO(images["front"]))
    variants = {
        "jpeg q=50": encode(original, "JPEG", quality=50),
        "png": encode(original, "PNG"),
        "half size": encode(
            original.resize((320, 200), Image.Resampling.LANCZOS), "JPEG", quality=85
        ),
    }
    for name, data in variants.items():
        assert hashlib.sha256(data).digest() != hashlib.sha256(images["front"]).digest()
        m = truth.match(data)
        assert m.entry is not None and m.reason == "dhash", name
        assert m.entry.fields["name"] == "张三"
        assert submit(client, data)["content"]["name"] == "张三", name
    assert truth.match(images["front"]).reason == "sha256"
    assert truth.lookup(images["stranger"]) is None
    assert truth.lookup(b"\x89PNG\r\n\x1a\n broken") is None
    assert truth.lookup(images["front"][: len(images["front"]) // 2]) is None  # truncated JPEG


def test_truth_file_loading(tmp_path: Path, images):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "f.jpg").write_bytes(images["front"])
    missing_sha = hashlib.sha256(images["back"]).hexdigest()
    doc = {
        "images": [
            {
                "file": "images/f.jpg",
                "sha256": hashlib.sha256(images["front"]).hexdigest(),
                "side": "front",
                "fields": FRONT,
            },
            # the file is gone: exact sha256 match still works, perceptual cannot
            {"file": "images/gone.jpg", "sha256": missing_sha, "side": "back", "fields": BACK},
        ]
    }
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    t = TruthIndex.load(path)
    assert len(t) == 2
    assert t.lookup(images["back"]).fields["valid_to"] == "2025-10-08"
    reencoded = encode(Image.open(io.BytesIO(images["front"])), "JPEG", quality=60)
    assert t.lookup(reencoded).fields["id_number"] == FRONT["id_number"]
    back_reencoded = encode(Image.open(io.BytesIO(images["back"])), "JPEG", quality=60)
    assert t.lookup(back_reencoded) is None

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"sha256": "ab", "side": "left", "fields": {}}]}))
    with pytest.raises(ValueError):
        TruthIndex.load(bad)
    with pytest.raises(ValueError):
        TruthIndex().add(b"not an image", "front", FRONT)


def test_dhash_distinguishes_images(images):
    hashes = [dhash(images[k]) for k in ("front", "back", "back_long", "stranger")]
    assert all(h is not None for h in hashes)
    for i, a in enumerate(hashes):
        for b in hashes[i + 1 :]:
            assert (a ^ b).bit_count() > 6  # type: ignore[operator]


# ---------------------------------------------------------------------------- control + stats


def test_control_endpoints(client, server, images):
    submit(client, images["front"])
    submit(client, images["front"])
    submit(client, images["back"])
    stats = client.get("/_sandbox/stats").json()
    assert stats["billed"] == 3
    assert stats["billed_by_sha"][hashlib.sha256(images["front"]).hexdigest()] == 2
    assert stats["requests"] == 3 and stats["codes"]["ihuyi"] == {"2": 3}
    assert sum(stats["submits_per_second"].values()) == 3
    assert stats["remaining"] == server.remaining == 9_997
    assert server.stats.billed_twice() == {hashlib.sha256(images["front"]).hexdigest(): 2}
    assert "calls" not in stats
    calls = client.get("/_sandbox/stats", params={"calls": "1"}).json()["calls"]
    assert len(calls) == 3 and {c["code"] for c in calls} == {"2"}

    assert client.post("/_sandbox/quota", json={"set": 5}).json() == {"remaining": 5}
    assert client.post("/_sandbox/quota", json={"add": 3}).json() == {"remaining": 8}
    assert server.remaining == 8
    assert client.post("/_sandbox/quota", json={"bogus": 1}).status_code == 400
    assert client.post("/_sandbox/quota", content=b"{nope").status_code == 400
    assert client.get("/_sandbox/quota").status_code == 405
    assert client.get("/_sandbox/nothing").status_code == 404
    assert client.get("/_sandbox/health").json() == {"ok": True}

    assert client.post("/_sandbox/faults", json={"plan": "http_500=1"}).json() == {
        "plan": "http_500=1"
    }
    assert (
        client.post(
            "/ocr/Submit.json",
            data={
                "account": ACCOUNT,
                "password": KEY,
                "app": "idcard",
                "img_base64": b64(images["front"]),
            },
        ).status_code
        == 500
    )
    client.post("/_sandbox/faults", json={"plan": "none"})
    assert client.post("/_sandbox/reset", json={}).json()["ok"] is True
    assert server.stats.billed == 0
    # control requests are not provider requests
    assert server.stats.requests == 0


def test_cli_in_another_process(tmp_path: Path, images):
    (tmp_path / "f.jpg").write_bytes(images["front"])
    truth = tmp_path / "truth.json"
    truth.write_text(
        json.dumps({"images": [{"file": "f.jpg", "side": "front", "fields": FRONT}]}),
        encoding="utf-8",
    )
    url_file = tmp_path / "url"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "IDOCR_SANDBOX_QUOTA": "5",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idocr_sandbox.server",
            "--truth",
            str(truth),
            "--url-file",
            str(url_file),
            "--faults",
            "none",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (url_file.exists() and url_file.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.Client(base_url=url_file.read_text().strip(), trust_env=False) as c:
            for _ in range(100):
                try:
                    c.get("/_sandbox/health")
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)
            assert submit(c, images["front"])["code"] == 2  # sha256 computed from the file
            assert c.get("/_sandbox/stats").json()["remaining"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------- robustness


def raw_request(server: SandboxServer, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_odd_input_never_crashes(client, server, images):
    assert client.get("/nowhere").status_code == 404
    assert client.get("/nowhere").json()["error"] == "unknown path"
    assert client.put("/ocr/Submit.json").status_code == 501
    out = raw_request(server, b"GARBAGE\r\n\r\n")
    assert out.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400"))
    assert b'"error"' in out
    out = raw_request(server, b"POST /ocr/Submit.json HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
    assert b" 400 " in out.split(b"\r\n")[0]
    out = raw_request(
        server, b"POST /ocr/Submit.json HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"
    )
    assert b" 413 " in out.split(b"\r\n")[0]
    # undecodable bytes and a non-UTF-8 body
    r = client.post(
        "/ocr/Submit.json",
        content=b"\xff\xfe\x00account=\xff",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and r.json()["code"] in (401, 402)
    # multipart and chunked bodies are read too
    r = client.post(
        "/ocr/Submit.json",
        data={"account": ACCOUNT, "password": KEY, "app": "idcard"},
        files={"img_base64": (None, b64(images["front"]))},
    )
    assert r.json()["code"] == 2
    form = f"account={ACCOUNT}&password={KEY}&app=idcard&img_base64=".encode()
    value = urllib.parse.quote(b64(images["front"]), safe="").encode()
    r = client.post(
        "/ocr/Submit.json",
        content=iter([form, value]),  # an iterator body goes out chunked
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.json()["code"] == 2
    # and the server still answers normally
    assert submit(client, images["front"])["code"] == 2


def test_logs_carry_no_secrets_or_images(client, server, images, caplog):
    caplog.set_level(logging.DEBUG, logger="idocr_sandbox")
    img_b64 = b64(images["front"])
    submit(client, images["front"], method="GET")
    submit(client, images["front"])
    showapi(client, images["front"])
    # a request line too long to parse, and one that is not HTTP: the stdlib's own error
    # messages quote the request line, which carries the password here
    line = f"GET /ocr/Submit.json?password={KEY}&x={'x' * 70000} HTTP/1.1\r\n\r\n"
    assert b" 414 " in raw_request(server, line.encode()).split(b"\r\n")[0]
    assert b" 400 " in raw_request(server, f"{KEY} {KEY}\r\n\r\n".encode()).split(b"\r\n")[0]
    text = caplog.text
    assert "/ocr/Submit.json" in text  # the path is logged at debug
    for secret in (KEY, APPKEY, img_b64[:40], FRONT["id_number"], FRONT["name"]):
        assert secret not in text


def test_concurrent_quota_never_overspent(truth, images):
    with SandboxServer(truth, SandboxConfig(quota=20)) as s:
        results: list[int] = []
        lock = threading.Lock()

        def worker() -> None:
            with httpx.Client(base_url=s.url, trust_env=False) as c:
                for _ in range(10):
                    code = submit(c, images["front"])["code"]
                    with lock:
                        results.append(code)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert results.count(2) == 20 and results.count(4051) == 60
        assert s.stats.billed == 20 and s.remaining == 0
        assert sum(s.stats.submits_per_second.values()) == 80


def test_check_image_limits(images):
    small = make_image(5, size=(200, 150))
    gray = encode(Image.open(io.BytesIO(make_image(6))).convert("L"), "JPEG", quality=90)
    t = TruthIndex()
    t.add(images["front"], "front", FRONT)
    t.add(small, "front", FRONT)
    t.add(gray, "front", FRONT)
    with (
        SandboxServer(t, SandboxConfig(check_image_limits=True)) as s,
        httpx.Client(base_url=s.url, trust_env=False) as c,
    ):
        assert submit(c, images["front"])["code"] == 2
        res = submit(c, small)
        assert res["code"] == 4086 and "尺寸" in res["msg"]
        res = submit(c, gray)
        assert res["code"] == 4086 and "黑白" in res["msg"]
        assert showapi(c, gray)["showapi_res_body"]["flag"] is False
    # off by default: any truth image is answered
    with SandboxServer(t, SandboxConfig()) as s, httpx.Client(base_url=s.url, trust_env=False) as c:
        assert submit(c, small)["code"] == 2
