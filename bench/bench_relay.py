"""Events per second through the relay, on PostgreSQL: to the results stream (XADD pipelined,
one transaction per relay batch), with one relay and with several sharing the outbox (SKIP
LOCKED), and to a local webhook receiver (signed POSTs, keep-alive).

    python -m bench.bench_relay [--events 20000] [--webhook-events 3000] [--relays 3]

Outbox rows are ``item.finished`` events of real items with results (the relay reads each
item's record, as it does in production). Redis: a redis-server of its own on a free port.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, insert, select

from bench.harness import database
from pipeline.outputs.events import Outbox
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Event, Item, Result
from pipeline.workflows.relay import Relay, Webhook
from tests.faults import OwnRedis

STREAM = "idocr:results"


def fill(url: str, n: int, *, webhook: bool, batch: str) -> None:
    """``n`` succeeded items with results and their item.finished events."""
    outbox = Outbox(webhook=webhook)
    chunk = 2000
    with unit_of_work(url) as s:
        repo.get_or_create_batch(s, batch, "/bench", "sandbox")
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        with unit_of_work(url) as s:
            rows = [
                repo.NewItem(f"{batch}/{i}.jpg", f"/bench/{batch}/{i}.jpg", f"sha256:{batch}-{i}")
                for i in range(start, start + size)
            ]
            ids = [a.id for a in repo.add_items(s, batch, rows, new_batch=start == 0)]
            s.execute(
                insert(Result),
                [
                    {
                        "item_id": i,
                        "provider": "sandbox",
                        "side": "front",
                        "name": "测试",
                        "gender": "女",
                        "ethnicity": "汉",
                        "date_of_birth": "1958-03-02",
                        "domicile": "北京市东城区中山路229号",
                        "id_number": "110101195803020700",
                        "checks": {"id_number": "ok"},
                        "raw": {},
                    }
                    for i in ids
                ],
            )
            for i in ids:
                repo.set_status(s, i, "succeeded", code="2", ocrid=f"o{i}")
            outbox.items_finished(s, batch, [(i, "succeeded", None) for i in ids])


def unpublished(url: str) -> int:
    with unit_of_work(url, read_only=True) as s:
        return s.scalar(select(func.count()).select_from(Event).where(Event.published_at.is_(None))) or 0


def run_relays(url: str, redis_url: str, n_relays: int, batch: int) -> float:
    relays = [
        Relay(database_url=url, redis_client=redis.Redis.from_url(redis_url), stream=STREAM, batch=batch)
        for _ in range(n_relays)
    ]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=r.drain, args=(600,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


class Sink:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                with sink.lock:
                    sink.count += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--webhook-events", type=int, default=3000)
    ap.add_argument("--relays", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        own = OwnRedis(work / "redis")
        try:
            r = redis.Redis.from_url(own.url)
            print(f"PostgreSQL, redis-server of its own; relay batch {args.batch}")
            for n_relays in (1, args.relays):
                with database(work) as url:
                    fill(url, args.events, webhook=False, batch=f"b{n_relays}")
                    r.delete(STREAM)
                    secs = run_relays(url, own.url, n_relays, args.batch)
                    on_stream = r.xlen(STREAM)
                    left = unpublished(url)
                print(
                    f"results stream, {n_relays} relay(s): {args.events} events in {secs:.2f} s = "
                    f"{args.events / secs:,.0f} events/s (stream entries {on_stream}, "
                    f"unpublished left {left})"
                )
            sink = Sink()
            with database(work) as url:
                fill(url, args.webhook_events, webhook=True, batch="wh")
                hook = Webhook(url=sink.url, secret=b"bench-secret", timeout=10)
                relay = Relay(
                    database_url=url,
                    redis_client=r,
                    stream=STREAM,
                    batch=args.batch,
                    webhook=hook,
                )
                t0 = time.perf_counter()
                while True:
                    relay.run_once()
                    with unit_of_work(url, read_only=True) as s:
                        pending = s.scalar(
                            select(func.count()).select_from(Event).where(Event.delivery_state == "pending")
                        )
                    if not pending:
                        break
                secs = time.perf_counter() - t0
                relay.close()
                with unit_of_work(url, read_only=True) as s:
                    delivered = s.scalar(
                        select(func.count()).select_from(Event).where(Event.delivery_state == "delivered")
                    )
                    items = s.scalar(select(func.count()).select_from(Item))
            print(
                f"stream + webhook (local receiver, {hook.parallel} POSTs in flight): "
                f"{delivered} of {items + 1} events delivered in {secs:.2f} s = "
                f"{delivered / secs:,.0f} events/s (receiver counted {sink.count})"
            )
        finally:
            own.stop()


if __name__ == "__main__":
    main()
