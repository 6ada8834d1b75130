"""Intake on real databases (SQLite and PostgreSQL), real Redis and the sandbox over HTTP: a
request makes one item and one billed call whatever is sent again under its key; hostile and
malformed messages are answered (a rejected request and its event), acknowledged, and the
consumer goes on; a consumer killed with entries pending leaves them to another one, and they
are handled once. No Celery here (tests/e2e/test_intake_e2e.py runs the workers)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from pipeline.domain import intake as contract
from pipeline.domain.intake import IntakeRequest
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Event, Item, Request
from pipeline.workflows.intake import Intake, StreamConsumer
from tests.conftest import EXAMPLES, ROOT
from tests.integration.test_pipeline import make_processor

STREAM = "idocr:intake"
FRONT = EXAMPLES / "images" / "高娟 正面.jpg"


def make_intake(db_url: str, roots: list[Path], sent: list[int], **kw: object) -> Intake:
    return Intake(database_url=db_url, provider="sandbox", enqueue=sent.extend,
                  intake_roots=roots, stream=STREAM, **kw)  # type: ignore[arg-type]


def rows(db_url: str) -> tuple[list[Request], list[Item], list[Event]]:
    with unit_of_work(db_url, read_only=True) as s:
        return (list(s.scalars(select(Request).order_by(Request.id))),
                list(s.scalars(select(Item).order_by(Item.id))),
                list(s.scalars(select(Event).order_by(Event.id))))


def test_one_key_one_item_one_call(db_url: str, tmp_path: Path, sandbox_factory, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(FRONT, root / "card.jpg")
    sent: list[int] = []
    intake = make_intake(db_url, [root], sent)
    req = IntakeRequest(image=str(root / "card.jpg"), key="crm-1", side="front", metadata={"customer": "4711"})
    first = intake.submit(req, "client")
    assert (first.status, first.repeat) == ("accepted", False)
    again = intake.submit(req, "client")
    # the same key, even with other content, makes nothing new
    other = intake.submit(IntakeRequest(image="s3://elsewhere/x.jpg", key="crm-1"), "stream")
    assert again.repeat and other.repeat and again.item_id == other.item_id == first.item_id
    requests, items, _ = rows(db_url)
    assert len(requests) == 1 and len(items) == 1
    r = requests[0]
    assert (r.channel, r.status, r.side, r.item_id) == ("client", "accepted", "front", items[0].id)
    assert r.batch_id is not None and r.batch_id.startswith("intake-")
    assert items[0].fingerprint.startswith("sha256:") and items[0].status == "queued"
    assert sent == [first.item_id] * 3  # a waiting item is sent again: its claim makes that harmless

    sandbox = sandbox_factory()
    proc = make_processor(db_url, sandbox, redis_url)
    assert [proc.process(i) for i in sent].count("succeeded") == 1
    assert sandbox.stats.billed == 1
    # answered: a repeat publishes its result again, still without a call
    before = len(rows(db_url)[2])
    third = intake.submit(req, "cli")
    assert third.repeat and third.status == "accepted"
    events = rows(db_url)[2]
    assert len(events) == before + 1
    assert (events[-1].kind, events[-1].request_id, events[-1].item_id) == ("item.finished", r.id, first.item_id)
    assert events[-1].data["status"] == "succeeded"
    assert sandbox.stats.billed == 1 and len(rows(db_url)[1]) == 1


def test_metadata_is_sealed_at_rest(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import text

    from pipeline.storage.crypto import new_key_entry

    monkeypatch.setenv("IDOCR_DATA_KEYS", new_key_entry("k1"))
    sent: list[int] = []
    intake = make_intake(pg_url, [], sent)
    out = intake.submit(IntakeRequest(image="s3://b/k.jpg", key="k-meta", metadata={"name": "高娟"}), "stream")
    assert out.status == "accepted"
    assert rows(pg_url)[1][0].source_uri == "s3://b/k.jpg"
    with unit_of_work(pg_url, read_only=True) as s:
        stored = s.execute(text("SELECT meta #>> '{}' FROM requests")).scalar_one()
    assert stored.startswith("enc1:k1:") and "高娟" not in stored
    assert rows(pg_url)[0][0].meta == {"name": "高娟"}  # read through the model: opened


def test_same_key_at_once_makes_one_request(pg_url: str, tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(FRONT, root / "card.jpg")
    sent: list[int] = []
    outcomes = []
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        intake = make_intake(pg_url, [root], sent)
        barrier.wait()
        # a new batch too: its creation races as well
        outcomes.append(intake.submit(IntakeRequest(image=str(root / "card.jpg"), key="race", batch="race-b"), "stream"))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    requests, items, _ = rows(pg_url)
    assert len(requests) == 1 and len(items) == 1
    assert sum(not o.repeat for o in outcomes) == 1 and len({o.item_id for o in outcomes}) == 1


def hostile_messages(tmp_path: Path, root: Path) -> list[tuple[dict[str, str | bytes], str, str | None]]:
    """(fields, expected reason, the caller's key when it is usable)."""
    outside = tmp_path / "outside.jpg"
    shutil.copy(FRONT, outside)
    (root / "link.jpg").symlink_to(outside)

    def req(**kw: object) -> dict[str, str | bytes]:
        return {"request": json.dumps(kw)}

    return [
        ({"request": "{not json"}, contract.MALFORMED, None),
        ({"request": b"\xff\xfe\xfd"}, contract.MALFORMED, None),
        ({"something": "else"}, contract.MALFORMED, None),
        ({"request": "[]"}, contract.MALFORMED, None),
        (req(image=str(root / "a.jpg")), contract.NO_KEY, None),
        (req(image="s3://b/k.jpg", key="k-unknown", colour="x"), contract.INVALID, "k-unknown"),
        (req(image="s3://b/k.jpg", key="has space"), contract.INVALID, None),
        (req(image=str(outside), key="k-outside"), contract.LOCATION, "k-outside"),
        (req(image=str(root / "link.jpg"), key="k-link"), contract.LOCATION, "k-link"),
        (req(image=str(root / ".." / "outside.jpg"), key="k-dotdot"), contract.LOCATION, "k-dotdot"),
        (req(image="relative/a.jpg", key="k-relative"), contract.LOCATION, "k-relative"),
        (req(image=str(root / "missing.jpg"), key="k-missing"), contract.LOCATION, "k-missing"),
        (req(image=str(root), key="k-folder"), contract.LOCATION, "k-folder"),
        (req(image="https://127.0.0.1/a.jpg", key="k-loopback"), contract.PRIVATE_ADDRESS, "k-loopback"),
        (req(image="https://localhost:8443/a.jpg", key="k-localhost"), contract.PRIVATE_ADDRESS, "k-localhost"),
        (req(image="https://169.254.169.254/latest", key="k-meta"), contract.PRIVATE_ADDRESS, "k-meta"),
        (req(image="https://[::1]/a.jpg", key="k-v6"), contract.PRIVATE_ADDRESS, "k-v6"),
        (req(image="http://example.com/a.jpg", key="k-http"), contract.LOCATION, "k-http"),
        (req(image="file:///etc/passwd", key="k-file"), contract.LOCATION, "k-file"),
        (req(image="s3://bucket/", key="k-s3-prefix"), contract.LOCATION, "k-s3-prefix"),
        ({"request": json.dumps({"image": "s3://b/k", "key": "k-big", "pad": "x" * 20000})},
         contract.TOO_LARGE, None),
    ]


def test_bad_messages_are_answered_and_the_consumer_goes_on(pg_url: str, tmp_path: Path, redis_url: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(FRONT, root / "good.jpg")
    r = redis.Redis.from_url(redis_url)
    cases = hostile_messages(tmp_path, root)
    ids = [r.xadd(STREAM, fields).decode() for fields, _, _ in cases]  # type: ignore[arg-type]
    r.xadd(STREAM, {"request": json.dumps({"image": str(root / "good.jpg"), "key": "k-good"})})
    sent: list[int] = []
    consumer = StreamConsumer(make_intake(pg_url, [root], sent), r, stream=STREAM, block=0.1)
    deadline = time.monotonic() + 30
    while consumer.handled < len(cases) + 1 and time.monotonic() < deadline:
        consumer.poll_once()
    requests, items, events = rows(pg_url)
    by_key = {q.idempotency_key: q for q in requests}
    for (fields, reason, key), entry_id in zip(cases, ids, strict=True):
        q = by_key[key or contract.synthetic_key(STREAM, entry_id)]
        assert q.status == "rejected" and q.reason and q.reason.startswith(reason + ":"), (fields, q.reason)
        assert q.item_id is None
        rejected = [e for e in events if e.kind == "request.rejected" and e.request_id == q.id]
        assert len(rejected) == 1 and rejected[0].data["reason"] == reason
    # no location, no value sent, in any reason
    assert not any(str(tmp_path) in (q.reason or "") for q in requests)
    assert by_key["k-good"].status == "accepted" and len(items) == 1 and len(sent) == 1
    # every entry acknowledged and removed; none pending
    assert r.xpending(STREAM, "idocr")["pending"] == 0 and r.xlen(STREAM) == 0
    # a bad message sent again (a redelivery) records nothing twice
    r.xadd(STREAM, {"request": json.dumps({"image": "https://127.0.0.1/a.jpg", "key": "k-loopback"})})
    while consumer.poll_once() == 0:
        pass
    assert len(rows(pg_url)[0]) == len(requests)


CONSUMER_THAT_DIES = """
import sys, time, redis
from pipeline.workflows.intake import Intake, StreamConsumer
db, url, root, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = redis.Redis.from_url(url)
c = StreamConsumer(Intake(database_url=db, provider="sandbox", enqueue=None, intake_roots=[root],
                          stream="idocr:intake"), r, stream="idocr:intake", consumer="doomed")
c.ensure_group()
entries = r.xreadgroup("idocr", "doomed", {"idocr:intake": ">"}, count=n)[0][1]
c.handle(entries[0][0].decode(), entries[0][1])   # recorded, never acknowledged
print(len(entries), flush=True)
time.sleep(600)
"""


def test_entries_of_a_killed_consumer_are_taken_over_and_handled_once(pg_url: str, tmp_path: Path, redis_url: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    r = redis.Redis.from_url(redis_url)
    for i in range(5):
        data = FRONT.read_bytes() + f"#{i}".encode()  # distinct bytes, the same card
        (root / f"c{i}.jpg").write_bytes(data)
        r.xadd(STREAM, {"request": json.dumps({"image": str(root / f"c{i}.jpg"), "key": f"k{i}"})})
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER_THAT_DIES, pg_url, redis_url, str(root), "5"],
                            stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"5"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert r.xpending(STREAM, "idocr")["pending"] == 5
    assert len(rows(pg_url)[0]) == 1  # the one it recorded before it died
    sent: list[int] = []
    other = StreamConsumer(make_intake(pg_url, [root], sent), r, stream=STREAM, consumer="heir",
                           claim_idle=0.3, block=0.1)
    deadline = time.monotonic() + 30
    while r.xpending(STREAM, "idocr")["pending"] and time.monotonic() < deadline:
        other.poll_once()
        time.sleep(0.05)
    requests, items, _ = rows(pg_url)
    assert sorted(q.idempotency_key for q in requests) == [f"k{i}" for i in range(5)]
    assert len(items) == 5 and all(q.status == "accepted" for q in requests)
    # the four it never handled are sent once; the one it recorded waits in SQL, sent again as a
    # repeat (harmless: its claim decides)
    assert sorted(set(sent)) == sorted(i.id for i in items)
    assert r.xlen(STREAM) == 0
    # the dead consumer's name, holding nothing now, is removed from the group
    time.sleep(0.01)
    assert other.forget_idle_consumers(idle=0.005) == 1
    assert [c["name"] for c in r.xinfo_consumers(STREAM, "idocr")] == [b"heir"]


@pytest.mark.parametrize("allow", [False, True])
def test_private_urls_only_when_allowed(pg_url: str, allow: bool) -> None:
    sent: list[int] = []
    intake = make_intake(pg_url, [], sent, allow_private=allow)
    out = intake.submit(IntakeRequest(image="https://127.0.0.1:9/a.jpg", key="k-url", metadata={"crm": "1"}),
                        "stream")
    assert out.status == ("accepted" if allow else "rejected")
    # the metadata is kept (and echoed back) either way
    assert rows(pg_url)[0][0].meta == {"crm": "1"}
    if not allow:
        assert out.reason and out.reason.startswith(contract.PRIVATE_ADDRESS)
    else:
        item = rows(pg_url)[1][0]
        assert item.source_uri == "https://127.0.0.1:9/a.jpg" and item.fingerprint.startswith("uri:")


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_an_https_image_is_fetched_from_the_checked_address_with_the_certificate_verified(tmp_path: Path) -> None:
    """A real TLS server on loopback (so allowed only with allow_private): the connection goes
    to the resolved address while the certificate is checked against the host name."""
    import http.server
    import ssl

    from pipeline.sources.base import SourceError
    from pipeline.sources.https import AddressRefused, fetch

    cert, key = _self_signed(tmp_path)
    body = FRONT.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/card.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(302)
                self.send_header("Location", "/card.jpg")
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        url = f"https://localhost:{port}/old-name.jpg"
        assert fetch(url, allow_private=True, verify=trust, timeout=10) == body
        with pytest.raises(AddressRefused):
            fetch(url, allow_private=False, verify=trust, timeout=10)
        # a certificate for another name is refused even though the address is the same
        with pytest.raises(SourceError, match="could not be fetched"):
            fetch(f"https://127.0.0.1:{port}/card.jpg", allow_private=True, verify=trust, timeout=10)
        with pytest.raises(SourceError, match="larger than"):
            fetch(url, allow_private=True, verify=trust, timeout=10, max_bytes=1000)
    finally:
        server.shutdown()


def test_a_database_outage_is_not_a_bad_message(pg_url: str, tmp_path: Path, redis_url: str) -> None:
    """The database unreachable: the entry is neither refused nor acknowledged; once the
    database is back it is handled, once."""
    from tests.faults import TcpProxy

    proxy = TcpProxy(5432)
    try:
        proxied = pg_url.replace(":5432/", f":{proxy.port}/")
        r = redis.Redis.from_url(redis_url)
        sent: list[int] = []
        consumer = StreamConsumer(make_intake(proxied, [], sent), r, stream=STREAM, block=0.1)
        proxy.cut()
        r.xadd(STREAM, {"request": json.dumps({"image": "s3://b/k.jpg", "key": "k-outage"})})
        stop = threading.Event()
        runner = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        runner.start()
        time.sleep(2.0)
        assert r.xpending(STREAM, "idocr")["pending"] == 1 and r.xlen(STREAM) == 1
        assert consumer.handled == 0
        proxy.heal()
        deadline = time.monotonic() + 30
        while consumer.handled == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        runner.join(15)
        requests, items, _ = rows(pg_url)
        assert [(q.idempotency_key, q.status) for q in requests] == [("k-outage", "accepted")]
        assert len(items) == 1 and sent == [items[0].id]
        assert r.xpending(STREAM, "idocr")["pending"] == 0 and r.xlen(STREAM) == 0
    finally:
        proxy.close()


class _BrokenOnce(Intake):
    """An intake with a defect for one key (what a bug would look like to the consumer)."""

    def submit(self, request, channel="stream"):  # type: ignore[no-untyped-def]
        if request.key == "k-bug":
            raise RuntimeError("a defect")
        return super().submit(request, channel)


def test_an_entry_that_keeps_failing_is_answered_as_an_internal_error(pg_url: str, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.xadd(STREAM, {"request": json.dumps({"image": "s3://b/bug.jpg", "key": "k-bug"})})
    r.xadd(STREAM, {"request": json.dumps({"image": "s3://b/ok.jpg", "key": "k-ok"})})
    sent: list[int] = []
    intake = _BrokenOnce(database_url=pg_url, provider="sandbox", enqueue=sent.extend, stream=STREAM)
    consumer = StreamConsumer(intake, r, stream=STREAM, block=0.1)
    deadline = time.monotonic() + 30
    while r.xlen(STREAM) and time.monotonic() < deadline:
        consumer.poll_once()
    by_key = {q.idempotency_key: q for q in rows(pg_url)[0]}
    assert by_key["k-ok"].status == "accepted"  # the one behind it was not held up for good
    bug = by_key["k-bug"]
    assert bug.status == "rejected" and bug.reason == "internal_error: the request could not be processed"
    assert r.xpending(STREAM, "idocr")["pending"] == 0


def test_the_same_bytes_under_another_key_are_answered_with_the_originals_result(
    pg_url: str, tmp_path: Path, sandbox_factory, redis_url: str  # type: ignore[no-untyped-def]
) -> None:
    from pipeline.workflows.relay import Relay, result_key

    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(FRONT, root / "a.jpg")
    shutil.copy(FRONT, root / "copy of a.jpg")
    sent: list[int] = []
    intake = make_intake(pg_url, [root], sent)
    first = intake.submit(IntakeRequest(image=str(root / "a.jpg"), key="k-first"), "stream")
    second = intake.submit(IntakeRequest(image=str(root / "copy of a.jpg"), key="k-second"), "stream")
    assert sent == [first.item_id]  # the copy is never sent
    r = redis.Redis.from_url(redis_url)
    relay = Relay(database_url=pg_url, redis_client=r)
    relay.run_once()
    # nothing answered yet: the copy's own event is not an answer while the original is on its way
    assert r.get(result_key("k-first")) is None and r.get(result_key("k-second")) is None
    proc = make_processor(pg_url, sandbox_factory(), redis_url)
    assert proc.process(sent[0]) == "succeeded"
    relay.run_once()
    answers = [json.loads(r.get(result_key(k)) or "null") for k in ("k-first", "k-second")]
    assert [a["status"] for a in answers] == ["succeeded", "succeeded"]
    assert answers[0]["fields"]["name"] == answers[1]["fields"]["name"] == "高娟"
    assert second.item_id == first.item_id and len(rows(pg_url)[1]) == 2  # the copy has its item


def test_a_stream_lost_with_its_group_is_consumed_again(pg_url: str, redis_url: str) -> None:
    """A Redis restarted empty takes the stream and its group with it: the consumer creates the
    group again and goes on with what is added next."""
    r = redis.Redis.from_url(redis_url)
    sent: list[int] = []
    consumer = StreamConsumer(make_intake(pg_url, [], sent), r, stream=STREAM, block=0.1)
    r.xadd(STREAM, {"request": json.dumps({"image": "s3://b/1.jpg", "key": "before"})})
    while consumer.handled < 1:
        consumer.poll_once()
    r.delete(STREAM)
    consumer.poll_once()  # finds no group
    r.xadd(STREAM, {"request": json.dumps({"image": "s3://b/2.jpg", "key": "after"})})
    deadline = time.monotonic() + 10
    while consumer.handled < 2 and time.monotonic() < deadline:
        consumer.poll_once()
    assert sorted(q.idempotency_key for q in rows(pg_url)[0]) == ["after", "before"]
