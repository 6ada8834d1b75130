"""Images named by an ``https://`` URL (intake requests): fetched by the worker that sends them.

A URL handed over by another system must not make idocr a way into its own network: the host is
resolved and every address it resolves to must be public (not private, loopback, link-local,
shared, reserved or multicast) unless ``IDOCR_INTAKE_ALLOW_PRIVATE=true``; the connection then
goes to an address that was checked (the certificate is still verified against the host name),
so a second DNS answer cannot redirect it. Redirects are followed by hand, at most
:data:`MAX_REDIRECTS`, each hop checked the same way. The body is capped at the size S3 objects
are (:data:`pipeline.sources.s3.DEFAULT_MAX_BYTES`), judged from ``Content-Length`` first and
then while reading.

Errors name the host's kind of address, never the URL (its query may carry a signature).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from pipeline.sources.base import SourceError

MAX_REDIRECTS = 3
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

Resolver = Callable[[str, int], list[str]]


class AddressRefused(SourceError):
    """The URL's host is (or resolves to) an address idocr does not fetch from."""


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise SourceError("the image URL's host does not resolve") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(address: str) -> bool:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            ip = mapped
        elif ip.teredo is not None:
            ip = ip.teredo[1]
    return bool(ip.is_global) and not ip.is_multicast and not ip.is_reserved


def check_url(
    url: str, *, allow_private: bool = False, resolver: Resolver = system_resolver
) -> tuple[str, int, list[str]]:
    """(host, port, addresses) of an https URL whose every address may be fetched from;
    :class:`AddressRefused` or :class:`SourceError` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        raise SourceError("the image URL is not a valid URL") from None
    if parts.scheme.lower() != "https":
        raise SourceError("only https:// image URLs are fetched")
    if parts.username is not None or parts.password is not None:
        raise SourceError("the image URL must not carry credentials")
    host = parts.hostname
    if not host:
        raise SourceError("the image URL has no host")
    addresses = resolver(host, port)
    if not addresses:
        raise SourceError("the image URL's host does not resolve")
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise AddressRefused(
                    "the image URL's host is or resolves to a private, loopback, link-local or "
                    "otherwise internal address (IDOCR_INTAKE_ALLOW_PRIVATE=true allows it)"
                )
    return host, port, addresses


class _Transient(SourceError):
    """A failure worth another try: the network, a timeout, HTTP 429 or 5xx."""


def fetch(
    url: str,
    *,
    allow_private: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
    resolver: Resolver = system_resolver,
    verify: Any = True,
    transport: httpx.BaseTransport | None = None,
    attempts: int = 3,
    backoff: float = 0.5,
) -> bytes:
    """The body behind an https URL, fetched as the module's docstring says; a transient
    failure is tried again (``attempts`` in all, waiting ``backoff`` seconds, doubled each
    time). ``verify``: a CA bundle or SSL context instead of the system's; ``transport``: for
    tests."""
    with httpx.Client(
        timeout=timeout, follow_redirects=False, verify=verify, transport=transport
    ) as client:
        for attempt in range(attempts):
            try:
                return _fetch_once(client, url, allow_private, max_bytes, resolver)
            except _Transient as exc:
                if attempt == attempts - 1:
                    raise SourceError(str(exc)) from None
                time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def _fetch_once(
    client: httpx.Client, url: str, allow_private: bool, max_bytes: int, resolver: Resolver
) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        host, port, addresses = check_url(url, allow_private=allow_private, resolver=resolver)
        target = httpx.URL(url).copy_with(host=addresses[0])
        headers = {
            "Host": host if port == 443 else f"{host}:{port}",
            "Accept": "image/*, application/pdf",
            "Accept-Encoding": "identity",
        }
        try:
            with client.stream(
                "GET", target, headers=headers, extensions={"sni_hostname": host}
            ) as resp:
                if resp.is_redirect:
                    location = resp.headers.get("location")
                    if not location:
                        raise SourceError("the image URL redirects nowhere")
                    url = urljoin(url, location)
                    continue
                if resp.status_code == 429 or resp.status_code >= 500:
                    raise _Transient(f"the image URL answered HTTP {resp.status_code}")
                if resp.status_code != 200:
                    raise SourceError(f"the image URL answered HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise SourceError(f"the image is larger than {max_bytes} bytes")
                body = bytearray()
                for chunk in resp.iter_bytes():  # decoded: the cap counts what is held
                    body += chunk
                    if len(body) > max_bytes:
                        raise SourceError(f"the image is larger than {max_bytes} bytes")
                return bytes(body)
        except httpx.TransportError as exc:
            raise _Transient(f"the image URL could not be fetched ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise SourceError(
                f"the image URL could not be fetched ({type(exc).__name__})"
            ) from None
    raise SourceError(f"the image URL redirects more than {MAX_REDIRECTS} times")


def read_https_uri(uri: str, **_: Any) -> bytes:
    """The :mod:`pipeline.locations` reader: the settings of this process decide whether
    private addresses may be fetched, and the HTTP timeout."""
    from pipeline.config import get_settings

    settings = get_settings()
    return fetch(
        uri,
        allow_private=settings.intake_allow_private,
        timeout=settings.http_timeout,
    )


def open_location(location: str, **_: Any) -> Any:
    raise SourceError(
        "an https:// URL names one image, not a folder to scan: hand it over with "
        "`idocr submit` or the intake stream (docs/intake.md)"
    )


def open_output(location: str, **_: Any) -> Any:
    raise ValueError("https:// is not an output location: give a folder or s3://bucket/prefix")
