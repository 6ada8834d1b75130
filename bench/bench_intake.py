"""Intake latency, measured: from the XADD of a request to its answer under the result key.

PostgreSQL, a Redis of the bench's own, the sandbox in a process of its own answering at once
(``--latency 0``), ``idocr worker`` processes (their intake consumers started on worker_ready)
and the relay publishing the outbox. Two runs:

* **one at a time**: a request, then wait for its answer, ``--sequential`` times: the latency an
  interactive caller sees;
* **a burst**: ``--burst`` requests added at once: each one's latency while the others queue,
  and the throughput.

    python bench/bench_intake.py --sequential 200 --burst 500 --workers 1 -c 8

The relay runs in the workers when they run it (``IDOCR_RELAY``); ``--relay-here`` runs one in
this process instead. Images are distinct bytes of the examples' cards (so content
de-duplication does not hide a call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.harness import RemoteSandbox, database, worker_env, workers  # noqa: E402
from pipeline.client import Client, result_key  # noqa: E402
from pipeline.storage.crypto import new_key_entry  # noqa: E402
from tests.faults import OwnRedis  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CARDS = [ROOT / "examples" / "images" / "高娟 正面.jpg", ROOT / "examples" / "images" / "高娟 背面.jpg"]


def images(folder: Path, n: int, start: int = 0) -> list[Path]:
    bases = [p.read_bytes() for p in CARDS]
    out = []
    for i in range(start, start + n):
        p = folder / f"card-{i:05d}.jpg"
        p.write_bytes(bases[i % 2] + f"#{i}".encode())
        out.append(p)
    return out


def truth_for(paths: list[Path], out: Path) -> Path:
    """A truth file naming every generated image by its sha256 (the sandbox answers without
    decoding it, as a provider at zero latency would)."""
    import hashlib

    examples = json.loads((ROOT / "examples" / "truth.json").read_text(encoding="utf-8"))["images"]
    by_name = {e["file"].rsplit("/", 1)[-1]: e for e in examples}
    base = [by_name[c.name] for c in CARDS]
    entries = [
        {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "side": base[n % 2]["side"],
         "fields": base[n % 2]["fields"]}
        for p in paths
        for n in [int(p.stem.split("-")[1])]  # the card it was made from: n % 2
    ]
    out.write_text(json.dumps({"images": entries}, ensure_ascii=False), encoding="utf-8")
    return out


class Watcher:
    """Reads the results stream from its start and notes when each request's answer arrives."""

    def __init__(self, url: str, stream: str = "idocr:results") -> None:
        self.r = redis.Redis.from_url(url)
        self.stream = stream
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        last = "0-0"
        while not self.stop.is_set():
            resp = self.r.xread({self.stream: last}, count=500, block=200)
            now = time.perf_counter()
            for _, entries in resp or []:
                for entry_id, fields in entries:
                    last = entry_id
                    body = json.loads(fields[b"body"])
                    key = (body.get("request") or {}).get("idempotency_key")
                    if key and body.get("kind") == "item.finished":
                        with self.cond:
                            self.seen.setdefault(key, now)
                            self.cond.notify_all()

    def wait(self, keys: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(k in self.seen for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def report(name: str, lat: list[float]) -> None:
    ms = [v * 1000 for v in lat]
    print(f"{name}: n={len(ms)}  p50 {pct(ms, 50):.0f} ms  p90 {pct(ms, 90):.0f} ms  "
          f"p99 {pct(ms, 99):.0f} ms  max {max(ms):.0f} ms  mean {statistics.mean(ms):.0f} ms")


def breakdown(db_url: str, added_at: dict[str, float]) -> None:
    """Where the time of the one-at-a-time requests went (medians, from the database's
    timestamps): intake, waiting for a worker, the provider call, writing, publishing."""
    from sqlalchemy import select

    from pipeline.storage.db import unit_of_work
    from pipeline.storage.models import Attempt, Event, Request

    parts: dict[str, list[float]] = {k: [] for k in ("recorded", "to call", "call", "to event", "to publish")}
    with unit_of_work(db_url, read_only=True) as s:
        rows = s.execute(
            select(Request.idempotency_key, Request.created_at, Attempt.started_at, Attempt.finished_at,
                   Event.created_at, Event.published_at)
            .join(Attempt, Attempt.item_id == Request.item_id)
            .join(Event, (Event.item_id == Request.item_id) & (Event.kind == "item.finished"))
            .where(Request.idempotency_key.in_(list(added_at)))
        ).all()
    for key, recorded, started, finished, evented, published in rows:
        if None in (started, finished, published):
            continue
        t = added_at[key]
        parts["recorded"].append(recorded.timestamp() - t)
        parts["to call"].append((started - recorded).total_seconds())
        parts["call"].append((finished - started).total_seconds())
        parts["to event"].append((evented - finished).total_seconds())
        parts["to publish"].append((published - evented).total_seconds())
    shown = "  ".join(f"{k} {1000 * statistics.median(v):.0f} ms" for k, v in parts.items() if v)
    print(f"  medians: {shown}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.0, help="the sandbox's answer delay (s)")
    ap.add_argument("--relay-here", action="store_true", help="run the relay in this process")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="idocr-bench-intake-") as tmp:
        work = Path(tmp)
        root = work / "intake"
        root.mkdir()
        seq_images = images(root, args.sequential)
        burst_images = images(root, args.burst, start=args.sequential)
        warm = images(root, 1, start=10**6)[0]
        truth = truth_for([*seq_images, *burst_images, warm], work / "truth.json")
        own = OwnRedis(work / "redis")
        sandbox = RemoteSandbox(truth, args.latency)
        keys = new_key_entry("bench")
        try:
            with database(work) as db_url:
                env = worker_env(sandbox, db_url, own.url, work, IDOCR_DATA_KEYS=keys,
                                 IDOCR_INTAKE_ROOTS=str(root), IDOCR_RATE_LIMIT="10000",
                                 IDOCR_RATE_BURST="100", IDOCR_CONCURRENCY=str(args.concurrency),
                                 IDOCR_RELAY="false" if args.relay_here else "true",
                                 IDOCR_RELAY_INTERVAL="0.05")
                relay = None
                if args.relay_here:
                    import os

                    os.environ["IDOCR_DATA_KEYS"] = keys
                    from pipeline.workflows.relay import Relay, RelayThread

                    relay = RelayThread(Relay(database_url=db_url, redis_client=redis.Redis.from_url(own.url),
                                              interval=0.05)).start()
                with workers(args.workers, env, work):
                    client = Client(own.url)
                    watcher = Watcher(own.url)
                    # warm up: the first request pays for connections and imports
                    client.submit(str(warm), "warm-up")
                    if client.result("warm-up", timeout=120) is None:
                        sys.exit(f"no answer to the warm-up request; see {work}/worker0.log")
                    lat = []
                    added_at: dict[str, float] = {}
                    for i, path in enumerate(seq_images):
                        key = f"seq-{i}"
                        t0 = time.perf_counter()
                        added_at[key] = time.time()
                        client.submit(str(path), key)
                        if not watcher.wait([key], 60):
                            sys.exit(f"no answer to {key} within 60 s")
                        lat.append(watcher.seen[key] - t0)
                    report("one at a time (XADD → result on the results stream)", lat)
                    breakdown(db_url, added_at)
                    # the result key is set in the same round trip as the stream entry
                    assert client.redis.get(result_key(f"seq-{args.sequential - 1}")) is not None

                    keys_b = [f"burst-{i}" for i in range(args.burst)]
                    pipe = client.redis.pipeline(transaction=False)
                    t0 = time.perf_counter()
                    sent = {}
                    for key, path in zip(keys_b, burst_images, strict=True):
                        pipe.xadd(client.stream, {"request": json.dumps({"image": str(path), "key": key})})
                    pipe.execute()
                    t_added = time.perf_counter()
                    for key in keys_b:
                        sent[key] = t0
                    if not watcher.wait(keys_b, 600):
                        sys.exit("the burst was not answered within 600 s")
                    blat = [watcher.seen[k] - sent[k] for k in keys_b]
                    span = max(watcher.seen[k] for k in keys_b) - t0
                    report(f"burst of {args.burst} (added in {1000 * (t_added - t0):.0f} ms)", blat)
                    print(f"burst throughput: {args.burst / span:.1f} requests/s answered "
                          f"({args.workers} worker(s) x {args.concurrency} threads)")
                    stats = sandbox.stats()
                    print(f"provider calls billed: {stats.get('billed')} for "
                          f"{args.sequential + args.burst + 1} requests")
                    watcher.stop.set()
                if relay is not None:
                    relay.stop()
        finally:
            sandbox.stop()
            own.stop()


if __name__ == "__main__":
    main()
