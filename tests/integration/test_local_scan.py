"""A folder with hostile entries scans to the end on both databases: odd names become items,
what is not taken is counted in the scan report."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select

from pipeline.workflows.producer import scan
from pipeline.sources.local import LocalSource
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import Item

JPEG = b"\xff\xd8\xff\xe0" + b"1" * 100


def test_scan_counts_what_it_skips_and_records_odd_names(db_url: str, tmp_path: Path) -> None:
    root, outside = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(JPEG + b"s")
    (root / "ok.jpg").write_bytes(JPEG + b"o")
    (root / ".DS_Store").write_bytes(b"x")
    (root / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "loop").symlink_to(root)
    for raw in (b"caf\xe9.jpg", b"two\nlines.jpg", b"y" * 251 + b".jpg"):
        with open(os.path.join(os.fsencode(root), raw), "wb") as fh:
            fh.write(JPEG + raw)

    sent: list[int] = []
    report = scan(
        LocalSource(root), database_url=db_url, batch_id="b1", provider="sandbox",
        enqueue=sent.extend,
    )
    assert (report.seen, report.queued, report.rejected) == (4, 4, 0)
    assert report.skipped_files == {"hidden": 1, "symlink_outside_root": 1, "symlink_loop": 1}
    with unit_of_work(db_url, read_only=True) as s:
        keys = sorted(s.scalars(select(Item.source_key)))
    assert keys == sorted(["ok.jpg", "caf\\xe9.jpg", "two\\nlines.jpg", "y" * 251 + ".jpg"])
