"""A paid quota smaller than the work: `idocr scan` + N `idocr worker` processes (the first with
the beat scheduler) against the sandbox (ihuyi protocol, its own process) holding ``--quota``
calls, then a top-up on the provider's side.

Prints: calls billed before the pause and whether any was refused for quota (4051), what the
other images were doing meanwhile (none may have failed), how long the balance monitor took to
see the top-up and resume, and whether any image was billed twice.

    python bench/bench_quota.py --images 200 --quota 50 --workers 4

Needs Redis (default redis://127.0.0.1:6379/12, flushed) and PostgreSQL (a temporary database
on --pg-admin-url); --sqlite uses a SQLite file instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import PG_ADMIN_URL, RemoteSandbox, database, scan, worker_env, workers
from idocr_sandbox.cardset import make_card_set


def statuses(db_url: str) -> dict[str, int]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            return dict(c.execute(text("SELECT status, count(*) FROM items GROUP BY status")).all())
    finally:
        engine.dispose()


def answered(stats: dict, code: str) -> int:  # type: ignore[type-arg]
    return sum(c.get(code, 0) for c in stats["codes"].values())


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--quota", type=int, default=50)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--balance-interval", type=float, default=60.0, help="IDOCR_BALANCE_INTERVAL")
    ap.add_argument("--balance-interval-paused", type=float, default=10.0, help="IDOCR_BALANCE_INTERVAL_PAUSED")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    ap.add_argument("--sqlite", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "cards"
        truth = make_card_set(folder, args.images, seed=23)
        redis.Redis.from_url(args.redis_url).flushdb()
        sandbox = RemoteSandbox(truth, args.latency, quota=args.quota)
        try:
            with database(work, sqlite=args.sqlite, pg_admin_url=args.pg_admin_url) as db_url:
                env = worker_env(
                    sandbox, db_url, args.redis_url, work, IDOCR_RATE_LIMIT=str(args.rate),
                    IDOCR_CONCURRENCY=str(args.concurrency), IDOCR_BALANCE_INTERVAL=str(args.balance_interval),
                    IDOCR_BALANCE_INTERVAL_PAUSED=str(args.balance_interval_paused),
                )
                with workers(args.workers, env, work, beat=True):
                    time.sleep(4)
                    t0 = time.time()
                    scan(folder, env)
                    # paused: the quota is spent and nothing has moved for a while
                    last = [-1, time.time()]

                    def settled() -> bool:
                        billed = sandbox.stats()["billed"]
                        if billed != last[0]:
                            last[:] = [billed, time.time()]
                        return billed >= args.quota and time.time() - last[1] > 5

                    if not wait_until(settled, args.images / args.rate * 3 + 60):
                        sys.exit(f"no pause: {sandbox.stats()['billed']} billed, {statuses(db_url)}")
                    paused_stats, paused_items = sandbox.stats(), statuses(db_url)
                    t_paused = last[1] - t0

                    t_top = time.time()
                    sandbox.add_quota(args.images)
                    resumed = wait_until(lambda: sandbox.stats()["billed"] > paused_stats["billed"],
                                         3 * args.balance_interval_paused + 30)
                    t_resume = time.time() - t_top
                    done = wait_until(lambda: statuses(db_url).get("succeeded", 0) >= args.images,
                                      args.images / args.rate * 3 + 60)
                    t_done = time.time() - t_top
                    final_stats, final_items = sandbox.stats(), statuses(db_url)
        finally:
            sandbox.stop()

    twice = [sha for sha, n in final_stats["billed_by_sha"].items() if n > 1]
    waiting = sum(n for s, n in paused_items.items() if s in ("queued", "paused", "submitting"))
    print(f"quota: {args.images} images, {args.quota} calls paid for, {args.workers} worker processes x "
          f"{args.concurrency} threads, {args.rate:g}/s, latency {args.latency * 1000:.0f} ms, "
          f"balance readings every {args.balance_interval:g} s, {args.balance_interval_paused:g} s while paused")
    print(f"  before the top-up: billed {paused_stats['billed']} (quota {args.quota}), refused for quota "
          f"(4051) {answered(paused_stats, '4051')}, calls stopped {t_paused:.1f} s after the scan")
    print(f"  items then: {paused_items}; waiting {waiting}, failed {paused_items.get('failed', 0)}")
    print(f"  top-up of {args.images}: first new call after {t_resume:.1f} s" if resumed
          else "  top-up: NO resume")
    print(f"  finished {t_done:.1f} s after the top-up" if done else f"  NOT finished: {final_items}")
    print(f"  in all: billed {final_stats['billed']} for {args.images} images, 4051 answers "
          f"{answered(final_stats, '4051')}, images billed twice {len(twice)}, items {final_items}")


if __name__ == "__main__":
    main()
