"""Benchmark: purging personal data (`idocr purge`) on PostgreSQL — items per second, and how
long the longest transaction took, by chunk size.

    python bench/bench_retention.py                 # 100,000 items, half with a result
    python bench/bench_retention.py --n 20000 --chunk 500 --chunk 5000
    python bench/bench_retention.py --sqlite

The items are written as the producer and workers write them (sealed names, sealed result
fields, the ID number's blind index), made old, then purged in full with each chunk size in
turn (a fresh copy of the rows for each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import update  # noqa: E402

from bench.harness import database  # noqa: E402  (sets the data key first)
from pipeline.storage import repo  # noqa: E402
from pipeline.storage.db import unit_of_work  # noqa: E402
from pipeline.storage.models import Item, ItemStatus, utcnow  # noqa: E402
from pipeline.workflows.retention import PurgeReport, purge  # noqa: E402

FIELDS = {
    "name": "张三",
    "gender": "男",
    "ethnicity": "汉",
    "date_of_birth": "1990-03-07",
    "domicile": "北京市东城区某街道1号",
    "id_number": "110101199003074514",
    "issue_authority": "北京市公安局东城分局",
    "valid_from": "2010-01-01",
    "valid_to": "2030-01-01",
}


def fill(url: str, n: int, batch: str) -> None:
    with unit_of_work(url) as s:
        repo.get_or_create_batch(s, batch, "file:///data/scans/", "sandbox")
    step = 2000
    for start in range(0, n, step):
        rows = [
            repo.NewItem(
                f"{110101199003070000 + i}_正面.jpg",
                f"file:///data/scans/{110101199003070000 + i}_正面.jpg",
                f"sha256:{batch}{i:058x}"[:71],
                sha256=f"{i:064x}",
            )
            for i in range(start, min(n, start + step))
        ]
        with unit_of_work(url) as s:
            added = repo.add_items(s, batch, rows, new_batch=True)
            ids = [a.id for a in added]
            s.execute(
                update(Item)
                .where(Item.id.in_(ids))
                .values(status=ItemStatus.SUCCEEDED, code="2", ocrid="ocr", attempts=1)
                .execution_options(synchronize_session=False)
            )
            for item_id in ids[::2]:  # half succeeded with a result, half without
                repo.save_result(
                    s,
                    dict(
                        item_id=item_id,
                        provider="sandbox",
                        side="front",
                        quality=None,
                        checks={"id_number_checksum": {"ok": True}},
                        raw={"code": 2},
                        **FIELDS,
                    ),
                )
    with unit_of_work(url) as s:
        s.execute(
            update(Item)
            .where(Item.batch_id == batch)
            .values(updated_at=utcnow() - timedelta(days=400))
            .execution_options(synchronize_session=False)
        )
        repo.refresh_statistics(s)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, action="append")
    ap.add_argument("--sqlite", action="store_true")
    args = ap.parse_args()
    chunks = args.chunk or [1000, 5000]
    with tempfile.TemporaryDirectory() as work, database(Path(work), sqlite=args.sqlite) as url:
        for chunk in chunks:
            batch = f"b{chunk}"
            t = time.perf_counter()
            fill(url, args.n, batch)
            print(f"{args.n} items written in {time.perf_counter() - t:.1f} s", flush=True)
            longest = 0.0
            last = time.perf_counter()

            def tick(rep: PurgeReport) -> None:
                nonlocal longest, last
                now = time.perf_counter()
                longest, last = max(longest, now - last), now

            rep = purge(url, older_than=timedelta(days=30), chunk=chunk, on_chunk=tick)
            print(
                f"{'sqlite' if args.sqlite else 'postgresql'} chunk {chunk}: {rep.items} items "
                f"({rep.results} results) purged in {rep.seconds:.1f} s = {rep.rate:,.0f} items/s, "
                f"{rep.transactions} transactions, the longest {longest * 1000:.0f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
