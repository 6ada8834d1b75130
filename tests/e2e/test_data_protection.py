"""Personal data at rest, as a user runs idocr on PostgreSQL: a database dump holds no name, ID
number or address of the cards; `idocr find` finds a card by ID number; exports carry the real
values; `idocr keys rotate` while workers process loses nothing and leaves every value under the
new key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from idocr_sandbox.cardset import make_card_set
from idocr_sandbox.truth import TruthIndex
from pipeline.domain.masking import mask_id_number
from pipeline.storage.crypto import new_key_entry
from pipeline.storage.db import engine_for, unit_of_work
from pipeline.storage.models import FINAL_STATUSES, Item
from tests.conftest import IDOCR, TEST_DATA_KEYS, idocr_env

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def idocr(*args: str, env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IDOCR, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def cards(tmp_path: Path, name: str, n: int, seed: int) -> tuple[Path, list[dict]]:
    folder = tmp_path / name
    truth = make_card_set(folder, n, seed=seed)
    return folder, json.loads(truth.read_text(encoding="utf-8"))["images"]


def sandbox_env(sandbox, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return idocr_env(
        IDOCR_PROVIDER="ihuyi", IDOCR_IHUYI_BASE_URL=sandbox.url,
        IDOCR_IHUYI_ACCOUNT="sandbox", IDOCR_IHUYI_API_KEY="sandbox-key", **extra,
    )


def export(env: dict[str, str], cwd: Path, batch: str) -> dict[str, dict]:
    res = idocr("export", batch, env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return {rec["key"]: rec for rec in map(json.loads, res.stdout.splitlines())}


def assert_truth(records: dict[str, dict], truth: list[dict]) -> None:
    assert len(records) == len(truth)
    for entry in truth:
        rec = records[entry["file"].split("/", 1)[1]]
        assert rec["status"] == "succeeded", rec["status"]
        assert {k: rec[k] for k in entry["fields"]} == entry["fields"]


def pg_dump(url: str) -> str:
    u = make_url(url)
    res = subprocess.run(
        ["pg_dump", "--no-owner", "-h", u.host or "127.0.0.1", "-p", str(u.port or 5432),
         "-U", u.username or "postgres", "-d", u.database or ""],
        capture_output=True, timeout=120, check=True,
    )
    return res.stdout.decode("utf-8")


def personal_values(truth: list[dict]) -> list[str]:
    out = []
    for entry in truth:
        f = entry["fields"]
        out += [f[k] for k in ("name", "id_number", "domicile", "issue_authority") if f.get(k)]
    return out


def test_a_dump_of_the_database_holds_no_personal_data(tmp_path: Path, sandbox_factory, pg_url: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    folder, truth = cards(tmp_path, "in", 10, seed=51)
    sandbox = sandbox_factory(truth=TruthIndex.load(folder.parent / "in.truth.json"))
    env = sandbox_env(sandbox, IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url)
    res = idocr("run", str(folder), "--batch", "nightly", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    dump = pg_dump(pg_url)
    # the dump does hold the work: every table's rows, the results sealed under the suite's key
    kid = TEST_DATA_KEYS.split(":")[0]
    assert "COPY public.results" in dump and "COPY public.items" in dump
    assert dump.count(f"enc1:{kid}:") >= 9 * len(truth) // 2
    secrets = personal_values(truth)
    assert len(secrets) >= 2 * len(truth)
    leaked = [v for v in secrets if v in dump]
    assert leaked == []
    # nor the ID numbers in another spelling, nor the key itself
    for entry in truth:
        number = entry["fields"].get("id_number")
        if number:
            assert number.lower() not in dump
    assert TEST_DATA_KEYS.split(":")[1] not in dump

    # the export is where the values are
    assert_truth(export(env, tmp_path, "nightly"), truth)

    # find by ID number: the item, masked
    front = next(e for e in truth if e["side"] == "front")
    number = front["fields"]["id_number"]
    res = idocr("find", "--id-number", number, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert number not in res.stdout and mask_id_number(number) in res.stdout
    assert front["fields"]["name"] not in res.stdout
    res = idocr("find", "--id-number", f" {number.lower()} ", "--json", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert row["batch"] == "nightly" and row["side"] == "front"
    assert row["id_number"] == mask_id_number(number)
    with unit_of_work(pg_url, read_only=True) as s:
        item = s.get(Item, row["item"])
        assert item is not None and item.source_key == front["file"].split("/", 1)[1]
    # a number of no card: nothing found, exit 1
    other = "110101190001010000" if number != "110101190001010000" else "110101190001020000"
    res = idocr("find", "--id-number", other, env=env, cwd=tmp_path)
    assert res.returncode == 1 and res.stdout.count("\n") <= 4


def _start_worker(env: dict[str, str], cwd: Path, name: str) -> subprocess.Popen[bytes]:
    log = (cwd / f"{name}.log").open("wb")
    return subprocess.Popen(
        [*IDOCR, "worker", "-c", "2", "-n", f"{name}@%h"],
        env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _not_final(url: str, batch: str) -> int:
    with unit_of_work(url, read_only=True) as s:
        return s.scalar(
            select(func.count()).select_from(Item).where(
                Item.batch_id == batch, Item.status.not_in(list(FINAL_STATUSES))
            )
        ) or 0


def test_rotation_while_workers_process_loses_nothing(tmp_path: Path, sandbox_factory, pg_url: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    old = TEST_DATA_KEYS
    new = new_key_entry("rot")
    first, truth1 = cards(tmp_path, "first", 6, seed=61)
    second, truth2 = cards(tmp_path, "second", 24, seed=62)
    truth_file = tmp_path / "all.truth.json"
    truth_file.write_text(json.dumps({"images": truth1 + truth2}, ensure_ascii=False), encoding="utf-8")
    sandbox = sandbox_factory(truth=TruthIndex.load(truth_file), latency=0.3)
    env_old = sandbox_env(sandbox, IDOCR_DATABASE_URL=pg_url, IDOCR_REDIS_URL=redis_url, IDOCR_DATA_KEYS=old)

    # a finished batch, and a second one waiting, all under the old key
    res = idocr("run", str(first), "--batch", "first", env=env_old, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = idocr("scan", str(second), "--batch", "second", env=env_old, cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    # the new key first, the old one kept for reading; workers restarted with it
    env_both = {**env_old, "IDOCR_DATA_KEYS": f"{new},{old}", "IDOCR_RATE_LIMIT": "4"}
    workers = [_start_worker(env_both, tmp_path, "w1"), _start_worker(env_both, tmp_path, "w2")]
    try:
        deadline = time.monotonic() + 60
        while _not_final(pg_url, "second") == 24 and time.monotonic() < deadline:
            time.sleep(0.2)
        pending_at_start = _not_final(pg_url, "second")
        rotated = idocr("keys", "rotate", "--batch-size", "2", env=env_both, cwd=tmp_path)
        assert rotated.returncode in (0, 3), rotated.stderr
        # the rotation ran while the workers were settling items of the second batch
        assert 0 < pending_at_start < 24
        deadline = time.monotonic() + 180
        while _not_final(pg_url, "second") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _not_final(pg_url, "second") == 0, (tmp_path / "w1.log").read_text()[-3000:]
    finally:
        for w in workers:
            _stop(w)
    counts = dict(line.split("\t", 1) for line in rotated.stdout.splitlines())
    assert int(counts["results.name"].split()[0]) >= len(truth1) // 2
    assert int(counts["results.id_number_index"].split()[0]) >= len(truth1) // 2

    # what was left by the first run (rows the workers held) goes with a second one
    again = idocr("keys", "rotate", env=env_both, cwd=tmp_path)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "every value is under key rot" in again.stderr

    # the old key removed: everything still opens, every card is right, each billed once
    env_new = {**env_old, "IDOCR_DATA_KEYS": new}
    assert_truth(export(env_new, tmp_path, "first"), truth1)
    assert_truth(export(env_new, tmp_path, "second"), truth2)
    assert sandbox.stats.billed == len(truth1) + len(truth2)
    dump = pg_dump(pg_url)
    old_kid = old.split(":")[0]
    assert f"enc1:{old_kid}:" not in dump and f"det1:{old_kid}:" not in dump
    assert f"\t{old_kid}:" not in dump  # no blind index of the old key
    assert "enc1:rot:" in dump
    # the old key alone no longer reads anything: one line naming the missing key, no data
    res = idocr("export", "first", env=env_old, cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "'rot'" in res.stderr and "IDOCR_DATA_KEYS" in res.stderr and res.stdout == ""
    # find works with the new key alone
    number = next(e for e in truth2 if e["side"] == "front")["fields"]["id_number"]
    res = idocr("find", "--id-number", number, "--json", env=env_new, cwd=tmp_path)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 1, res.stderr
    engine_for(pg_url).dispose()
