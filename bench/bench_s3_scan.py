"""Benchmark: `idocr scan s3://…` over a large prefix — listing, inserting items (PostgreSQL)
and enqueueing one message per item (Redis) — keys per second and peak memory.

    python bench/bench_s3_scan.py                  # own SeaweedFS server, 100,000 objects
    python bench/bench_s3_scan.py --n 20000
    python bench/bench_s3_scan.py --endpoint-url http://127.0.0.1:8333 --bucket b --skip-upload

The scan runs as the CLI runs it, in a subprocess (its peak RSS is the scan's alone), against
a temporary PostgreSQL database and Redis database 12 (flushed). A second scan of the same
prefix into a new batch is timed too: it must enqueue nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_s3_list import upload
from pipeline.s3 import make_s3_client
from pipeline.storage.crypto import new_key_entry

# the child prints its own peak RSS after the scan
CHILD = (
    "import resource, sys; from pipeline.cli import main\n"
    "try:\n    main()\n"
    "finally:\n"
    "    print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def scan(env: dict[str, str], uri: str, batch: str) -> tuple[float, float, str]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, "scan", uri, "--batch", batch],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t
    if res.returncode:
        sys.exit(res.stderr)
    rss = int(re.search(r"maxrss_kib (\d+)", res.stderr).group(1)) / 1024
    return elapsed, rss, res.stderr.splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--endpoint-url")
    ap.add_argument("--bucket")
    ap.add_argument("--prefix", default="scans/2026-11-21/")
    ap.add_argument("--skip-upload", action="store_true")
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()

    import redis
    from sqlalchemy import create_engine, text

    from pipeline.storage.db import upgrade
    from tests.s3server import S3Server

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.endpoint_url is None:
            server = S3Server(Path(tmp) / "s3")
            server.__enter__()
            args.endpoint_url = server.endpoint_url
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        bucket = args.bucket or f"bench-{secrets.token_hex(3)}"
        dbname = f"idocr_bench_{secrets.token_hex(4)}"
        admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
        try:
            client = make_s3_client(endpoint_url=args.endpoint_url)
            if not args.skip_upload:
                client.create_bucket(Bucket=bucket)
                t = time.perf_counter()
                upload(client, bucket, args.prefix, args.n, args.threads)
                print(f"setup: uploaded {args.n} objects in {time.perf_counter() - t:.0f} s (not measured)")
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{dbname}"'))
            db_url = args.pg_admin_url.rsplit("/", 1)[0] + f"/{dbname}"
            upgrade(db_url)
            r = redis.Redis.from_url(args.redis_url)
            r.flushdb()
            env = {k: v for k, v in os.environ.items() if not k.startswith("IDOCR_")}
            env.update(IDOCR_DATABASE_URL=db_url, IDOCR_REDIS_URL=args.redis_url,
                       IDOCR_S3_ENDPOINT_URL=args.endpoint_url, IDOCR_DATA_DIR=str(Path(tmp) / ".idocr"),
                       IDOCR_DATA_KEYS=os.environ.get("IDOCR_DATA_KEYS") or new_key_entry("bench"),
                       AWS_ACCESS_KEY_ID=os.environ["AWS_ACCESS_KEY_ID"],
                       AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"],
                       AWS_DEFAULT_REGION=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            uri = f"s3://{bucket}/{args.prefix}"
            elapsed, rss, line = scan(env, uri, "first")
            queued = r.llen("ocr")
            print(f"first scan: {args.n} keys in {elapsed:.1f} s = {args.n / elapsed:,.0f} keys/s "
                  f"(listing + insert + enqueue, process start included); peak RSS {rss:.0f} MiB")
            print(f"  {line}; {queued} messages in the queue")
            # what every image has in common after a night's run: mark the batch succeeded
            with create_engine(db_url).begin() as c:
                c.execute(text("UPDATE items SET status='succeeded' WHERE status='queued'"))
            elapsed, rss, line = scan(env, uri, "second")
            print(f"second scan (all succeeded before): {elapsed:.1f} s = {args.n / elapsed:,.0f} keys/s; "
                  f"peak RSS {rss:.0f} MiB; {r.llen('ocr') - queued} new messages")
            print(f"  {line}")
        finally:
            from pipeline.storage.db import engine_for

            try:
                engine_for(args.pg_admin_url.rsplit("/", 1)[0] + f"/{dbname}").dispose()
            except Exception:
                pass
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
            if server is not None:
                server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
