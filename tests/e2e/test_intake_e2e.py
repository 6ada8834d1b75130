"""Other systems handing work over, end to end: two plain Celery workers (each with its intake
consumer and event relay started on worker_ready), PostgreSQL, Redis, the sandbox over HTTP
counting billed calls. Requests arrive by a raw XADD from another process, through the
Python client and through `idocr submit`; 1,000 requests, a tenth of them repeating an earlier
key, make exactly 900 provider calls."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from idocr_sandbox.truth import TruthIndex
from pipeline.client import Client, result_key
from pipeline.storage.crypto import new_key_entry
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Item, Request
from pipeline.workflows.relay import result_key as relay_result_key
from tests.conftest import EXAMPLES, IDOCR, idocr_env
from tests.faults import kill_group

CARDS = [EXAMPLES / "images" / "高娟 正面.jpg", EXAMPLES / "images" / "高娟 背面.jpg"]
TRUTH = json.loads((EXAMPLES / "truth.json").read_text(encoding="utf-8"))["images"]
DISTINCT, REPEATS = 900, 100


def _small(data: bytes) -> bytes:
    """The card at 428x270 (still within the provider's 256-2048 px): cheap to decode."""
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).resize((428, 270)).save(out, "JPEG", quality=80)
    return out.getvalue()


def distinct_images(root: Path, n: int, truth: TruthIndex | None = None, start: int = 0,
                    small: bool = False) -> list[Path]:
    """``n`` images with distinct bytes (a trailer after the JPEG's end: the same card to the
    provider's eye, another sha256 to idocr's content de-duplication). With ``truth``, each is
    registered by its sha256 too, so the sandbox answers without decoding it again."""
    originals = [p.read_bytes() for p in CARDS]
    known = [truth.get(hashlib.sha256(b).hexdigest()) if truth else None for b in originals]
    bases = [_small(b) for b in originals] if small else originals
    out = []
    for i in range(start, start + n):
        path = root / f"card-{i:04d}.jpg"
        data = bases[i % 2] + f"#{i}".encode()
        path.write_bytes(data)
        base = known[i % 2]
        if truth is not None and base is not None:
            truth._insert(dataclasses.replace(base, sha256=hashlib.sha256(data).hexdigest(), file=None))
        out.append(path)
    return out


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, redis_url: str, sandbox_factory, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    truth = TruthIndex.load(EXAMPLES / "truth.json")
    truth.warm()
    sandbox = sandbox_factory(truth, quota=100_000)
    keys = new_key_entry("k1")
    monkeypatch.setenv("IDOCR_DATA_KEYS", keys)  # `idocr submit` and this process read sealed data
    root = tmp_path / "intake"
    root.mkdir()
    env = idocr_env(
        IDOCR_PROVIDER="sandbox", IDOCR_SANDBOX_URL=sandbox.url, IDOCR_DATABASE_URL=pg_url,
        IDOCR_REDIS_URL=redis_url, IDOCR_DATA_DIR=str(tmp_path / ".idocr"),
        IDOCR_DATA_KEYS=keys, IDOCR_INTAKE_ROOTS=str(root),
        IDOCR_RATE_LIMIT="5000", IDOCR_RATE_BURST="50", IDOCR_RELAY_INTERVAL="0.05",
        IDOCR_HTTP_TIMEOUT="10", IDOCR_RETRY_INITIAL="0.1", IDOCR_RETRY_MAX="0.5",
    )
    procs = []
    for name in ("w1", "w2"):
        with (tmp_path / f"{name}.log").open("ab") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-n", f"{name}@%h",
                 "-c", "4", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
            ))
    try:
        yield {"sandbox": sandbox, "truth": truth, "root": root, "env": env, "log": tmp_path / "w1.log",
               "pg": pg_url, "redis": redis_url, "tmp": tmp_path}
    finally:
        for worker in procs:
            kill_group(worker, 15)
        for worker in procs:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                kill_group(worker)
                worker.wait()


def counts(pg: str) -> tuple[int, int, int]:
    """(requests, items, items not final)"""
    with unit_of_work(pg, read_only=True) as s:
        reqs = s.scalar(select(func.count()).select_from(Request)) or 0
        items = s.scalar(select(func.count()).select_from(Item)) or 0
        waiting = s.scalar(select(func.count()).select_from(Item).where(
            Item.status.in_(("queued", "submitting", "paused")))) or 0
    return reqs, items, waiting


def test_requests_from_other_systems_are_answered_once(cluster: dict) -> None:  # type: ignore[type-arg]
    root, pg, url, sandbox = cluster["root"], cluster["pg"], cluster["redis"], cluster["sandbox"]
    assert relay_result_key("k") == result_key("k")  # the client reads where the relay writes
    front, back = distinct_images(root, 2, cluster["truth"])

    # 1. a raw XADD from another process, the Python client, and `idocr submit`
    raw = json.dumps({"image": str(front), "key": "raw-1", "side": "front",
                      "metadata": {"crm": "4711"}})
    subprocess.run(["redis-cli", "-u", url, "XADD", "idocr:intake", "*", "request", raw],
                   check=True, capture_output=True, timeout=30)
    client = Client(url)
    assert client.submit(str(back), "client-1", metadata={"crm": "4712"}) == "client-1"
    got = client.result("raw-1", timeout=90)
    assert got is not None, cluster["log"].read_text(errors="replace")[-3000:]
    want = next(t for t in TRUTH if t["file"].endswith("高娟 正面.jpg"))["fields"]
    assert got["kind"] == "item.finished" and got["status"] == "succeeded"
    assert got["fields"]["name"] == want["name"] and got["fields"]["id_number"] == want["id_number"]
    assert got["request"]["channel"] == "stream" and got["request"]["meta"] == {"crm": "4711"}
    other = client.result("client-1", timeout=60)
    assert other is not None and other["status"] == "succeeded"
    assert other["request"]["channel"] == "client" and other["request"]["meta"] == {"crm": "4712"}
    assert sandbox.stats.billed == 2
    # the same key again: no new item, no call, and the answer is there to read
    client.submit(str(back), "client-1")
    res = subprocess.run([*IDOCR, "submit", str(front), "--key", "raw-1", "--wait", "60", "--json"],
                         env=cluster["env"], capture_output=True, text=True, timeout=120,
                         cwd=cluster["tmp"], check=False)
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["status"] == "succeeded" and shown["fields"]["name"] == "高*"  # masked
    assert want["id_number"] not in res.stdout and want["name"] not in res.stdout
    assert "submitted before" in res.stderr
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while r.xlen("idocr:intake") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counts(pg)[:2] == (2, 2) and sandbox.stats.billed == 2

    # 2. 1,000 requests, a tenth of them repeating an earlier key: 900 calls
    images = distinct_images(root, DISTINCT, cluster["truth"], start=2, small=True)
    keys = [f"bulk-{i}" for i in range(DISTINCT)]
    order = [(keys[i], images[i]) for i in range(DISTINCT)]
    rng = random.Random(7)
    for _ in range(REPEATS):
        j = rng.randrange(DISTINCT)
        order.insert(rng.randrange(j + 1, len(order) + 1), (keys[j], images[j]))
    pipe = r.pipeline(transaction=False)
    for key, path in order:
        pipe.xadd("idocr:intake", {"request": json.dumps({"image": str(path), "key": key})})
    pipe.execute()
    t_bulk = time.monotonic()
    deadline = time.monotonic() + 240
    while True:
        reqs, items, waiting = counts(pg)
        if reqs == DISTINCT + 2 and not waiting and r.xlen("idocr:intake") == 0:
            break
        assert time.monotonic() < deadline, (reqs, items, waiting, cluster["log"].read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    print(f"1,000 requests answered in {time.monotonic() - t_bulk:.1f} s")
    assert items == DISTINCT + 2
    assert sandbox.stats.billed == DISTINCT + 2
    assert sandbox.stats.billed_twice() == {}
    with unit_of_work(pg, read_only=True) as s:
        statuses = dict(s.execute(select(Item.status, func.count()).group_by(Item.status)).all())
    assert statuses == {"succeeded": DISTINCT + 2}
    # every key has its answer
    deadline = time.monotonic() + 60
    while r.get(result_key(keys[-1])) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    values = r.mget([result_key(k) for k in keys])
    assert all(v is not None and json.loads(v)["status"] == "succeeded" for v in values)


def test_submit_says_why_it_refuses(tmp_path: Path, redis_url: str) -> None:
    env = idocr_env(IDOCR_DATABASE_URL=f"sqlite:///{tmp_path / 'idocr.db'}", IDOCR_REDIS_URL=redis_url,
                    IDOCR_DATA_DIR=str(tmp_path / ".idocr"), IDOCR_INTAKE_ROOTS=str(tmp_path / "in"))
    (tmp_path / "in").mkdir()
    outside = tmp_path / "110101195803020700.jpg"
    outside.write_bytes(CARDS[0].read_bytes())
    res = subprocess.run([*IDOCR, "submit", str(outside), "--key", "k1"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, check=False)
    assert res.returncode == 1, res.stderr
    assert "refused: location_refused" in res.stderr and "outside the intake roots" in res.stderr
    assert "110101195803020700" not in res.stderr + res.stdout
    res = subprocess.run([*IDOCR, "submit", str(outside), "--key", "no spaces please"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert res.returncode == 2 and "key: String should match pattern" in res.stderr
    res = subprocess.run([*IDOCR, "submit", "s3://b/k.jpg", "--key", "k2", "--metadata", "[1]"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert res.returncode == 2 and "--metadata must be a JSON object" in res.stderr
