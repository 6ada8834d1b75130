"""A local HTTP emulator of both OCR providers, for the demo and the tests.

It speaks ihuyi's protocol (seed 000: ``/ocr/Submit.json``, ``/ocr/GetNum.json``, MD5 dynamic
password, its error codes) and showapi's (seed 003: ``/1429-1?appKey=``, the
``showapi_res_*`` envelope), answers from a :class:`~idocr_sandbox.truth.TruthIndex`, keeps a
paid quota shared by both protocols, and injects faults on a seeded schedule. Everything the
pipeline must get right against the real services — one billed call per image, staying under
the quota, re-signing on a stale time, telling image errors from transient ones — can be
observed here through :class:`SandboxStats`, in-process or over ``/_sandbox/stats``.

Billing model (what a test may rely on):

- a Submit / showapi call that passed authentication, found quota left and got as far as the
  image is billed: success, and also an image the provider could not read (ihuyi 4086, showapi
  ``flag: false``), because the provider did the work;
- authentication failures, parameter errors, 4051/-2, and every injected fault except
  ``lost_after_billing`` are not billed; ``lost_after_billing`` bills, records the ocrid, then
  closes the connection without an answer — the case where the client cannot know.

Nothing here logs image bytes, keys, passwords, query strings or card fields.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

from idocr_sandbox.faults import FaultPlan, _Fault
from idocr_sandbox.ihuyi import (
    IHUYI_GETNUM_PATH,
    IHUYI_MESSAGES,
    IHUYI_SUBMIT_PATH,
    IhuyiProtocol,
    _ihuyi_error,
)
from idocr_sandbox.showapi import (
    SHOWAPI_AUTH,
    SHOWAPI_PATH,
    SHOWAPI_QUOTA,
    SHOWAPI_SYSTEM,
    ShowapiProtocol,
    _showapi_error,
)
from idocr_sandbox.stats import BilledCall, SandboxStats
from idocr_sandbox.truth import Match, TruthIndex
from idocr_sandbox.wire import (
    _MATCH_PROBLEMS,
    MAX_BODY,
    _decode_base64,
    _fetch,
    _Image,
    _json_reply,
    _limits_problem,
    _parse_qs,
    _Reply,
)

__all__ = [
    "IHUYI_MESSAGES",
    "SHOWAPI_AUTH",
    "SHOWAPI_QUOTA",
    "SHOWAPI_SYSTEM",
    "BilledCall",
    "FaultPlan",
    "SandboxConfig",
    "SandboxServer",
    "SandboxStats",
    "main",
]

log = logging.getLogger(__name__)


CONTROL_PREFIX = "/_sandbox/"

# ====================================================================== config


@dataclass(slots=True)
class SandboxConfig:
    # The keys are the sandbox's own, not secrets, but they stay out of reprs all the same so
    # a habit of printing configs never meets a real key.
    ihuyi_account: str = "sandbox"
    ihuyi_api_key: str = field(default="sandbox-key", repr=False)
    showapi_app_key: str = field(default="sandbox-appkey", repr=False)
    #: billed calls left, shared by both protocols (one paid account behind both)
    quota: int = 10_000
    max_clock_skew: int = 300
    #: seconds slept before every provider answer
    latency: float = 0.0
    faults: FaultPlan = field(default_factory=FaultPlan)
    seed: int | None = None
    #: also enforce seed 000 §1.6 (256–2048 px, ≤ 8 MB encoded, no black-and-white) as 4086 /
    #: showapi image failures; off by default so fixtures of any size work.
    check_image_limits: bool = False

    @classmethod
    def from_env(
        cls, prefix: str = "IDOCR_SANDBOX_", **overrides: Any
    ) -> SandboxConfig:
        """Read ``{prefix}QUOTA``, ``LATENCY``, ``FAULTS``, ``SEED``, ``MAX_CLOCK_SKEW``,
        ``CHECK_IMAGE_LIMITS``, ``IHUYI_ACCOUNT``, ``IHUYI_API_KEY``, ``SHOWAPI_APP_KEY``."""
        env = os.environ
        kw: dict[str, Any] = {}
        conv: dict[str, Any] = {
            "IHUYI_ACCOUNT": str,
            "IHUYI_API_KEY": str,
            "SHOWAPI_APP_KEY": str,
            "QUOTA": int,
            "MAX_CLOCK_SKEW": int,
            "LATENCY": float,
            "SEED": int,
            "FAULTS": FaultPlan.parse,
            "CHECK_IMAGE_LIMITS": lambda v: (
                v.strip().lower() in ("1", "true", "yes", "on")
            ),
        }
        for name, fn in conv.items():
            raw = env.get(prefix + name)
            if raw is not None and raw != "":
                kw[name.lower()] = fn(raw)
        kw.update(overrides)
        return cls(**kw)


# ====================================================================== HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 resets connections when a pool of workers bursts at once.
    request_queue_size = 256
    sandbox: SandboxServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = (
        "HTTP/1.1"  # keep-alive, like the real services behind their CDNs
    )
    server_version = "idocr-sandbox/1"
    sys_version = ""
    # Idle keep-alive connections and stalled uploads must not pin a thread forever.
    timeout = 120
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK adds
    # ~40 ms to every keep-alive answer, which would cap a rate test at ~25 calls/s/connection.
    disable_nagle_algorithm = True
    server: _HTTPServer

    # ---- logging: never the request line (GET carries password and img_base64 in the query)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = urlsplit(getattr(self, "path", "") or "").path.partition("&")[0]
        log.debug("%s %s -> %s", getattr(self, "command", "-"), path, code)

    def log_error(self, format: str, *args: Any) -> None:
        # The stdlib passes the raw request line in some of these messages; keep only the code.
        code = args[0] if args and isinstance(args[0], int) else "-"
        log.debug("http error %s", code)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        """JSON instead of the stdlib's HTML page, and the connection closed after it."""
        self.log_error("code %d", code)
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = json.dumps({"error": phrase, "status": code}).encode("utf-8")
        self.close_connection = True
        self.server.sandbox.stats._record_answer(code, {})
        if getattr(self, "request_version", "") == "HTTP/0.9":
            # The stdlib assumes 0.9 for an unparseable request line and would then send no
            # status line at all; nobody speaks 0.9 to an OCR API, so answer with a real status.
            self.request_version = "HTTP/1.0"
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if (
                getattr(self, "command", None) != "HEAD"
                and code >= 200
                and code not in (204, 304)
            ):
                self.wfile.write(body)
        except OSError:
            pass

    # ---- entry points

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        sandbox = self.server.sandbox
        try:
            reply = self._route(sandbox)
        except Exception as exc:
            # Odd input must never take the server down or leave the client hanging.
            log.error("sandbox handler failed: %s", type(exc).__name__)
            log.debug("sandbox handler traceback", exc_info=True)
            reply = _json_reply(500, {"error": "sandbox internal error"})
            self.close_connection = True
        if reply is None:
            return
        if (
            reply.delay
            and sandbox.config.latency > 0
            and sandbox._stopping.wait(sandbox.config.latency)
        ):
            reply.lost = True  # shutting down: drop rather than answer late
        if reply.lost:
            self._drop_connection()
            return
        self._write(reply)

    def _write(self, reply: _Reply) -> None:
        # Counted before the write: a client that reads the stats right after its answer must
        # find that answer in them.
        if reply.record:
            self.server.sandbox.stats._record_answer(reply.status, reply.codes)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True  # client went away; nothing to answer to

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- request parsing

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering an error (and closing)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            n = int(raw)
        except ValueError:
            self.send_error(400)
            return None
        if n < 0:
            self.send_error(400)
            return None
        if n > MAX_BODY:
            self.send_error(413)
            return None
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            return None
        return data

    def _read_chunked(self) -> bytes | None:
        buf = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.send_error(400)
                return None
            if size == 0:
                # trailers, up to the blank line
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(buf)
            if len(buf) + size > MAX_BODY:
                self.send_error(413)
                return None
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                self.close_connection = True
                return None
            buf += chunk
            self.rfile.readline(8)  # the CRLF after each chunk

    def _body_params(self, body: bytes) -> dict[str, str]:
        if not body:
            return {}
        ctype = self.headers.get("Content-Type", "")
        main_type = ctype.split(";", 1)[0].strip().lower()
        if main_type == "multipart/form-data":
            msg = BytesParser(policy=HTTP_POLICY).parsebytes(
                b"Content-Type: "
                + ctype.encode("latin-1", "replace")
                + b"\r\n\r\n"
                + body
            )
            out: dict[str, str] = {}
            if msg.is_multipart():
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if isinstance(name, str) and name not in out:
                        payload = part.get_payload(decode=True)
                        if isinstance(payload, bytes):
                            out[name] = payload.decode("utf-8", "replace")
            return out
        # Form encoding is the documented one; a missing Content-Type is read the same way.
        return _parse_qs(body.decode("utf-8", "replace"))

    # ---- routing

    def _route(self, sandbox: SandboxServer) -> _Reply | None:
        parts = urlsplit(self.path)
        path, query = parts.path, parts.query
        if not query and path.startswith("/ocr/") and "&" in path:
            # Seed 000's GET examples write "Submit.json&account=…" with no "?": accept it.
            path, _, query = path.partition("&")
        now = time.time()
        endpoint = {
            IHUYI_SUBMIT_PATH: "ihuyi.submit",
            IHUYI_GETNUM_PATH: "ihuyi.getnum",
            SHOWAPI_PATH: "showapi.ocr",
        }.get(path, "control" if path.startswith(CONTROL_PREFIX) else "unknown")
        sandbox.stats._record_request(endpoint, now)
        body = self._read_body()
        if body is None:
            return None
        if endpoint == "control":
            return sandbox._control(self.command, path, query, body)
        if endpoint == "unknown":
            return _json_reply(
                404, {"error": "unknown path", "path": path[:200]}, {"http": "404"}
            )
        params = _parse_qs(query)
        params.update(self._body_params(body))  # body wins, like PHP's $_REQUEST
        if endpoint == "ihuyi.submit":
            return sandbox._ihuyi_submit(params, now)
        if endpoint == "ihuyi.getnum":
            return sandbox._ihuyi_getnum(params, now)
        return sandbox._showapi(params, now)


# ====================================================================== the server


class SandboxServer(IhuyiProtocol, ShowapiProtocol):
    """Both providers on one local port. ``with SandboxServer(truth, config) as s: s.url``."""

    def __init__(
        self,
        truth: TruthIndex,
        config: SandboxConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.truth = truth
        self.config = config or SandboxConfig()
        self.stats = SandboxStats()
        self._lock = threading.Lock()  # quota, fault RNG, fault plan
        self._remaining = self.config.quota
        self._rng = random.Random(self.config.seed)
        # A separate generator, so ocrids never shift the seeded fault sequence.
        self._ocrid_seq = itertools.count(
            random.Random(self.config.seed).randrange(100_000)
        )
        self._stopping = threading.Event()
        self._host = host
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.sandbox = self
        self._thread: threading.Thread | None = None
        self._serving = False
        self._closed = False

    # ---- lifecycle

    @property
    def url(self) -> str:
        # A wildcard bind is reachable on loopback; a URL naming 0.0.0.0 is not portable.
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> Self:
        if self._thread is not None or self._serving:
            raise RuntimeError("sandbox already running")
        self._serving = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"sandbox:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` or KeyboardInterrupt."""
        if self._thread is not None or self._serving:
            raise RuntimeError("sandbox already running")
        self._serving = True
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._serving = False
            self._stopping.set()
            self._close()

    def stop(self) -> None:
        # Wakes handlers sleeping in latency or a timeout fault, so stop() is prompt.
        self._stopping.set()
        if self._serving:
            # shutdown() waits for serve_forever to exit; calling it when serve_forever never
            # ran would block forever, hence the flag.
            self._httpd.shutdown()
            self._serving = False
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._httpd.server_close()

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- quota and faults

    @property
    def remaining(self) -> int:
        with self._lock:
            return self._remaining

    def set_quota(self, n: int) -> int:
        with self._lock:
            self._remaining = max(0, int(n))
            return self._remaining

    def add_quota(self, n: int) -> int:
        with self._lock:
            self._remaining = max(0, self._remaining + int(n))
            return self._remaining

    def set_faults(self, plan: FaultPlan) -> None:
        with self._lock:
            self.config.faults = plan

    def _try_bill(self) -> bool:
        """Take one call off the quota; False when none is left (the call is then refused)."""
        with self._lock:
            if self._remaining <= 0:
                return False
            self._remaining -= 1
            return True

    def _draw(self, provider: str) -> tuple[_Fault | None, bool]:
        with self._lock:
            return self.config.faults.draw(self._rng, provider)

    def _next_ocrid(self) -> str:
        # 17 digits like seed 000's "22101320041348318": yymmddHHMMSS + a 5-digit sequence.
        return time.strftime("%y%m%d%H%M%S") + f"{next(self._ocrid_seq) % 100_000:05d}"

    def _fault_reply(self, fault: _Fault, provider: str) -> _Reply:
        if fault.kind == "timeout":
            self.stats._record_fault("timeout")
            self._stopping.wait(self.config.faults.timeout_sleep)
            # Not billed. A client patient enough to wait gets a gateway timeout, never a result.
            return _Reply(
                504,
                b"<html><body><h1>504 Gateway Time-out</h1></body></html>",
                "text/html",
                codes={"http": "504"},
                delay=False,
                lost=self._stopping.is_set(),
            )
        if fault.kind == "http_500":
            self.stats._record_fault("http_500")
            return _Reply(
                500,
                b"<html><body><h1>500 Internal Server Error</h1></body></html>",
                "text/html",
                codes={"http": "500"},
            )
        if fault.kind == "garbage":
            self.stats._record_fault("garbage")
            # What a misbehaving CDN or a truncated upstream answer looks like: 200, not JSON.
            return _Reply(
                200,
                b'<html><body>upstream error</body></html>\x00{"code":',
                "text/html",
                codes={"http": "garbage"},
            )
        assert fault.code is not None
        self.stats._record_fault(f"code:{provider}:{fault.code}")
        if provider == "ihuyi":
            return _ihuyi_error(fault.code)
        return _showapi_error(fault.code)

    def _intake(self, data_b64: str, url: str) -> _Image:
        return _decode_base64(data_b64) if data_b64 else _fetch(url)

    def _recognise(
        self, image: _Image, encoded_len: int
    ) -> tuple[Match | None, str | None]:
        """(match, problem): a found entry, or why the image cannot be answered."""
        if image.data is None:
            return None, image.problem
        if self.config.check_image_limits:
            problem = _limits_problem(image.data, encoded_len)
            if problem:
                return None, problem
        m = self.truth.match(image.data)
        if m.entry is None:
            return m, _MATCH_PROBLEMS.get(m.reason, "未识别到身份证")
        return m, None

    def _bill(
        self, provider: str, image: _Image, code: str, lost: bool, at: float
    ) -> str:
        """``at``: when the request arrived — what a provider's per-second limit counts."""
        ocrid = self._next_ocrid()
        sha = hashlib.sha256(image.data).hexdigest() if image.data is not None else None
        self.stats._record_billed(BilledCall(at, provider, ocrid, sha, code, lost))
        if lost:
            self.stats._record_fault("lost_after_billing")
        return ocrid

    # ---- control endpoints (for tests and demos in other processes)

    def _control(self, method: str, path: str, query: str, body: bytes) -> _Reply:
        name = path[len(CONTROL_PREFIX) :].strip("/")
        reply = self._control_inner(method, name, query, body)
        reply.delay = False
        reply.record = False
        return reply

    def _control_inner(self, method: str, name: str, query: str, body: bytes) -> _Reply:
        if name == "health" and method == "GET":
            return _json_reply(200, {"ok": True})
        if name == "billed" and method == "GET":  # cheap enough to poll while calls run
            return _json_reply(200, {"billed": self.stats.billed_count()})
        if name == "stats" and method == "GET":
            q = _parse_qs(query)
            snap = self.stats.snapshot(
                include_calls=q.get("calls", "") in ("1", "true")
            )
            snap["remaining"] = self.remaining
            return _json_reply(200, snap)
        if name in ("quota", "faults", "reset") and method == "POST":
            try:
                doc = json.loads(body.decode("utf-8") or "{}")
            except (UnicodeDecodeError, json.JSONDecodeError):
                return _json_reply(400, {"error": "body must be JSON"})
            if not isinstance(doc, dict):
                return _json_reply(400, {"error": "body must be a JSON object"})
            if name == "reset":
                self.stats.reset()
                return _json_reply(200, {"ok": True, "remaining": self.remaining})
            if name == "faults":
                try:
                    plan = FaultPlan.parse(str(doc.get("plan", "")))
                except ValueError as exc:
                    return _json_reply(400, {"error": str(exc)})
                self.set_faults(plan)
                return _json_reply(200, {"plan": str(plan)})
            value = doc.get("set", doc.get("add"))
            if not isinstance(value, int) or isinstance(value, bool) or len(doc) != 1:
                return _json_reply(400, {"error": 'expected {"set": n} or {"add": n}'})
            remaining = self.set_quota(value) if "set" in doc else self.add_quota(value)
            return _json_reply(200, {"remaining": remaining})
        if name in ("health", "stats", "quota", "faults", "reset"):
            return _json_reply(405, {"error": "method not allowed"})
        return _json_reply(404, {"error": "unknown control endpoint"})


# ====================================================================== CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m idocr_sandbox.server --truth truth.json --port 8700``.

    Settings not given on the command line come from ``IDOCR_SANDBOX_*`` (see
    :meth:`SandboxConfig.from_env`).
    """
    p = argparse.ArgumentParser(
        prog="idocr-sandbox", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--truth", action="append", default=[], help="truth file (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--quota", type=int)
    p.add_argument("--latency", type=float)
    p.add_argument("--faults", help='e.g. "http_500=0.05,code:4010=0.1"')
    p.add_argument("--seed", type=int)
    p.add_argument("--max-clock-skew", type=int)
    p.add_argument("--check-image-limits", action="store_true", default=None)
    p.add_argument("--url-file", help="write the base URL here once listening")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "quota": a.quota,
            "latency": a.latency,
            "faults": FaultPlan.parse(a.faults) if a.faults is not None else None,
            "seed": a.seed,
            "max_clock_skew": a.max_clock_skew,
            "check_image_limits": a.check_image_limits,
        }.items()
        if v is not None
    }
    config = SandboxConfig.from_env(**overrides)
    truth = TruthIndex.load(*a.truth)
    server = SandboxServer(truth, config, host=a.host, port=a.port)
    if a.url_file:
        with open(a.url_file, "w", encoding="utf-8") as f:
            f.write(server.url + "\n")
    print(
        f"sandbox listening on {server.url} ({len(truth)} truth images, quota {config.quota}, "
        f"faults {config.faults})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
