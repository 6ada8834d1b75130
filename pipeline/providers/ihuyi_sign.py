"""ihuyi's MD5 dynamic password (seed 000 §4), byte-exact.

Submit:  md5(account + apikey + app + img_base64 + img_url + time)
GetNum:  md5(account + apikey + app + time)
All strings UTF-8; the digest is lowercase hex. ``time`` is a 10-digit Unix time, fresh for
every request.
"""

from __future__ import annotations

import hashlib
from typing import Any

APP = "idcard"


def _md5(*parts: str) -> str:
    return hashlib.md5("".join(parts).encode("utf-8")).hexdigest()


def submit_signer(
    account: str, api_key: str, img_base64: str | bytes, img_url: str, app: str = APP
) -> Any:
    """The Submit digest over everything but ``time``: a request is prepared once and signed at
    each send by :func:`finish` on a copy (the image is not hashed again). ``img_base64`` may
    be the base64 text's bytes (ASCII), as the request carries it."""
    signer = hashlib.md5()
    for part in (account, api_key, app, img_base64, img_url):
        signer.update(part if isinstance(part, bytes) else part.encode("utf-8"))
    return signer


def finish(signer: Any, time: int | str) -> str:
    """The password: ``signer`` (left untouched) completed with ``time``."""
    done = signer.copy()
    done.update(str(time).encode("utf-8"))
    return done.hexdigest()


def sign_submit(
    account: str, api_key: str, img_base64: str, img_url: str, time: int | str, app: str = APP
) -> str:
    return finish(submit_signer(account, api_key, img_base64, img_url, app), time)


def sign_getnum(account: str, api_key: str, time: int | str, app: str = APP) -> str:
    return _md5(account, api_key, app, str(time))
