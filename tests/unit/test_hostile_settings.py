"""The hostile-file limits and the symlink rule as settings: IDOCR_MAX_DECODE_BYTES,
IDOCR_MAX_PIXELS, IDOCR_DECODE_MEMORY reach what a worker decodes with; IDOCR_FOLLOW_SYMLINKS
and --follow-symlinks reach the folder source; ages and sizes parse as people write them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.config import Settings, settings_error_message
from pipeline.domain.images import DECODE_BUDGET, ImageLimits, ImageRejected, prepare
from pipeline.runtime import apply_decode_memory, image_limits
from pipeline.units import format_age, parse_age, parse_size
from tests.bombs import png_one_colour

MiB = 1024 * 1024


def test_sizes_and_ages_parse() -> None:
    assert parse_size("268435456") == 256 * MiB
    assert parse_size("256MiB") == parse_size("256M") == parse_size("256 mib") == 256 * MiB
    assert parse_size("1.5G") == 1536 * MiB
    assert parse_age("90d") == parse_age("90") == timedelta(days=90)
    assert parse_age("12h") == timedelta(hours=12) and parse_age("2w") == timedelta(days=14)
    for bad in ("", "lots", "-1d", "0d", "5y"):
        with pytest.raises(ValueError):
            parse_age(bad)
    for bad in ("", "big", "0", "12Q"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert format_age(timedelta(days=30)) == "30d" and format_age(timedelta(hours=36)) == "36h"


def test_decode_settings_reach_the_image_limits(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert image_limits(Settings()) == ImageLimits()
    monkeypatch.setenv("IDOCR_MAX_DECODE_BYTES", "20MiB")
    monkeypatch.setenv("IDOCR_MAX_PIXELS", "5000000")
    monkeypatch.setenv("IDOCR_PROVIDERS", "showapi")
    monkeypatch.setenv("IDOCR_SHOWAPI_APP_KEY", "k")
    limits = image_limits(Settings())
    assert (limits.max_decode_bytes, limits.max_pixels) == (20 * MiB, 5_000_000)
    assert limits.max_payload_bytes == 1_500_000  # the provider's own limit still applies
    # a 3000x3000 PNG passes the defaults and is refused under these limits, from its header
    data = png_one_colour(3000, 3000)
    assert prepare(data, ImageLimits()).width == 2048
    with pytest.raises(ImageRejected) as info:
        prepare(data, limits)
    assert info.value.reason == "too_many_pixels"


def test_decode_memory_sets_the_process_budget(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = DECODE_BUDGET.total
    try:
        apply_decode_memory(Settings())
        assert DECODE_BUDGET.total == 2 * ImageLimits().max_decode_bytes
        monkeypatch.setenv("IDOCR_DECODE_MEMORY", "512MiB")
        apply_decode_memory(Settings())
        assert DECODE_BUDGET.total == 512 * MiB
        monkeypatch.setenv("IDOCR_DECODE_MEMORY", "")
        monkeypatch.setenv("IDOCR_MAX_DECODE_BYTES", "100MiB")
        apply_decode_memory(Settings())
        assert DECODE_BUDGET.total == 200 * MiB
    finally:
        DECODE_BUDGET.set_total(before)


def test_refused_values_name_their_variable(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in (
        ("IDOCR_MAX_DECODE_BYTES", "lots"),
        ("IDOCR_DECODE_MEMORY", "-5"),
        ("IDOCR_RETENTION", "forever"),
        ("IDOCR_MAX_PIXELS", "0"),
    ):
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError) as info:
            Settings()
        assert var in settings_error_message(info.value), var
        monkeypatch.delenv(var)


def test_retention_setting(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().retention_age is None
    monkeypatch.setenv("IDOCR_RETENTION", "90d")
    assert Settings().retention_age == timedelta(days=90)


_MEASURE = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from pipeline.config import Settings
from pipeline.domain.images import prepare
from pipeline.runtime import apply_decode_memory, image_limits
from tests.bombs import png_one_colour

settings = Settings()
apply_decode_memory(settings)  # what a worker does when it builds its processor
limits = image_limits(settings)
data = png_one_colour(3000, 3000)
prepare(data, limits)  # codecs loaded, first arenas made: what every worker has
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith(field + ":"))
base = status("VmHWM")
with ThreadPoolExecutor(4) as pool:
    sizes = [p.width for p in pool.map(lambda d: prepare(d, limits), [data] * 8)]
print(json.dumps({"sizes": sizes, "base": base, "peak": status("VmHWM")}))
"""


def _peak(env_extra: dict[str, str]) -> dict:
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("IDOCR_")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE], cwd=ROOT, env=env, check=True, capture_output=True,
        text=True, timeout=300,
    )
    return json.loads(proc.stdout)


def test_decode_memory_bounds_a_worker_decoding_in_threads(tmp_path: Path) -> None:
    """Eight 9-megapixel PNGs (about 70 MiB each to decode and re-encode) on four threads, as a
    worker builds its limits from the settings: with IDOCR_DECODE_MEMORY at 80MiB they are
    decoded one at a time, with 1GiB four at once."""
    tight = _peak({"IDOCR_DECODE_MEMORY": "80MiB", "IDOCR_DATA_DIR": str(tmp_path)})
    loose = _peak({"IDOCR_DECODE_MEMORY": "1GiB", "IDOCR_DATA_DIR": str(tmp_path)})
    assert tight["sizes"] == loose["sizes"] == [2048] * 8
    # above what the first decode left (measured: about 140 MiB against 220 MiB; the rest is
    # the threads' malloc arenas keeping their re-encode buffers)
    grew_tight, grew_loose = (m["peak"] - m["base"] for m in (tight, loose))
    assert grew_tight < 170 * MiB and grew_loose - grew_tight > 50 * MiB, (grew_tight, grew_loose)
