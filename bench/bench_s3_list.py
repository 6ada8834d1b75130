"""Benchmark: how fast does S3Source.iter_refs list a large prefix, and in how much memory?

    PYTHONPATH=. python bench/bench_s3_list.py                 # own SeaweedFS server, 100k objects
    PYTHONPATH=. python bench/bench_s3_list.py --n 20000
    PYTHONPATH=. python bench/bench_s3_list.py --endpoint-url http://127.0.0.1:8333 --bucket b

Setup (uploading N tiny objects with many threads) is timed but is not the measurement. Each
measurement runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) belongs to the listing
alone and not to the upload's thread pool:

* ``stream``       — ``for ref in iter_refs()``: the way the producer consumes it;
* ``stream+trace`` — the same under tracemalloc, for the peak of Python allocations;
* ``list()``       — ``list(iter_refs())`` for contrast: what holding the whole listing costs.

Credentials: against the server started here, dummy ones; with ``--endpoint-url`` the standard
AWS chain of the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.s3 import make_s3_client
from pipeline.sources.s3 import S3Source


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# -- measurement (child process) -------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    source = S3Source(
        f"s3://{args.bucket}/{args.prefix}",
        endpoint_url=args.endpoint_url,
        region=args.region,
        page_size=args.page_size,
    )
    # Warm the client (credential resolution, endpoint) outside the timed part.
    source.client.head_bucket(Bucket=args.bucket)
    tracing = args.mode == "stream+trace"
    if tracing:
        import tracemalloc

        tracemalloc.start()
    base_rss = _maxrss_mib()
    count = 0
    total_bytes = 0
    first_ref_s: float | None = None
    started = time.perf_counter()
    if args.mode == "list()":
        refs = list(source.iter_refs())
        first_ref_s = None
        count = len(refs)
        total_bytes = sum(r.size or 0 for r in refs)
    else:
        for ref in source.iter_refs():
            if first_ref_s is None:
                first_ref_s = time.perf_counter() - started
            count += 1
            total_bytes += ref.size or 0
    elapsed = time.perf_counter() - started
    result: dict[str, Any] = {
        "mode": args.mode,
        "count": count,
        "bytes": total_bytes,
        "seconds": elapsed,
        "keys_per_s": count / elapsed if elapsed else 0.0,
        "first_ref_ms": first_ref_s * 1000 if first_ref_s is not None else None,
        "rss_base_mib": base_rss,
        "rss_peak_mib": _maxrss_mib(),
    }
    if tracing:
        import tracemalloc

        result["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return result


# -- setup (parent process) ------------------------------------------------------------------


def upload(client: Any, bucket: str, prefix: str, n: int, threads: int) -> float:
    """Put n tiny objects under prefix, spread over 100 sub-folders; returns seconds taken."""
    body = b"\xff\xd8\xff\xe0 tiny"
    done = 0
    lock = threading.Lock()
    started = time.perf_counter()

    def put_range(lo: int, hi: int) -> None:
        nonlocal done
        for i in range(lo, hi):
            client.put_object(
                Bucket=bucket, Key=f"{prefix}{i % 100:02d}/scan-{i:07d}.jpg", Body=body
            )
        with lock:
            done += hi - lo
            if done % 10_000 < hi - lo:
                rate = done / (time.perf_counter() - started)
                print(f"  uploaded {done:>7}/{n} ({rate:,.0f}/s)", flush=True)

    chunk = 500
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(put_range, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
        for f in futures:
            f.result()
    return time.perf_counter() - started


def run_child(args: argparse.Namespace, mode: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        mode,
        "--endpoint-url",
        args.endpoint_url or "",
        "--bucket",
        args.bucket,
        "--prefix",
        args.prefix,
        "--page-size",
        str(args.page_size),
    ]
    if args.region:
        cmd += ["--region", args.region]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(n: int, results: list[dict[str, Any]]) -> None:
    print()
    print(f"iter_refs over {n:,} objects (page size {results[0].get('page_size', '')})")
    header = f"{'mode':<14}{'keys':>9}{'seconds':>9}{'keys/s':>10}{'1st ref ms':>11}"
    header += f"{'RSS base':>10}{'RSS peak':>10}{'growth':>8}{'tracemalloc':>13}"
    print(header)
    for r in results:
        trace = r.get("tracemalloc_peak_mib")
        first = r["first_ref_ms"]
        print(
            f"{r['mode']:<14}{r['count']:>9,}{r['seconds']:>9.2f}{r['keys_per_s']:>10,.0f}"
            f"{(f'{first:.1f}' if first is not None else '-'):>11}"
            f"{r['rss_base_mib']:>9.1f}M{r['rss_peak_mib']:>9.1f}M"
            f"{r['rss_peak_mib'] - r['rss_base_mib']:>7.1f}M"
            f"{(f'{trace:.2f} MiB' if trace is not None else '-'):>13}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="objects to upload and list")
    parser.add_argument("--endpoint-url", default=None, help="use this S3 endpoint (no own server)")
    parser.add_argument("--region", default=None)
    parser.add_argument("--bucket", default=None, help="bucket (default: a new one)")
    parser.add_argument("--prefix", default="bench/")
    parser.add_argument("--threads", type=int, default=32, help="upload threads (setup only)")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--skip-upload", action="store_true", help="the objects are already there")
    parser.add_argument("--no-contrast", action="store_true", help="skip the list() run")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if not args.prefix.endswith("/"):
        args.prefix += "/"

    if args.measure:
        args.mode = args.measure
        args.endpoint_url = args.endpoint_url or None
        print(json.dumps(measure(args)))
        return 0

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        server = None
        if args.endpoint_url is None:
            from tests.s3server import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, REGION, S3Server

            server = S3Server(tmp).start()
            print(f"SeaweedFS ready in {server.startup_seconds:.1f} s at {server.endpoint_url}")
            args.endpoint_url = server.endpoint_url
            args.region = args.region or REGION
            env.update(
                AWS_ACCESS_KEY_ID=DUMMY_ACCESS_KEY,
                AWS_SECRET_ACCESS_KEY=DUMMY_SECRET_KEY,
                AWS_EC2_METADATA_DISABLED="true",
            )
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
        try:
            client = make_s3_client(
                endpoint_url=args.endpoint_url,
                region=args.region,
                max_pool_connections=args.threads,
            )
            if args.bucket is None:
                args.bucket = f"bench-{uuid.uuid4().hex[:12]}"
                client.create_bucket(Bucket=args.bucket)
            if not args.skip_upload:
                print(f"uploading {args.n:,} objects with {args.threads} threads (setup)…")
                seconds = upload(client, args.bucket, args.prefix, args.n, args.threads)
                print(f"setup: {args.n:,} objects in {seconds:.1f} s ({args.n / seconds:,.0f}/s)")
            modes = ["stream", "stream+trace"] + ([] if args.no_contrast else ["list()"])
            results = []
            for mode in modes:
                result = run_child(args, mode, env)
                result["page_size"] = args.page_size
                results.append(result)
            report(args.n, results)
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
