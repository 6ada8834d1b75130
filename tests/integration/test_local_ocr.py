"""The local OCR engine (provider ``local``) on real pixels: the shipped examples, generated
cards photographed in a larger picture in each rotation, and a photo with no card at all."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pipeline.domain.images import prepare
from pipeline.domain.checks import check_fields
from pipeline.providers.base import ImagePayload, Outcome
from tests.conftest import EXAMPLES

if TYPE_CHECKING:
    from pipeline.providers.local import LocalOCRClient

TRUTH = json.loads((EXAMPLES / "truth.json").read_text(encoding="utf-8"))["images"]


@pytest.fixture(scope="module")
def local() -> Iterator[LocalOCRClient]:
    from pipeline.providers.local import LocalOCRClient

    client = LocalOCRClient()
    yield client
    client.close()


def _payload(data: bytes) -> ImagePayload:
    # as the worker sends it: after the image precheck
    return ImagePayload(data=prepare(data).data)


def test_the_engine_runs_single_threaded_per_call_and_one_call_per_core(
    local: LocalOCRClient,
) -> None:
    import os

    assert set(local.engine.threads().values()) == {(1, 1)}
    assert local.parallel == os.cpu_count()
    assert local.balance() is None and local.account == "local"


@pytest.mark.parametrize("entry", TRUTH, ids=[t["file"] for t in TRUTH])
def test_the_shipped_examples_are_read_exactly(local: LocalOCRClient, entry: dict) -> None:
    result = local.submit(_payload((EXAMPLES / entry["file"]).read_bytes()))
    assert result.outcome is Outcome.OK, result.msg
    assert (result.side, result.fields) == (entry["side"], entry["fields"])
    assert result.ocrid and result.ocrid.startswith("local-")
    conf = result.extra["confidence"]
    assert set(conf) == set(entry["fields"]) and all(0.5 < c <= 1 for c in conf.values())
    assert result.raw["confidence"] == conf and result.raw["lines"]


@pytest.mark.parametrize(
    ("seed", "side", "style", "rotation"),
    [
        (11, "front", "photo", 90),
        (12, "back", "photo", 180),
        (13, "front", "photo", 270),
        (14, "front", "scan", 0),
        (15, "back", "photo", 90),
    ],
)
def test_generated_cards_in_a_larger_photo_in_any_rotation(
    local, seed, side, style, rotation
) -> None:
    cardgen = pytest.importorskip("bench.cardgen")
    if len(cardgen.fonts()) < 4:
        pytest.skip(
            "the CJK fonts of fonts-noto-cjk, fonts-wqy-* and fonts-arphic-* are not installed"
        )
    data, truth = cardgen.make_sample(seed, side=side, style=style, rotation=rotation)
    result = local.submit(_payload(data))
    assert result.outcome is Outcome.OK, result.msg
    assert (result.side, result.fields) == (truth["side"], truth["fields"])
    checks = check_fields(result.side, result.fields, today=datetime.date(2026, 11, 29))
    assert not [k for k, c in checks.items() if c["ok"] is False and c["level"] == "error"]


def test_a_photo_without_a_card_is_an_image_failure(local: LocalOCRClient) -> None:
    cardgen = pytest.importorskip("bench.cardgen")
    result = local.submit(_payload(cardgen.make_background(3)))
    assert result.outcome is Outcome.IMAGE and result.code == "no_card"
    assert "no ID card" in result.msg
    assert not result.fields


def test_undecodable_bytes_are_an_image_failure(local: LocalOCRClient) -> None:
    result = local.submit(ImagePayload(data=b"\xff\xd8\xff\xe0" + b"\0" * 64))
    assert (result.outcome, result.code) == (Outcome.IMAGE, "bad_image")


def test_concurrent_calls_share_one_engine(local: LocalOCRClient) -> None:
    entry = next(t for t in TRUTH if t["side"] == "back")
    payload = _payload((EXAMPLES / entry["file"]).read_bytes())
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(local.submit(payload))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.fields for r in results] == [entry["fields"]] * 3
    assert len({r.ocrid for r in results}) == 3
