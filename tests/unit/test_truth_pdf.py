"""PDF truth entries: the sandbox recognises a PDF by the first page the pipeline renders from it.

ihuyi accepts PDF and reads only its first page (seed 000 §1.6); the pipeline never sends the
PDF itself but :func:`pipeline.domain.images.prepare`'s JPEG of that page, whose bytes no truth sha256
lists. The truth index therefore hashes a PDF truth file on that same rendering.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from pipeline.domain.images import ImageLimits, prepare
from pipeline.providers.base import ImagePayload, Outcome
from pipeline.providers.ihuyi import IhuyiClient
from idocr_sandbox.cards import random_identity, render_card
from idocr_sandbox.server import SandboxConfig, SandboxServer
from idocr_sandbox.truth import DHASH_MAX_DISTANCE, TruthIndex, dhash

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRUTH_FILE = EXAMPLES / "truth.json"


def _pdf_entries() -> list[dict]:
    entries = json.loads(TRUTH_FILE.read_text(encoding="utf-8"))["images"]
    return [e for e in entries if e["file"].lower().endswith(".pdf")]


def _pdf(*pages: Image.Image) -> bytes:
    buf = io.BytesIO()
    first, *rest = (p.convert("RGB") for p in pages)
    first.save(buf, "PDF", resolution=300.0, save_all=True, append_images=rest)
    return buf.getvalue()


def test_the_examples_include_a_multi_page_pdf() -> None:
    import pypdfium2 as pdfium

    entries = _pdf_entries()
    assert entries, "examples/truth.json lists no PDF"
    for entry in entries:
        pdf = pdfium.PdfDocument((EXAMPLES / entry["file"]).read_bytes())
        try:
            assert len(pdf) >= 2  # shows that only the first page counts
        finally:
            pdf.close()


@pytest.mark.parametrize("entry", _pdf_entries(), ids=lambda e: Path(e["file"]).name)
def test_committed_pdf_is_matched_on_the_pipelines_rendering(entry: dict) -> None:
    truth = TruthIndex.load(TRUTH_FILE)
    data = (EXAMPLES / entry["file"]).read_bytes()
    sent = prepare(data)  # exactly what the pipeline submits for this file
    assert "pdf_first_page" in sent.changes and sent.format == "jpeg"

    m = truth.match(sent.data)
    assert m.reason == "dhash" and m.distance == 0
    assert m.entry is not None and m.entry.sha256 == entry["sha256"]
    assert (m.entry.side, m.entry.fields) == (entry["side"], entry["fields"])
    # the PDF's own bytes still match exactly
    assert truth.match(data).reason == "sha256"

    # a rendering under other limits (smaller, re-encoded harder) is still the same card
    smaller = prepare(data, ImageLimits(max_side=1024, jpeg_quality=60))
    m2 = truth.match(smaller.data)
    assert m2.entry is not None and m2.entry.sha256 == entry["sha256"]
    assert m2.distance is not None and m2.distance <= DHASH_MAX_DISTANCE


def test_only_the_first_page_identifies_the_pdf_over_http() -> None:
    rng = random.Random(606)
    card = random_identity(rng, "front")
    other = random_identity(rng, "back")
    card_img = render_card("front", card)
    other_img = render_card("back", other)
    pdf = _pdf(card_img, other_img)

    truth = TruthIndex()
    entry = truth.add(pdf, "front", card)  # add() takes a PDF as the loader does
    assert entry.dhash == dhash(prepare(pdf).data)

    with SandboxServer(truth, SandboxConfig(seed=7)) as server:
        client = IhuyiClient("sandbox", "sandbox-key", server.url, timeout=5)
        try:
            r = client.submit(ImagePayload(data=prepare(pdf).data))
            assert r.outcome is Outcome.OK, (r.code, r.msg)
            assert r.side == "front"
            assert {k: r.fields[k] for k in card} == card
            # the second page is not what the entry stands for
            page2 = io.BytesIO()
            other_img.convert("RGB").save(page2, "JPEG", quality=90)
            assert truth.match(page2.getvalue()).entry is None
            r2 = client.submit(ImagePayload(data=page2.getvalue()))
            assert (r2.outcome, r2.code) == (Outcome.IMAGE, "4086")  # 图片错误: not known
        finally:
            client.close()
