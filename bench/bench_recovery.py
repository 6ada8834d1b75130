"""Recovery from infrastructure faults, measured: PostgreSQL, a Redis of the bench's own,
workers and beat started the plain Celery way, the sandbox answering at a fixed latency.

For each fault: the time from the fault to the last item final, how many items were left
unfinished (none may be), images billed twice (none may be), items failed ``unknown`` (their
call was in flight in a killed worker: billed once, answer lost).

    python bench/bench_recovery.py --images 200 --lease 30 --interval 15

Faults: a Redis killed and restarted empty 5 s later; PostgreSQL connections cut for 10 s;
SIGKILL of a worker's main process; SIGKILL of one prefork pool child. Each run starts fresh.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import database  # noqa: E402
from idocr_sandbox.cardset import make_card_set  # noqa: E402
from idocr_sandbox.server import SandboxConfig, SandboxServer  # noqa: E402
from idocr_sandbox.truth import TruthIndex  # noqa: E402
from tests.e2e import test_recovery as rec  # noqa: E402
from tests.faults import OwnRedis, TcpProxy, children, kill_group  # noqa: E402

FAULTS = ("redis", "postgres", "worker", "child")


def run(fault: str, args: argparse.Namespace, folder: Path, truth: TruthIndex, work: Path) -> str:
    sandbox = SandboxServer(truth, SandboxConfig(latency=args.latency))
    sandbox.start()
    own = OwnRedis(work / "redis")
    proxy = TcpProxy(5432)
    try:
        with database(work) as db_url:
            c = rec.Cluster(work, db_url, sandbox, own, proxy)
            c.env.update(IDOCR_CLAIM_LEASE=str(args.lease), IDOCR_RECONCILE_INTERVAL=str(args.interval),
                         IDOCR_RATE_LIMIT=str(args.rate), IDOCR_INFRA_RETRY_FOR="600")
            try:
                first = c.worker("w1", pool="prefork" if fault == "child" else None,
                                 concurrency=args.concurrency)
                c.worker("w2", concurrency=args.concurrency)
                c.beat()
                time.sleep(3)
                t_start = time.monotonic()
                batch = c.scan(folder)
                c.wait_billed(args.images // 4, timeout=120)
                t_fault = time.monotonic()
                if fault == "redis":
                    own.kill()
                    time.sleep(5)
                    own.start()
                elif fault == "postgres":
                    proxy.cut()
                    time.sleep(10)
                    proxy.heal()
                elif fault == "worker":
                    c.busy_pid([first.pid])
                    kill_group(first)
                else:
                    os.kill(c.busy_pid(children(first.pid)), signal.SIGKILL)
                deadline = t_fault + args.lease + 2 * args.interval + args.images / args.rate * 3 + 120
                while True:
                    counts, pending = c.counts(batch)
                    if pending == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.25)
                t_end = time.monotonic()
                stats = sandbox.stats
                unknown = counts.get("failed", 0)
                return (f"{fault:9s} fault→all final {t_end - t_fault:6.1f} s (run {t_end - t_start:5.1f} s; "
                        f"bound lease+2×interval {args.lease + 2 * args.interval:.0f} s + work)  "
                        f"unfinished {pending}  billed {stats.billed}/{args.images}  "
                        f"billed twice {len(stats.billed_twice())}  failed unknown {unknown}  {counts}")
            finally:
                c.stop()
    finally:
        proxy.close()
        own.stop()
        sandbox.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--lease", type=float, default=30)
    p.add_argument("--interval", type=float, default=15)
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--faults", default=",".join(FAULTS))
    args = p.parse_args()
    rec.IMAGES = args.images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth = TruthIndex.load(make_card_set(root / "in", args.images, seed=11))
        print(f"{args.images} images, 2 workers × {args.concurrency}, {args.rate:g}/s, provider "
              f"{args.latency * 1000:.0f} ms, lease {args.lease:g} s, reconcile every {args.interval:g} s")
        for i, fault in enumerate(args.faults.split(",")):
            work = root / f"run{i}"
            work.mkdir()
            print(run(fault, args, root / "in", truth, work), flush=True)


if __name__ == "__main__":
    main()
