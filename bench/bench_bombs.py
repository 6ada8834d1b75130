"""Benchmark: peak memory of `prepare` fed hostile images, against ordinary ones.

Each case runs in a fresh process: sixteen files through ``pipeline.domain.images.prepare`` on eight
threads (what one ``-c 8`` worker does), then the process's peak RSS (``ru_maxrss``):

* ``ordinary``            — the example cards, a 12 MP phone photo (JPEG) and an A4 page scanned
  at 300 dpi (PNG), repeated to sixteen;
* ``7000x7000 png``       — sixteen 160 KB one-colour PNGs of 49 megapixels;
* ``... limits lifted``   — the same with the pixel and memory limits out of the way: what
  decoding them costs;
* ``every bomb``          — each file of ``tests/bombs.py`` twice (header-only giants, a
  1x100000 strip, 10000x10000 JPEGs, PDFs drawing a 12000x12000 image or a strip page).

    .venv/bin/python -m bench.bench_bombs
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_RUN = textwrap.dedent(
    """
    import json, resource, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from pipeline.domain.images import ImageLimits, ImageRejected, prepare

    paths, lifted = json.loads(sys.argv[1]), sys.argv[2] == "1"
    limits = ImageLimits(max_pixels=10**10, max_decode_bytes=10**12) if lifted else ImageLimits()
    files = [Path(p).read_bytes() for p in paths]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def one(data):
        try:
            prepare(data, limits)
        except ImageRejected as exc:
            return exc.reason
        return "sent"

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, files))
    print(json.dumps({
        "outcomes": outcomes, "seconds": time.monotonic() - started,
        "base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))
    """
)

_ORDINARY = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from PIL import Image, ImageDraw
    out = Path(sys.argv[1])
    rnd = random.Random(7)
    # a 12 MP phone photo of a card on a desk, and an A4 page scanned at 300 dpi
    for name, size in (("photo_4000x3000.jpg", (4000, 3000)), ("a4_300dpi.png", (2480, 3508))):
        img = Image.new("RGB", size, (236, 232, 224))
        draw = ImageDraw.Draw(img)
        for _ in range(400):
            x, y = rnd.randrange(size[0]), rnd.randrange(size[1])
            colour = tuple(rnd.randrange(256) for _ in range(3))
            draw.rectangle((x, y, x + rnd.randrange(200), y + rnd.randrange(60)), fill=colour)
        img.save(out / name, quality=90) if name.endswith(".jpg") else img.save(out / name)
    """
)


def _run(paths: list[Path], lifted: bool = False) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps([str(p) for p in paths]), "1" if lifted else "0"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )
    return json.loads(proc.stdout)


def _sixteen(paths: list[Path]) -> list[Path]:
    return [paths[i % len(paths)] for i in range(16)]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="idocr-bombs-") as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, "-m", "tests.bombs", str(folder)], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-c", _ORDINARY, str(folder)], cwd=ROOT, check=True)
        examples = sorted(
            p for p in (ROOT / "examples" / "images").rglob("*")
            if p.is_file() and "bad" not in p.parts
        )
        ordinary = examples + [folder / "photo_4000x3000.jpg", folder / "a4_300dpi.png"]
        bomb = folder / "png_7000x7000.png"
        every = sorted(p for p in folder.iterdir() if p.name in _bomb_names())
        cases = [
            ("ordinary", _sixteen(ordinary), False),
            ("7000x7000 png", [bomb] * 16, False),
            ("7000x7000 png, limits lifted", [bomb] * 16, True),
            ("every bomb", every * 2, False),
        ]
        print(f"{'case':32} {'files':>5} {'peak RSS':>9} {'time':>7}  outcomes")
        for name, paths, lifted in cases:
            r = _run(paths, lifted)
            outcomes = ", ".join(f"{n} {o}" for o, n in sorted(Counter(r["outcomes"]).items()))
            print(
                f"{name:32} {len(paths):>5} {r['peak_kb'] / 1024:>6.0f} MB {r['seconds']:>5.2f} s"
                f"  {outcomes}"
            )
        print(f"(a process that only imports pipeline.domain.images and reads the files: "
              f"{r['base_kb'] / 1024:.0f} MB)")


def _bomb_names() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from tests.bombs import BOMBS

    return set(BOMBS)


if __name__ == "__main__":
    main()
