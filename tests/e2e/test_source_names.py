"""File names are personal data: a batch whose files are named by ID numbers leaves no such
number in plain text in the database or in what the commands print, while the workers still
read the files and the export still shows the real names. And the folder source's rules for
hidden files and links, as the scan report counts them, with --follow-symlinks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.conftest import EXAMPLES, IDOCR, idocr_env

# synthetic, valid-shaped ID numbers (not real people's)
ID_A = "110101199003074514"
ID_B = "11010519491231002X"
ID_FOLDER = "110105194912310029"


def idocr(*args: str, env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IDOCR, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ihuyi_env(sandbox, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return idocr_env(
        IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url,
        IDOCR_IHUYI_ACCOUNT="sandbox", IDOCR_IHUYI_API_KEY="sandbox-key", **extra,
    )


def _plain_ids(text: str) -> set[str]:
    return set(re.findall("|".join((ID_A, ID_B, ID_FOLDER)), text))


def _pg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_id_number_file_names_are_sealed_at_rest_and_masked_in_output(
    tmp_path: Path, sandbox_factory, pg_url: str, redis_url: str  # type: ignore[no-untyped-def]
) -> None:
    images = EXAMPLES / "images"
    folder = tmp_path / "scans"
    (folder / ID_FOLDER).mkdir(parents=True)
    shutil.copy(images / "高娟 正面.jpg", folder / f"{ID_A}_正面.jpg")
    shutil.copy(images / "高娟 背面.jpg", folder / f"{ID_A}_背面.jpg")
    shutil.copy(images / "front side 01.png", folder / ID_FOLDER / f"{ID_B}.png")
    (folder / f".{ID_B}.jpg").write_bytes(b"hidden")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(images / "back side 02.png", outside / "b.png")
    (folder / f"{ID_B}-link.png").symlink_to(outside / "b.png")

    sandbox = sandbox_factory()
    env = ihuyi_env(sandbox, IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url)
    res = idocr("run", str(folder), "--batch", "names", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _plain_ids(res.stdout + res.stderr) == set(), res.stderr
    # what was not taken is counted in the report
    assert "1 hidden" in res.stderr and "1 symlink_outside_root" in res.stderr
    st = idocr("status", "names", env=env, cwd=tmp_path)
    assert st.returncode == 0 and "every item is final" in st.stdout
    assert _plain_ids(st.stdout + st.stderr) == set()
    assert sandbox.stats.billed == 3  # the workers read every file
    log = tmp_path / ".idocr" / "logs" / "worker.log"
    if log.exists():
        assert _plain_ids(log.read_text(encoding="utf-8", errors="replace")) == set()

    # at rest: no ID number taken from a name, in any column of items or batches
    with psycopg.connect(_pg(pg_url)) as conn:
        rows = conn.execute(
            "SELECT source_key, source_uri, coalesce(pair_key, ''), fingerprint FROM items"
        ).fetchall()
        sources = conn.execute("SELECT source FROM batches").fetchall()
    assert len(rows) == 3
    at_rest = json.dumps([rows, sources], ensure_ascii=False)
    assert _plain_ids(at_rest) == set() and "正面" not in at_rest
    assert all(r[0].startswith("det1:") and r[1].startswith("det1:") for r in rows)

    # the export is the product: the real names, read back
    out = idocr("export", "names", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    recs = {r["key"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(recs) == {f"{ID_A}_正面.jpg", f"{ID_A}_背面.jpg", f"{ID_FOLDER}/{ID_B}.png"}
    assert all(r["status"] == "succeeded" for r in recs.values())
    assert recs[f"{ID_A}_正面.jpg"]["source"] == (folder / f"{ID_A}_正面.jpg").as_uri()
    # the two sides were paired by their shared name (a sealed pair key compares as well)
    check = recs[f"{ID_A}_正面.jpg"]["checks"]["valid_period_matches_age"]
    assert check["with"] == f"{ID_A}_背面.jpg"

    # a rescan into the same batch finds every name already there
    again = idocr("scan", str(folder), "--batch", "names", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "0 queued" in again.stderr and "3 already in the batch" in again.stderr


@pytest.mark.parametrize("how", ["option", "setting"])
def test_links_out_of_the_folder_are_taken_on_request(
    tmp_path: Path, redis_url: str, how: str
) -> None:
    folder, outside = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    outside.mkdir()
    shutil.copy(EXAMPLES / "images" / "高娟 正面.jpg", folder / "a.jpg")
    shutil.copy(EXAMPLES / "images" / "高娟 背面.jpg", outside / "b.jpg")
    (folder / "b.jpg").symlink_to(outside / "b.jpg")
    (folder / ".thumbs").mkdir()
    env = idocr_env(IDOCR_REDIS_URL=redis_url, IDOCR_DATA_KEYS="")
    res = idocr("scan", str(folder), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "1 queued" in res.stderr
    assert "not taken: 1 hidden, 1 symlink_outside_root" in res.stderr
    if how == "option":
        res = idocr("scan", str(folder), "--follow-symlinks", env=env, cwd=tmp_path)
    else:
        res = idocr("scan", str(folder), env={**env, "IDOCR_FOLLOW_SYMLINKS": "1"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "not taken: 1 hidden;" in res.stderr or res.stderr.rstrip().endswith("not taken: 1 hidden")
    assert "2 files" in res.stderr
    if how == "setting":  # the option wins over the setting
        res = idocr(
            "scan", str(folder), "--no-follow-symlinks",
            env={**env, "IDOCR_FOLLOW_SYMLINKS": "1"}, cwd=tmp_path,
        )
        assert "1 symlink_outside_root" in res.stderr
    assert os.path.islink(folder / "b.jpg")
