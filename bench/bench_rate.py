"""Global rate through the whole pipeline: `idocr scan` + N `idocr worker` processes against the
sandbox (ihuyi protocol) with a fixed latency, versus a sequential client.

Prints: sustained rate as a fraction of the limit, the most calls in any one-second window
(sliding), calls billed twice, worker overhead per image, worker peak memory.

    python bench/bench_rate.py --rate 20 --latency 0.2 --workers 4 --images 400

Needs Redis (default redis://127.0.0.1:6379/12, flushed) and PostgreSQL (a temporary
database is created on --pg-admin-url); --sqlite uses a SQLite file instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (
    PG_ADMIN_URL,
    RemoteSandbox,
    database,
    peak_rss_mib,
    scan,
    worker_env,
    workers,
)
from pipeline.domain.images import ImageLimits
from pipeline.workflows.processing import Processor, RetryPolicy
from pipeline.workflows.producer import scan as scan_folder
from pipeline.providers.base import ImagePayload
from pipeline.providers.ihuyi import IhuyiClient
from idocr_sandbox.cardset import make_card_set
from idocr_sandbox.server import SandboxConfig, SandboxServer
from idocr_sandbox.truth import TruthIndex
from pipeline.sources.local import LocalSource
from pipeline.storage.db import upgrade


def sliding_max(times: list[float], window: float = 1.0) -> int:
    return sliding_max_at(times, window)[0]


def sliding_max_at(times: list[float], window: float = 1.0) -> tuple[int, float]:
    """The most events in any half-open window of ``window`` seconds, and where it starts."""
    best, at, j = 0, 0.0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        if i - j + 1 > best:
            best, at = i - j + 1, times[j]
    return best, at


def pipeline_run(args: argparse.Namespace, work: Path, folder: Path, truth: Path) -> None:
    sandbox = RemoteSandbox(truth, args.latency)
    redis.Redis.from_url(args.redis_url).flushdb()
    try:
        with database(work, sqlite=args.sqlite, pg_admin_url=args.pg_admin_url) as db_url:
            env = worker_env(sandbox, db_url, args.redis_url, work,
                             IDOCR_RATE_LIMIT=str(args.rate), IDOCR_CONCURRENCY=str(args.concurrency))
            with workers(args.workers, env, work) as procs:
                time.sleep(4)  # workers connect; the first calls then meet a warm pool
                t0 = time.time()
                scan(folder, env)
                deadline = time.time() + args.images / args.rate * 3 + 60
                while sandbox.billed() < args.images and time.time() < deadline:
                    time.sleep(0.5)
                elapsed = time.time() - t0
                peaks = [peak_rss_mib(w.pid) for w in procs]
                stats = sandbox.stats()
    finally:
        sandbox.stop()

    calls = sorted(c["at"] for c in stats["calls"])
    billed_twice = [sha for sha, n in stats["billed_by_sha"].items() if n > 1]
    n = len(calls)
    # steady state: from the first call + 1 s to the last call - 1 s (ramp-up and tail excluded)
    lo, hi = calls[0] + 1.0, calls[-1] - 1.0
    steady = [t for t in calls if lo <= t < hi]
    sustained = len(steady) / (hi - lo) if hi > lo else float("nan")
    print(f"pipeline: {args.workers} worker processes x {args.concurrency} threads, "
          f"limit {args.rate}/s, provider latency {args.latency * 1000:.0f} ms, {args.images} images")
    print(f"  billed {n} calls in {calls[-1] - calls[0]:.1f} s (scan to last call {elapsed:.1f} s)")
    print(f"  sustained rate {sustained:.2f}/s = {sustained / args.rate * 100:.1f} % of the limit "
          f"(first to last call: {(n - 1) / (calls[-1] - calls[0]) / args.rate * 100:.1f} %)")
    most, at = sliding_max_at(calls)
    print(f"  most calls in any 1-second window (sliding): {most} "
          f"(limit {args.rate:g}, {most / args.rate * 100 - 100:+.1f} %), at +{at - calls[0]:.2f} s")
    per_second: dict[int, int] = {}
    for t in calls:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    gaps = sorted(b - a for a, b in zip(calls, calls[1:]))
    print(f"  most calls in one calendar second: {max(per_second.values())}; gaps between calls: "
          f"p1 {gaps[len(gaps) // 100] * 1000:.0f} ms, median {statistics.median(gaps) * 1000:.0f} ms, "
          f"p99 {gaps[len(gaps) * 99 // 100] * 1000:.0f} ms")
    if args.verbose:
        print("  first calls (s from the first):", " ".join(f"{t - calls[0]:.3f}" for t in calls[:25]))
    print(f"  images billed twice: {len(billed_twice)}")
    print(f"  worker peak RSS: {', '.join(f'{p:.0f}' for p in peaks)} MiB (main process + children)")


def sequential(args: argparse.Namespace, folder: Path, truth: Path) -> None:
    sandbox = SandboxServer(TruthIndex.load(truth), SandboxConfig(latency=args.latency, quota=10**9))
    sandbox.start()
    client = IhuyiClient("sandbox", "sandbox-key", sandbox.url)
    files = sorted(folder.iterdir())[: args.sequential]
    t0 = time.perf_counter()
    for f in files:
        client.submit(ImagePayload(data=f.read_bytes()))
    elapsed = time.perf_counter() - t0
    client.close()
    sandbox.stop()
    print(f"sequential client: {len(files)} calls in {elapsed:.1f} s = {len(files) / elapsed:.2f}/s "
          f"({args.images / (len(files) / elapsed):.0f} s for {args.images} images)")


def overhead(args: argparse.Namespace, work: Path, folder: Path, truth: Path) -> None:
    """Per-image cost of the worker's own steps (claim, read, checks, sign, persist), measured
    in one thread against a zero-latency sandbox and an unthrottled limiter."""
    from pipeline.coordination.quota import QuotaExhausted, QuotaLedger
    from pipeline.coordination.ratelimit import RateLimiter

    sandbox = SandboxServer(TruthIndex.load(truth), SandboxConfig(quota=10**9))
    sandbox.start()
    db_url = f"sqlite:///{work / 'overhead.db'}"
    upgrade(db_url)
    ids: list[int] = []
    scan_folder(LocalSource(folder), database_url=db_url, batch_id="o", provider="sandbox", enqueue=ids.extend)
    r = redis.Redis.from_url(args.redis_url)
    provider = IhuyiClient("sandbox", "sandbox-key", sandbox.url, name="sandbox")
    proc = Processor(
        database_url=db_url, provider=provider, limits=ImageLimits(), retry=RetryPolicy(1, 0.1, 0.1),
        worker_id="bench", limiter=RateLimiter(r, "idocr:rate:bench:overhead", 1e6, 1000),
        quota=QuotaLedger(r, "bench", "overhead"), quota_exhausted=QuotaExhausted,
    )
    ids = ids[: args.sequential * 2]
    times = []
    for i in ids:
        t = time.perf_counter()
        proc.process(i)
        times.append(time.perf_counter() - t)
    t_http = []
    data = next(folder.iterdir()).read_bytes()
    for _ in range(len(ids)):
        t = time.perf_counter()
        provider.submit(ImagePayload(data=data))
        t_http.append(time.perf_counter() - t)
    sandbox.stop()
    med, http = statistics.median(times) * 1000, statistics.median(t_http) * 1000
    print(f"per-image worker time (SQLite, local sandbox, no latency): median {med:.1f} ms, "
          f"of which the HTTP round trip {http:.1f} ms -> overhead {med - http:.1f} ms/image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--sequential", type=int, default=50, help="calls timed for the sequential client")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    ap.add_argument("--sqlite", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "cards"
        t = time.time()
        truth = make_card_set(folder, args.images, seed=11)
        print(f"setup: {args.images} synthetic cards in {time.time() - t:.1f} s")
        pipeline_run(args, work, folder, truth)
        sequential(args, folder, truth)
        overhead(args, work, folder, truth)


if __name__ == "__main__":
    main()
