"""Accuracy and speed of the local OCR engine (provider ``local``) on generated cards.

Each image comes from :mod:`bench.cardgen` (its own renderer, six CJK faces, scans and phone
photos in any of four rotations) with its truth; it goes through the pipeline's image precheck
and the provider exactly as a worker sends it, then through the checks the processor runs.

Prints: per-field exact-match rates, the all-fields-exact rate (side and every field of it),
ID-number exact rate on fronts, how many images with a wrong ID number were flagged by a failed
check, and CPU seconds per image per core (the OCR call's own thread time: one image runs on
one core), with a breakdown by capture style and rotation.

    python bench/bench_local_ocr.py --images 300 --processes 2 [--seed 1000] [--show 10] [--hard]
        [--baseline]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cardgen import BACK, FRONT, make_sample

_provider: Any = None


class Baseline:
    """For comparison: one plain RapidOCR call and label regular expressions over the joined
    text (what the local engine does instead: geometry, constraints, second looks)."""

    name = "baseline"
    _FRONT: ClassVar[dict[str, str]] = {
        "name": r"姓名(.+?)性别",
        "gender": r"性别(男|女)",
        "ethnicity": r"民族(.+?)出生",
        "domicile": r"住址(.+?)公民身份号码",
        "id_number": r"公民身份号码([0-9Xx]{18})",
    }

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self._ocr = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)

    def submit(self, payload: Any) -> Any:
        import re
        from types import SimpleNamespace

        from pipeline.domain.checks import parse_date, parse_valid_period

        res, _ = self._ocr(payload.data)
        text = "".join(t for _, t, _ in res or []).replace(" ", "")
        fields: dict[str, str] = {}
        side = None
        if "公民身份号码" in text or "姓名" in text:
            side = "front"
            for key, pattern in self._FRONT.items():
                m = re.search(pattern, text)
                if m:
                    fields[key] = m.group(1).upper() if key == "id_number" else m.group(1)
            m = re.search(r"出生(\d{4})年(\d{1,2})月(\d{1,2})日", text)
            if m:
                fields["date_of_birth"] = parse_date("-".join(m.groups())) or ""
        elif "签发机关" in text or "有效期限" in text:
            side = "back"
            m = re.search(r"签发机关(.+?)有效期限", text)
            if m:
                fields["issue_authority"] = m.group(1)
            m = re.search(r"有效期限(.+)$", text)
            if m:
                a, b = parse_valid_period(m.group(1))
                fields.update({k: v for k, v in (("valid_from", a), ("valid_to", b)) if v})
        return SimpleNamespace(side=side, fields=fields, outcome="ok" if side else "image", raw={})


def _init(baseline: bool = False) -> None:
    global _provider
    from pipeline.providers.local import LocalOCRClient

    _provider = Baseline() if baseline else LocalOCRClient(parallel=1)


def _one(job: tuple[int, bool]) -> dict[str, Any]:
    seed, hard = job
    from pipeline.domain.images import ImageRejected, prepare
    from pipeline.domain.checks import check_fields
    from pipeline.providers.base import ImagePayload

    data, truth = make_sample(seed, hard=hard)
    try:
        payload = ImagePayload(data=prepare(data).data)
    except ImageRejected as exc:
        return {
            "truth": truth,
            "side": None,
            "fields": {},
            "outcome": f"rejected:{exc.reason}",
            "cpu": 0.0,
            "failed_checks": [],
            "lines": [],
        }
    assert _provider is not None
    t0 = time.thread_time()
    result = _provider.submit(payload)
    cpu = time.thread_time() - t0
    checks = (
        check_fields(result.side, result.fields, today=dt.date(2026, 11, 29)) if result.side else {}
    )
    failed = sorted(k for k, c in checks.items() if c["ok"] is False and c["level"] == "error")
    return {
        "truth": truth,
        "side": result.side,
        "fields": result.fields,
        "outcome": str(result.outcome),
        "cpu": cpu,
        "failed_checks": failed,
        "lines": (result.raw or {}).get("lines", []),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--show", type=int, default=0, help="print this many wrong fields (truth vs read)"
    )
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="measure a plain RapidOCR call with label regexes instead, for comparison",
    )
    ap.add_argument(
        "--hard",
        action="store_true",
        help="captures beyond usable (tiny, blurred, JPEG 15-40): how errors are flagged",
    )
    args = ap.parse_args()

    seeds = range(args.seed, args.seed + args.images)
    wall = time.monotonic()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.processes, initializer=_init, initargs=(args.baseline,)) as pool:
        results = pool.map(_one, [(s, args.hard) for s in seeds], chunksize=4)
    wall = time.monotonic() - wall

    per_field: dict[str, list[bool]] = defaultdict(list)
    by_group: dict[str, list[bool]] = defaultdict(list)
    all_exact, id_exact, wrong_ids, flagged, missing_ids = [], [], 0, 0, 0
    shown = 0
    for r in results:
        t = r["truth"]
        keys = FRONT if t["side"] == "front" else BACK
        ok_side = r["side"] == t["side"]
        exact = ok_side
        for k in keys:
            good = ok_side and r["fields"].get(k) == t["fields"][k]
            per_field[k].append(good)
            exact = exact and good
            if not good and shown < args.show:
                shown += 1
                print(
                    f"  seed {t['seed']} {t['style']} rot {t['rotation']} {k}: "
                    f"{t['fields'][k]!r} read {r['fields'].get(k)!r} (side {r['side']})"
                )
        all_exact.append(exact)
        by_group[f"{t['style']}"].append(exact)
        by_group[f"rotation {t['rotation']}"].append(exact)
        if t["side"] == "front":
            got = r["fields"].get("id_number") if ok_side else None
            id_exact.append(got == t["fields"]["id_number"])
            if got is None:
                missing_ids += 1
            elif got != t["fields"]["id_number"]:
                wrong_ids += 1
                flagged += bool(r["failed_checks"])

    def pct(xs: list[bool]) -> str:
        return f"{100 * sum(xs) / len(xs):6.2f} % ({sum(xs)}/{len(xs)})" if xs else "   n/a"

    cpu = sum(r["cpu"] for r in results)
    print(
        f"images: {len(results)} (fronts {len(id_exact)}, backs {len(results) - len(id_exact)}), "
        f"{args.processes} processes, seeds {args.seed}..{args.seed + args.images - 1}"
        + (" (hard captures)" if args.hard else "")
        + (" - BASELINE: one plain RapidOCR call, label regexes" if args.baseline else "")
    )
    print("outcomes:", dict(Counter(r["outcome"] for r in results)))
    for k in (*FRONT, *BACK):
        print(f"  {k:16s} exact {pct(per_field[k])}")
    print(f"all fields exact     {pct(all_exact)}")
    print(f"ID number exact      {pct(id_exact)} of fronts")
    print(
        f"wrong ID flagged     {flagged}/{wrong_ids} by a failed check; "
        f"{missing_ids} fronts without an ID number"
    )
    for g in sorted(by_group):
        print(f"  {g:16s} all exact {pct(by_group[g])}")
    worst = max(r["cpu"] for r in results)
    print(f"CPU per image        {cpu / len(results):.3f} s per core (max {worst:.2f} s)")
    rate = len(results) / wall
    print(f"wall                 {wall:.1f} s, {rate:.2f} images/s on {args.processes} processes")


if __name__ == "__main__":
    main()
