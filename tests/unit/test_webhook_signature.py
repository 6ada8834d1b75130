"""The verification snippet of docs/events.md accepts what the relay signs, and nothing else."""

from __future__ import annotations

import re
import time
from pathlib import Path

from pipeline.workflows.relay import sign

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def _verify():  # type: ignore[no-untyped-def]
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    [code] = [b for b in blocks if "def verify" in b]
    scope: dict[str, object] = {}
    exec(code, scope)  # noqa: S102 - the documentation's own snippet
    return scope["verify"]


def test_the_documented_check_accepts_the_relays_signature() -> None:
    verify = _verify()
    secret, body = b"whsec-docs", '{"event_id":"e1","kind":"item.finished"}'.encode()
    ts = int(time.time())
    headers = {"X-Idocr-Timestamp": str(ts), "X-Idocr-Signature": sign(secret, ts, body)}
    assert verify(secret, headers, body)
    assert not verify(b"another-secret", headers, body)
    assert not verify(secret, headers, body + b" ")
    old = ts - 3600
    stale = {"X-Idocr-Timestamp": str(old), "X-Idocr-Signature": sign(secret, old, body)}
    assert not verify(secret, stale, body)
    assert sign(secret, ts, body).startswith("v1=") and len(sign(secret, ts, body)) == 3 + 64
