"""Folders of distinct synthetic cards with their truth file, for benchmarks and tests."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from idocr_sandbox.cards import encode, random_identity, render_card


def make_card_set(
    folder: Path, n: int, *, seed: int = 0, size: tuple[int, int] = (640, 404)
) -> Path:
    """Write ``n`` cards (alternating front and back, JPEG) into ``folder`` and a truth file
    beside them (``folder/../<name>.truth.json``, outside the folder so it is not scanned).
    Returns the truth file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries = []
    for i in range(n):
        side = "front" if i % 2 == 0 else "back"
        fields = random_identity(rng, side)
        data = encode(
            render_card(side, fields, size=size, seed=seed * 1_000_003 + i), "JPEG"
        )
        name = f"card {i:05d} {side}.jpg"
        (folder / name).write_bytes(data)
        entries.append(
            {
                "file": f"{folder.name}/{name}",
                "sha256": hashlib.sha256(data).hexdigest(),
                "side": side,
                "fields": fields,
            }
        )
    truth = folder.parent / f"{folder.name}.truth.json"
    truth.write_text(
        json.dumps({"images": entries}, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    return truth
