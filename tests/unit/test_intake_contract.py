"""The intake contract: the published JSON Schema is the model's, messages are read (or refused
with a reason) without ever raising anything else, and https URLs are checked address by
address (a resolver handed in: no network here)."""

from __future__ import annotations

import json

import pytest

from pipeline.domain import intake as contract
from pipeline.domain.intake import BadRequest, IntakeRequest, parse_message
from pipeline.sources.https import AddressRefused, check_url, is_public
from pipeline.sources.base import SourceError
from tests.conftest import ROOT


def test_the_published_schema_is_the_models() -> None:
    published = (ROOT / "docs" / "intake.schema.json").read_text(encoding="utf-8")
    assert published == contract.schema_text(), (
        "docs/intake.schema.json is stale: regenerate it with "
        "python -c 'from pipeline.domain.intake import schema_text; print(schema_text(), end=\"\")'"
    )
    schema = json.loads(published)
    assert schema["required"] == ["image", "key"]
    assert schema["additionalProperties"] is False


def _msg(obj: object, **extra: str) -> dict[bytes, bytes]:
    fields = {b"request": json.dumps(obj).encode()}
    fields.update({k.encode(): v.encode() for k, v in extra.items()})
    return fields


def test_a_message_round_trips_and_extra_fields_are_ignored() -> None:
    req = IntakeRequest(image="s3://b/k.jpg", key="crm-1", side="back", metadata={"a": 1})
    fields = {k.encode(): v.encode() for k, v in req.to_message("client").items()}
    fields[b"trace"] = b"ignored"
    got, channel = parse_message(fields)
    assert got == req and channel == "client"
    assert parse_message(_msg({"image": "s3://b/k", "key": "k"}))[1] == "stream"
    # a channel field other than "client" does not invent one
    assert parse_message(_msg({"image": "s3://b/k", "key": "k"}, channel="cli"))[1] == "stream"


@pytest.mark.parametrize(
    ("fields", "reason", "has_key"),
    [
        ({b"request": b"{not json"}, contract.MALFORMED, False),
        ({b"request": b"\xff\xfe"}, contract.MALFORMED, False),
        ({b"other": b"{}"}, contract.MALFORMED, False),
        (_msg([1, 2]), contract.MALFORMED, False),
        (_msg({"image": "s3://b/k"}), contract.NO_KEY, False),
        (_msg({"image": "s3://b/k", "key": "k1", "colour": "vermilion"}), contract.INVALID, True),
        (_msg({"image": "s3://b/k", "key": "bad key with spaces"}), contract.INVALID, False),
        (_msg({"image": "s3://b/k", "key": "x" * 129}), contract.INVALID, False),
        (_msg({"image": "s3://b/k", "key": 12}), contract.INVALID, False),
        (_msg({"image": "s3://b/k", "key": "k1", "side": "top"}), contract.INVALID, True),
        (_msg({"image": "s3://b/k", "key": "k1", "metadata": [1]}), contract.INVALID, True),
        (_msg({"image": "s3://b/k", "key": "k1", "metadata": {"x": "y" * 5000}}), contract.INVALID, True),
        (_msg({"image": "a\nb", "key": "k1"}), contract.INVALID, True),
        ({b"request": b"x" * (contract.MAX_MESSAGE_BYTES + 1)}, contract.TOO_LARGE, False),
    ],
)
def test_bad_messages_are_refused_with_a_reason(fields: dict[bytes, bytes], reason: str, has_key: bool) -> None:
    with pytest.raises(BadRequest) as info:
        parse_message(fields)
    assert info.value.reason == reason
    assert (info.value.key == "k1") is has_key
    # the reason names fields and limits, never the values sent
    assert "vermilion" not in info.value.text and "yyyy" not in info.value.text


def test_unknown_fields_are_named() -> None:
    with pytest.raises(BadRequest) as info:
        parse_message(_msg({"image": "s3://b/k", "key": "k1", "colour": "vermilion"}))
    assert "colour: unknown field" in info.value.detail


def test_synthetic_keys_never_meet_a_callers() -> None:
    key = contract.synthetic_key("idocr:intake", "1700000000000-0")
    assert not contract.valid_key(key)
    assert contract.valid_key("crm-4711") and contract.valid_key("a/b:c@d.e+f=g")


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        return table.get(host) or [host]  # an address resolves to itself

    return resolve


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1", "240.0.0.1"],
)
def test_internal_addresses_are_refused(address: str) -> None:
    assert not is_public(address)
    with pytest.raises(AddressRefused):
        check_url("https://cards.example.com/a.jpg", resolver=resolver({"cards.example.com": [address]}))
    # allowed only when configured so
    check_url("https://cards.example.com/a.jpg", allow_private=True,
              resolver=resolver({"cards.example.com": [address]}))


def test_every_address_of_a_host_is_checked() -> None:
    mixed = resolver({"h.example.com": ["93.184.216.34", "10.0.0.1"]})
    with pytest.raises(AddressRefused):
        check_url("https://h.example.com/x.jpg", resolver=mixed)
    ok = resolver({"h.example.com": ["93.184.216.34", "2606:2800:220:1::1"]})
    assert check_url("https://h.example.com:8443/x.jpg", resolver=ok)[:2] == ("h.example.com", 8443)


@pytest.mark.parametrize(
    "url", ["http://h.example.com/x.jpg", "https://user:pw@h.example.com/x.jpg", "https:///x.jpg",
            "https://h.example.com:99999/x"],
)
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(SourceError):
        check_url(url, resolver=resolver({"h.example.com": ["93.184.216.34"]}))


# -- fetching: redirects and sizes, through httpx's mock transport (no network) ------------------

import httpx  # noqa: E402

from pipeline.sources.https import fetch  # noqa: E402

PUBLIC = {"cards.example.com": ["93.184.216.34"], "cdn.example.net": ["151.101.1.1"],
          "internal.example.com": ["10.0.0.5"], "sneaky.example.com": ["93.184.216.35", "127.0.0.1"]}


def transport(routes: dict[str, httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return routes[request.headers["host"] + request.url.path]

    return httpx.MockTransport(handle)


def test_a_fetch_goes_to_the_checked_address_and_follows_public_redirects() -> None:
    seen: list[httpx.Request] = []
    routes = {
        "cards.example.com/a.jpg": httpx.Response(302, headers={"location": "https://cdn.example.net:8443/b.jpg"}),
        "cdn.example.net:8443/b.jpg": httpx.Response(200, content=b"JPEG"),
    }
    assert fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC),
                 transport=transport(routes, seen)) == b"JPEG"
    assert [r.url.host for r in seen] == ["93.184.216.34", "151.101.1.1"]
    assert [r.extensions["sni_hostname"] for r in seen] == ["cards.example.com", "cdn.example.net"]


@pytest.mark.parametrize("target", ["https://internal.example.com/x.jpg", "https://sneaky.example.com/x.jpg",
                                    "https://127.0.0.1/x.jpg"])
def test_a_redirect_to_an_internal_address_is_refused(target: str) -> None:
    seen: list[httpx.Request] = []
    routes = {"cards.example.com/a.jpg": httpx.Response(301, headers={"location": target})}
    with pytest.raises(AddressRefused):
        fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC), transport=transport(routes, seen))
    assert len(seen) == 1  # the internal address was never asked


def test_redirect_loops_and_large_bodies_are_refused() -> None:
    seen: list[httpx.Request] = []
    loop = {"cards.example.com/a.jpg": httpx.Response(302, headers={"location": "/a.jpg"})}
    with pytest.raises(SourceError, match="redirects more than"):
        fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC), transport=transport(loop, seen))
    big = {"cards.example.com/a.jpg": httpx.Response(200, content=b"x" * 2048)}
    with pytest.raises(SourceError, match="larger than 1024"):
        fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC), max_bytes=1024,
              transport=transport(big, seen))
    gone = {"cards.example.com/a.jpg": httpx.Response(404)}
    with pytest.raises(SourceError, match="HTTP 404"):
        fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC), transport=transport(gone, seen))


def test_transient_failures_are_tried_again_and_others_are_not() -> None:
    answers = [httpx.Response(503), httpx.Response(200, content=b"JPEG")]
    asked: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        asked.append(1)
        return answers.pop(0)

    assert fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC), backoff=0,
                 transport=httpx.MockTransport(flaky)) == b"JPEG"
    assert len(asked) == 2

    def refused(request: httpx.Request) -> httpx.Response:
        asked.append(1)
        raise httpx.ConnectError("refused")

    asked.clear()
    with pytest.raises(SourceError, match="could not be fetched"):
        fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC), backoff=0, attempts=3,
              transport=httpx.MockTransport(refused))
    assert len(asked) == 3
    asked.clear()
    with pytest.raises(SourceError, match="HTTP 403"):
        fetch("https://cards.example.com/a.jpg", resolver=resolver(PUBLIC), backoff=0,
              transport=httpx.MockTransport(lambda r: asked.append(1) or httpx.Response(403)))
    assert len(asked) == 1


def test_workers_read_https_images_through_the_scheme_registry(clean_env) -> None:  # type: ignore[no-untyped-def]
    from pipeline.sources import open_source, read_uri

    with pytest.raises(AddressRefused):  # the worker's own check, with this process's settings
        read_uri("https://127.0.0.1:9/a.jpg")
    with pytest.raises(SourceError, match="names one image"):
        open_source("https://cards.example.com/")


def test_idocr_submit_prints_an_answer_masked_and_its_fields_once() -> None:
    from pipeline.intake_cli import _lines, masked

    event = {"kind": "item.finished", "status": "succeeded", "batch": "intake-20261130", "item_id": 3,
             "fields": {"name": "高娟", "id_number": "110101195803020700", "valid_to": None},
             "record": {"name": "高娟", "id_number": "110101195803020700"},
             "request": {"idempotency_key": "crm-1", "meta": {"customer": "4711"}}}
    lines = _lines(masked(event))
    assert lines == ["kind: item.finished", "status: succeeded", "item_id: 3", "batch: intake-20261130",
                     "name: 高*", "id_number: 110101********0700"]
    assert "110101195803020700" not in json.dumps(masked(event), ensure_ascii=False)
