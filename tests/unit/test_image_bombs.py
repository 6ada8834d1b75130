"""Hostile images are refused from their header, before any pixel is decoded, or decoded
reduced; a process fed many of them stays small."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pipeline.domain.images import (
    DecodeBudget,
    ImageLimits,
    ImageRejected,
    decode_cost,
    prepare,
)
from tests.bombs import BOMBS, png_header_only, png_one_colour

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    # Built in a process of its own: encoding the big JPEGs holds their pixels for a moment.
    folder = tmp_path_factory.mktemp("bombs")
    subprocess.run([sys.executable, "-m", "tests.bombs", str(folder)], cwd=ROOT, check=True)
    return folder, {name: reason for name, (_build, reason) in BOMBS.items()}


def _reason(data: bytes, limits: ImageLimits = ImageLimits()) -> str | None:
    try:
        prepare(data, limits)
    except ImageRejected as exc:
        return exc.reason
    return None


def test_each_bomb_gets_its_reason(bombs: tuple[Path, dict[str, str | None]]) -> None:
    folder, expected = bombs
    got = {name: _reason((folder / name).read_bytes()) for name in expected}
    assert got == expected


def test_the_big_jpeg_is_decoded_reduced_and_sent_at_the_target_size(
    bombs: tuple[Path, dict[str, str | None]],
) -> None:
    folder, _ = bombs
    out = prepare((folder / "jpeg_10000x10000.jpg").read_bytes())
    assert (out.width, out.height) == (2048, 2048)
    assert out.changes[0] == "downscaled 10000x10000->2048x2048"


def test_refusal_says_why() -> None:
    with pytest.raises(ImageRejected) as info:
        prepare(png_one_colour(7000, 7000))
    assert info.value.reason == "too_many_pixels"
    assert str(info.value).startswith("the PNG image is 7000x7000 px; decoding it would take")
    assert "192 MiB allowed" in str(info.value)


def test_grayscale_is_refused_from_the_header() -> None:
    # No pixel data at all: had it been decoded, it would be "corrupt".
    assert _reason(png_header_only(3000, 2000, colour_type=0)) == "grayscale"
    assert _reason(png_header_only(3000, 2000)) == "corrupt"


def test_budget_admits_real_scans_and_not_the_bombs() -> None:
    limits = ImageLimits()
    # an A4 page scanned at 600 dpi, in colour
    assert decode_cost("RGB", (4961, 7016)) <= limits.max_decode_bytes
    # a 48 MP phone photo is decoded at half size
    assert decode_cost("RGB", (4000, 3000)) <= limits.max_decode_bytes
    assert decode_cost("RGB", (7000, 7000)) > limits.max_decode_bytes
    assert decode_cost("P", (7000, 7000)) > limits.max_decode_bytes
    # a progressive JPEG pays for its full-size coefficients (4:2:0: 1.5 blocks a pixel)
    layers = [("1", 2, 2, 0), ("2", 1, 1, 1), ("3", 1, 1, 1)]
    progressive = decode_cost("RGB", (2500, 2500), (10_000, 10_000), layers)
    assert progressive - decode_cost("RGB", (2500, 2500)) == 10_000 * 10_000 * 3


def test_a_smaller_per_image_limit_is_honoured() -> None:
    data = png_one_colour(1200, 1000)
    assert _reason(data) is None
    assert _reason(data, ImageLimits(max_decode_bytes=20 * MB)) == "too_many_pixels"


def test_decode_budget_makes_a_second_large_decode_wait() -> None:
    budget = DecodeBudget(100)
    order: list[str] = []
    first_in = threading.Event()
    release = threading.Event()

    def first() -> None:
        with budget.hold(60):
            order.append("first in")
            first_in.set()
            release.wait(5)
            order.append("first out")

    def second() -> None:
        first_in.wait(5)
        with budget.hold(60):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(5)
    threads[1].join(0.3)
    assert threads[1].is_alive()  # still waiting for room
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["first in", "first out", "second in"]
    assert budget.used == 0
    with budget.hold(500):  # more than the whole budget: runs alone rather than never
        assert budget.used == 100


_MEASURE = textwrap.dedent(
    """
    import json, sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from pipeline.domain.images import ImageLimits, ImageRejected, prepare

    folder, copies, guarded = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    names = json.loads(sys.argv[4])
    limits = ImageLimits() if guarded else ImageLimits(max_pixels=10**10, max_decode_bytes=10**12)
    files = [(folder / n).read_bytes() for n in names] * copies

    def one(data):
        try:
            prepare(data, limits)
        except ImageRejected as exc:
            return exc.reason
        return None

    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(one, files))
    # VmHWM: this process's own peak. Not ru_maxrss, which carries over the peak of the
    # process that forked it (here the test runner) across the exec.
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmHWM:"))
    print(json.dumps({"reasons": reasons, "peak": peak}))
    """
)


def _measure(folder: Path, names: list[str], copies: int, guarded: bool = True) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), str(copies), "1" if guarded else "0",
         json.dumps(names)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )
    return json.loads(proc.stdout)


def test_sixteen_bombs_in_eight_threads_stay_under_300_mb(
    bombs: tuple[Path, dict[str, str | None]],
) -> None:
    folder, expected = bombs
    out = _measure(folder, ["png_7000x7000.png"], copies=16)
    assert out["reasons"] == ["too_many_pixels"] * 16
    assert out["peak"] < 300 * MB
    names = sorted(expected)
    out = _measure(folder, names, copies=2)
    assert out["reasons"] == [expected[n] for n in names] * 2
    assert out["peak"] < 300 * MB


def test_the_measurement_sees_an_unguarded_decode(
    bombs: tuple[Path, dict[str, str | None]],
) -> None:
    # The same measurement with the limits lifted: one such PNG alone costs 196 MB of pixels.
    folder, _ = bombs
    out = _measure(folder, ["png_7000x7000.png"], copies=1, guarded=False)
    assert out["peak"] > 190 * MB
