"""The shared HTTP call: one request, every failure turned into a ProviderResult.

Whether a failed request may have been billed matters (we must not submit an image twice when
once will do), so failures are told apart: a request that never left (connect error or connect
timeout) is TRANSIENT; one that was sent but whose answer never came (read timeout, connection
closed mid-answer) is UNKNOWN — recorded as such, and retried only as transient work is.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote_plus

import httpx

from pipeline.providers.base import Outcome, ProviderResult

FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}

#: httpx's own (private) choice of transport for a URL, the one ``Client.send`` uses
_TRANSPORT_LOOKUP = "_transport_for_url"


class ProviderHTTP(httpx.Client):
    """The HTTP client of a provider: one pool shared by a worker's threads; connecting may take
    at most 10 s even when answers may take longer.

    :meth:`post_body` hands its request to the transport the client mounted for the URL (so
    proxies from the environment still apply), past httpx's client layer: a provider call needs
    no cookie jar, redirect, auth or event hook, and that layer cost about as much CPU as the
    transport itself (the cookie jar alone ~0.1 ms a call)."""

    def __init__(self, timeout: float, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            headers={"User-Agent": "idocr"},
        )
        self._form_headers = httpx.Headers({**self.headers, **FORM_HEADERS})
        self._timeouts = self.timeout.as_dict()

    def post_body(
        self, url: str, body: bytes, params: dict[str, str] | None = None
    ) -> httpx.Response:
        """POST ``body`` as a form; the answer read whole, its connection back in the pool."""
        request = httpx.Request(
            "POST",
            url,
            params=params,
            content=body,
            headers=self._form_headers,
            extensions={"timeout": self._timeouts},
        )
        pick = getattr(self, _TRANSPORT_LOOKUP, None)
        if pick is None:  # an httpx without it: the public path, cookie jar and all
            return self.send(request)
        response = pick(request.url).handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        return response


def make_client(timeout: float, transport: httpx.BaseTransport | None = None) -> ProviderHTTP:
    """The HTTP client of a provider (:class:`ProviderHTTP`)."""
    return ProviderHTTP(timeout, transport)


_BASE64 = re.compile(r"[A-Za-z0-9+/=]*")


def quote_value(value: str) -> str:
    """``urllib.parse.quote_plus(value, safe="")``, what form encoding does to each value, with
    base64 text done at C speed: the generic quoter walks a 1 MB image string byte by byte in
    Python (about 200 ms, holding the GIL that the worker's other threads need to send on time)."""
    if _BASE64.fullmatch(value):
        return value.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    return quote_plus(value, safe="")


def quote_base64(b64: bytes) -> bytes:
    """:func:`quote_value` of base64 text kept as bytes (an image): only ``+``, ``/`` and ``=``
    need escaping, and the text is never decoded to ``str`` and encoded back."""
    return b64.replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


def encode_form(pairs: Iterable[tuple[str, str | bytes]]) -> bytes:
    """``application/x-www-form-urlencoded`` (UTF-8), byte for byte what ``urlencode`` makes.
    A ``bytes`` value is base64 text (see :func:`quote_base64`)."""
    parts: list[bytes] = []
    for k, v in pairs:
        if parts:
            parts.append(b"&")
        parts.append(quote_plus(k, safe="").encode("ascii") + b"=")
        parts.append(quote_base64(v) if isinstance(v, bytes) else quote_value(v).encode("ascii"))
    return b"".join(parts)


def post_form(
    client: ProviderHTTP,
    url: str,
    form: dict[str, str] | bytes,
    params: dict[str, str] | None = None,
) -> tuple[Any, ProviderResult | None, int | None]:
    """POST a form (fields, or a body made by :func:`encode_form`); returns (parsed JSON body,
    None, status) or (None, failure result, status).

    Exceptions are summarised by class only: httpx messages can echo the request URL, whose
    query may carry a key (showapi's appKey).
    """
    body = form if isinstance(form, bytes) else encode_form(form.items())
    try:
        resp = client.post_body(url, body, params)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        return (
            None,
            _fail(Outcome.TRANSIENT, "connect", f"connection failed ({type(exc).__name__})"),
            None,
        )
    except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
        return (
            None,
            _fail(
                Outcome.UNKNOWN,
                "timeout",
                f"no answer in time ({type(exc).__name__}); the call may have been billed",
            ),
            None,
        )
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return (
            None,
            _fail(
                Outcome.UNKNOWN,
                "lost",
                f"connection closed before an answer ({type(exc).__name__}); "
                "the call may have been billed",
            ),
            None,
        )
    except httpx.HTTPError as exc:
        return None, _fail(Outcome.TRANSIENT, "http", f"HTTP error ({type(exc).__name__})"), None
    if resp.status_code >= 500:
        return (
            None,
            _fail(
                Outcome.TRANSIENT,
                f"http_{resp.status_code}",
                f"server error HTTP {resp.status_code}",
                resp.status_code,
            ),
            resp.status_code,
        )
    if resp.status_code >= 400:
        # 4xx from a gateway: our request or our account is wrong; retrying will not help.
        return (
            None,
            _fail(
                Outcome.AUTH if resp.status_code in (401, 403) else Outcome.ERROR,
                f"http_{resp.status_code}",
                f"HTTP {resp.status_code} from the provider",
                resp.status_code,
            ),
            resp.status_code,
        )
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return (
            None,
            _fail(
                Outcome.TRANSIENT,
                "garbage",
                f"unparseable response body ({len(resp.content)} bytes, HTTP {resp.status_code})",
                resp.status_code,
            ),
            resp.status_code,
        )
    if not isinstance(body, dict):
        return (
            None,
            _fail(
                Outcome.TRANSIENT, "garbage", "response body is not a JSON object", resp.status_code
            ),
            resp.status_code,
        )
    return body, None, resp.status_code


def _fail(outcome: Outcome, code: str, msg: str, status: int | None = None) -> ProviderResult:
    return ProviderResult(outcome=outcome, code=code, msg=msg, http_status=status)


def now() -> int:
    return int(time.time())
