"""The pipeline's own cost per image against a bare client's, on the same emulator in the same
run: the sandbox in a process of its own, no rate limit, zero (or a fixed) latency.

    python bench/bench_overhead.py --images 300 --workers 2 --concurrency 8 [--sqlite] [--latency 0.2]
    python bench/bench_overhead.py --task-items 1      # a queue message per item
    python bench/bench_overhead.py --profile 200      # CPU per stage, one worker thread in-process
    python bench/bench_overhead.py --pool gevent      # needs `pip install gevent` (not a dependency)

The pipeline: `idocr worker` processes (plain Celery, thread pool unless --pool) on PostgreSQL
(or SQLite) and a Redis of the bench's own; `idocr scan` of the folder, timed to the last item
final. The bare client: the same number of threads posting the same signed requests
(`IhuyiClient.submit`, with the pipeline's own encoding and HTTP shortcuts) with nothing else;
the plain client: the same, written as a client of the API document would be (base64 text,
`sign_submit`, `httpx.Client.post(data=form)`). Printed: images/s of both and their ratio, CPU
seconds per image of the worker processes (user + system, children included) and of the bare
client, and with --profile a cProfile summary by stage.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import IDOCR, RemoteSandbox, database  # noqa: E402
from pipeline.providers.base import ImagePayload  # noqa: E402
from pipeline.providers.ihuyi import IhuyiClient  # noqa: E402
from pipeline.providers.ihuyi_sign import sign_submit  # noqa: E402
from idocr_sandbox.cardset import make_card_set  # noqa: E402
from tests.faults import OwnRedis, children, kill_group  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its (reaped and living) children."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += (utime + stime + cutime + cstime) / TICK
    return total


def server_cpu(name: str) -> float:
    """user + system CPU of every process called ``name`` (PostgreSQL's backends, Redis)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() != name:
                continue
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:13]) / TICK
    return total


OTHERS: dict[str, float] = {}


def pipeline_run(args: argparse.Namespace, folder: Path, sandbox: RemoteSandbox, work: Path) -> tuple[float, float]:
    own = OwnRedis(work / "redis")
    try:
        with database(work, sqlite=args.sqlite) as db_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("IDOCR_")}
            env.update(
                IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url, IDOCR_IHUYI_ACCOUNT="sandbox",
                IDOCR_IHUYI_API_KEY="sandbox-key", IDOCR_DATABASE_URL=db_url, IDOCR_REDIS_URL=own.url,
                IDOCR_DATA_DIR=str(work / ".idocr"), IDOCR_RATE_LIMIT="100000", IDOCR_RATE_BURST="1000",
                IDOCR_CONCURRENCY=str(args.concurrency), IDOCR_TASK_ITEMS=str(args.task_items),
                # personal data is encrypted at rest outside the embedded default: the cost counts
                IDOCR_DATA_KEYS="bench:" + base64.b64encode(os.urandom(32)).decode(),
            )
            procs = []
            for i in range(args.workers):
                cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-n", f"o{i}@%h",
                       "-c", str(args.concurrency), "--without-gossip", "--without-mingle",
                       "--loglevel", "WARNING"]
                if args.pool:
                    cmd += ["-P", args.pool]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                              stderr=(work / f"w{i}.log").open("wb"), start_new_session=True))
            try:
                time.sleep(6)  # connected and warmed up (first balance reading, codecs)
                spy = None
                if args.spy:  # py-spy samples the first worker for the whole run (idle included)
                    spy = subprocess.Popen(["py-spy", "record", "-p", str(procs[0].pid), "-r", "1000",
                                            "--format", "raw", "-o", args.spy, "--nonblocking", "--gil"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                cpu0 = sum(cpu_seconds(p.pid) for p in procs)
                pg0, redis0 = server_cpu("postgres"), server_cpu("redis-server")
                emu0 = cpu_seconds(sandbox._proc.pid)
                billed0 = sandbox.billed()
                t0 = time.perf_counter()
                assert billed0 == 0, "one pipeline run per sandbox"
                children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                sc = subprocess.run([*IDOCR, "scan", str(folder)], env=env, check=False, capture_output=True)
                children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                OTHERS["scan"] = (children1.ru_utime + children1.ru_stime
                                  - children0.ru_utime - children0.ru_stime)
                if sc.returncode:
                    raise SystemExit(f"scan failed: {sc.stderr.decode()[-2000:]}")
                while sandbox.billed() - billed0 < args.images:
                    time.sleep(0.05)
                    if time.perf_counter() - t0 > 600:
                        raise SystemExit("the pipeline did not finish in 10 minutes")
                from sqlalchemy import create_engine, text

                engine = create_engine(db_url)
                with engine.connect() as c:
                    while c.execute(text("SELECT count(*) FROM items WHERE status IN "
                                         "('queued', 'submitting')")).scalar():
                        time.sleep(0.02)
                        c.rollback()
                engine.dispose()
                t_end = time.time()
                cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
                OTHERS["PostgreSQL"] = server_cpu("postgres") - pg0
                OTHERS["Redis"] = server_cpu("redis-server") - redis0
                OTHERS["emulator"] = cpu_seconds(sandbox._proc.pid) - emu0
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait()
                # from the first call the provider saw: the scan command's own start-up is not
                # the workers' throughput
                first = min(c["at"] for c in sandbox.stats()["calls"])
                elapsed = t_end - first
            finally:
                for p in procs:
                    kill_group(p)
                    p.wait()
    finally:
        own.stop()
    return args.images / elapsed, cpu / args.images


def bare_run(args: argparse.Namespace, folder: Path, sandbox: RemoteSandbox, plain: bool = False) -> tuple[float, float]:
    """The same number of threads posting the same signed requests with nothing else around them.
    ``plain``: as a client written from the API document would (base64 text, ``sign_submit``,
    ``httpx.Client.post(data=form)`` encoding the form); otherwise through ``IhuyiClient``, with
    every encoding and HTTP shortcut the pipeline itself takes: the stricter of the two bars."""
    files = sorted(folder.iterdir())[: args.images]
    data = [f.read_bytes() for f in files]
    threads = args.workers * args.concurrency
    url = f"{sandbox.url}/ocr/Submit.json"
    clients: list[Any] = [httpx.Client(timeout=30) if plain else IhuyiClient("sandbox", "sandbox-key", sandbox.url)
                          for _ in range(threads)]
    nxt = iter(range(len(data)))
    lock = threading.Lock()
    done: list[int] = []

    def post_plain(client: httpx.Client, image: bytes) -> None:
        b64 = base64.b64encode(image).decode()
        t = int(time.time())
        form = {"account": "sandbox", "password": sign_submit("sandbox", "sandbox-key", b64, "", t),
                "app": "idcard", "time": str(t), "img_base64": b64}
        resp = client.post(url, data=form)
        resp.raise_for_status()
        resp.json()

    def work(client: Any) -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            if plain:
                post_plain(client, data[i])
            else:
                client.submit(ImagePayload(data=data[i]))
            with lock:
                done.append(i)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for c in clients:
        c.close()
    if len(done) != len(data):
        raise SystemExit(f"the {'plain' if plain else 'bare'} client sent {len(done)} of {len(data)}")
    return len(data) / elapsed, cpu / len(data)


class StageClock:
    """CPU time (this thread's) spent inside each stage's entry points, outermost call only: a
    Redis script that runs a command counts once, under Redis."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self._local = threading.local()

    def wrap(self, owner: object, name: str, stage: str) -> None:
        original = getattr(owner, name)
        clock = self

        def timed(*args: object, **kwargs: object) -> object:
            if getattr(clock._local, "inside", False):
                return original(*args, **kwargs)
            clock._local.inside = True
            t = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                clock.cpu[stage] = clock.cpu.get(stage, 0.0) + time.thread_time() - t
                clock._local.inside = False

        setattr(owner, name, timed)


def profile_run(args: argparse.Namespace, folder: Path, sandbox: RemoteSandbox, work: Path) -> None:
    """One worker thread in-process: where a successful image's CPU goes, by stage."""
    import redis
    import redis.client
    import redis.commands.core
    from sqlalchemy.orm import Session

    import pipeline.workflows.processing as processing
    from pipeline.config import Settings
    from pipeline.workflows.producer import scan
    from pipeline.runtime import build_processor
    from pipeline.sources.local import LocalSource

    own = OwnRedis(work / "redis-p")
    try:
        with database(work, sqlite=args.sqlite) as db_url:
            settings = Settings(provider="ihuyi", task_items=args.task_items, ihuyi_base_url=sandbox.url, ihuyi_account="sandbox",
                                ihuyi_api_key="sandbox-key", database_url=db_url, redis_url=own.url,
                                data_dir=work / ".idocr-p", rate_limit=100000, rate_burst=1000)
            proc = build_processor(settings)
            ids: list[int] = []
            scan(LocalSource(folder), database_url=db_url, batch_id="p", provider="ihuyi",
                 enqueue=ids.extend)
            ids = ids[: args.profile]
            proc.process(ids[0])  # warm: connections, codecs
            clock = StageClock()
            clock.wrap(processing, "prepare", "image decode/normalise (images.prepare)")
            clock.wrap(processing, "check_fields", "checks (validation)")
            clock.wrap(proc.provider, "prepare", "request encoding (provider.prepare)")
            clock.wrap(proc.provider, "send", "HTTP call (provider.send)")
            for name in ("execute", "commit", "rollback", "close", "get", "scalar", "scalars", "flush"):
                clock.wrap(Session, name, "database (SQLAlchemy and driver)")
            from sqlalchemy.engine import Connection

            for name in ("execute", "commit", "rollback", "close"):
                clock.wrap(Connection, name, "database (SQLAlchemy and driver)")
            clock.wrap(redis.Redis, "execute_command", "Redis (limiter, ledger, marks)")
            clock.wrap(redis.client.Pipeline, "execute", "Redis (limiter, ledger, marks)")
            clock.wrap(redis.commands.core.Script, "__call__", "Redis (limiter, ledger, marks)")
            t0, c0 = time.perf_counter(), time.thread_time()
            for k in range(1, len(ids), settings.task_items):  # as the queue packs them
                proc.process_many(ids[k : k + settings.task_items])
            n = len(ids) - 1
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            redis.Redis.from_url(own.url).close()
    finally:
        own.stop()
    print(f"profile ({'SQLite' if args.sqlite else 'PostgreSQL'}, one thread, {n} images): "
          f"{cpu / n * 1000:.1f} ms CPU and {wall / n * 1000:.1f} ms wall per image")
    for stage, t in sorted(clock.cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:42s} {t / n * 1000:6.2f} ms")
    rest = cpu - sum(clock.cpu.values())
    print(f"  {'the pipeline' + chr(39) + 's own Python':42s} {rest / n * 1000:6.2f} ms")
    own_cost = cpu - clock.cpu.get("image decode/normalise (images.prepare)", 0) - clock.cpu.get(
        "request encoding (provider.prepare)", 0)
    print(f"  CPU per image outside image decoding and request encoding: {own_cost / n * 1000:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--task-items", type=int, default=8, help="items per queue message")
    p.add_argument("--pool", choices=["threads", "prefork", "gevent"], default=None)
    p.add_argument("--sqlite", action="store_true")
    p.add_argument("--spy", help="py-spy's collapsed stacks of the first worker to this file")
    p.add_argument("--profile", type=int, default=0, help="only profile this many images in-process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        truth = make_card_set(work / "cards", args.images, seed=5)
        sandbox = RemoteSandbox(truth, args.latency, port=18000 + os.getpid() % 1000)
        try:
            if args.profile:
                profile_run(args, work / "cards", sandbox, work)
                return
            rate, cpu = pipeline_run(args, work / "cards", sandbox, work)
            bare_rate, bare_cpu = bare_run(args, work / "cards", sandbox)
            plain_rate, plain_cpu = bare_run(args, work / "cards", sandbox, plain=True)
        finally:
            sandbox.stop()
    db = "SQLite" if args.sqlite else "PostgreSQL"
    print(f"{args.images} images, {args.workers} workers × {args.concurrency} "
          f"({args.pool or 'threads'}), {db}, provider latency {args.latency * 1000:.0f} ms, "
          f"{args.task_items} items a message")
    print(f"  pipeline    {rate:7.1f} images/s   {cpu * 1000:6.1f} ms CPU per image (worker processes)")
    print(f"  bare client {bare_rate:7.1f} images/s   {bare_cpu * 1000:6.1f} ms CPU per image")
    print(f"  plain client {plain_rate:6.1f} images/s   {plain_cpu * 1000:6.1f} ms CPU per image "
          "(httpx post(data=form), the fields signed by sign_submit)")
    print(f"  ratio pipeline / bare client: {rate / bare_rate:.2f}; pipeline / plain client: "
          f"{rate / plain_rate:.2f}")
    others = ", ".join(f"{k} {v / args.images * 1000:.1f} ms" for k, v in OTHERS.items())
    print(f"  during the pipeline run, CPU per image of the other processes: {others}")


if __name__ == "__main__":
    main()
