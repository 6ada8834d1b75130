"""ihuyi's MD5 dynamic password (seed 000 §4), byte-exact.

Submit:  md5(account + apikey + app + img_base64 + img_url + time)
GetNum:  md5(account + apikey + app + time)
All strings UTF-8; the digest is lowercase hex. ``time`` is a 10-digit Unix time, fresh for
every request.
"""

from __future__ import annotations

import hashlib

APP = "idcard"


def _md5(*parts: str) -> str:
    return hashlib.md5("".join(parts).encode("utf-8")).hexdigest()


def sign_submit(
    account: str, api_key: str, img_base64: str, img_url: str, time: int | str, app: str = APP
) -> str:
    return _md5(account, api_key, app, img_base64, img_url, str(time))


def sign_getnum(account: str, api_key: str, time: int | str, app: str = APP) -> str:
    return _md5(account, api_key, app, str(time))
