"""Benchmark the global rate limiter: many processes, one limit, one Redis.

    python bench/bench_ratelimit.py --rate 50 --processes 8 --seconds 5
    python bench/bench_ratelimit.py --max-wait 0     # no booking: the try/sleep/retry loop

Prints the achieved rate against the limit, the most grants seen in any one-second window, the
wait per acquire (mean, p99) and Redis round trips per grant. Grant times are each client's
``time.time()`` after its sleep, i.e. when it would call the provider.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

import redis

# run from a plain checkout too (spawned children re-import this file and get the same path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.coordination.ratelimit import DEFAULT_MAX_WAIT, RateLimiter


class CountingRedis(redis.Redis):
    """Counts commands sent: each is one round trip (no pipelines are used here)."""

    commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def client_process(
    url: str,
    key: str,
    rate: float,
    burst: int,
    max_wait: float,
    inbox: multiprocessing.Queue[Any],
    out: multiprocessing.Queue[Any],
) -> None:
    client = cast(CountingRedis, CountingRedis.from_url(url))  # from_url builds cls
    limiter = RateLimiter(client, key, rate, burst, max_wait=max_wait)
    client.ping()  # connect before the start, so setup is not timed
    out.put("ready")
    start_at, end_at = inbox.get()
    time.sleep(max(0.0, start_at - time.time()))
    client.commands = 0
    grants: list[float] = []
    waits: list[float] = []
    while True:
        waits.append(limiter.acquire())
        now = time.time()
        grants.append(now)
        if now >= end_at:
            break
    out.put((grants, waits, client.commands))
    client.close()


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best = lo = 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="limit, calls per second")
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--max-wait",
        type=float,
        default=DEFAULT_MAX_WAIT,
        help="how far ahead a slot may be booked; 0 = no booking (poll)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()

    key = f"idocr:bench:rate:{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("spawn")
    inbox: multiprocessing.Queue[Any] = ctx.Queue()
    out: multiprocessing.Queue[Any] = ctx.Queue()
    procs = [
        ctx.Process(
            target=client_process,
            args=(args.redis_url, key, args.rate, args.burst, args.max_wait, inbox, out),
        )
        for _ in range(args.processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        out.get(timeout=60)
    start_at = time.time() + 0.2
    end_at = start_at + args.seconds
    for _ in procs:
        inbox.put((start_at, end_at))
    results = [out.get(timeout=args.seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    redis.Redis.from_url(args.redis_url).delete(key)

    all_grants = [t for grants, _, _ in results for t in grants]
    in_window = [t for t in all_grants if start_at <= t < end_at]
    waits = sorted(w for _, ws, _ in results for w in ws)
    commands = sum(c for _, _, c in results)
    per_process = [sum(start_at <= t < end_at for t in grants) for grants, _, _ in results]
    achieved = len(in_window) / args.seconds
    p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]

    print(
        f"limit          {args.rate:g}/s, burst {args.burst}, {args.processes} processes, "
        f"{args.seconds:g} s, max_wait {args.max_wait:g} s"
    )
    print(
        f"achieved       {achieved:.2f}/s ({len(in_window)} grants, "
        f"{100 * achieved / args.rate:.1f}% of limit)"
    )
    # client stamps trail their slots by wake-up latency (~1 ms): at high rates that alone adds
    # a grant or two to an exact 1 s window, so a 5 ms shorter window is shown beside it
    print(
        f"max in any 1 s {max_in_window(in_window)} (0.995 s: {max_in_window(in_window, 0.995)}; "
        f"limit + burst = {args.rate + args.burst:g})"
    )
    print(f"wait/acquire   mean {1000 * statistics.fmean(waits):.1f} ms, p99 {1000 * p99:.1f} ms")
    print(
        f"round trips    {commands / len(all_grants):.2f} per grant "
        f"({commands} commands, {len(all_grants)} grants)"
    )
    print(f"per process    min {min(per_process)}, max {max(per_process)} grants")


if __name__ == "__main__":
    main()
