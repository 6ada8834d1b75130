"""Front and back of one card: which two images belong together, and the check that needs both.

The validity period on the back is set by the holder's age when the card was applied for (under
16: 5 years, 16–25: 10, 26–45: 20, 46 and over: 长期), and the age is only on the front. Nothing
in an image links the two sides, so idocr pairs them by name, as people file them: the same
path once the side word is taken out.

    scans/张三 正面.jpg   scans/张三 反面.jpg        -> "scans/张三"
    2026-11/p123/front.png  2026-11/p123/back.png  -> "2026-11/p123"
    a_人像面.jpg  a_国徽面.jpg                      -> "a"

A name without a side word is not paired (a bucket of ``scan-0000123.jpg`` costs nothing here).
A group pairs when exactly one front and one back of it were recognised (the side comes from
the provider, not from the name); anything else (three images, two fronts) is left unpaired
rather than guessed. The check, ``valid_period_matches_age``, is stored in the ``checks`` of
both results with the partner's key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.domain.checks import check_pair

__all__ = ["PAIR_CHECK", "SideRecord", "pair_checks", "pair_key"]

PAIR_CHECK = "valid_period_matches_age"

# Chinese has no word breaks: a hanzi side word counts wherever it stands. Latin ones count only
# as whole words, so "backfill/" or "facebook.jpg" keep their letters.
_HANZI_SIDES = ("人像面", "国徽面", "正面", "反面", "背面", "人像", "国徽")
_LATIN_SIDES = ("front", "back", "obverse", "reverse", "face", "emblem")
_SIDE = re.compile(
    "|".join(_HANZI_SIDES) + r"|(?<![A-Za-z0-9])(?:" + "|".join(_LATIN_SIDES) + r")(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SEPARATORS = " _-.()（）[]【】"
# a bucket of millions of names without a side word should not pay for the regular expression
_HINTS = tuple(w.lower() for w in _HANZI_SIDES + _LATIN_SIDES)


def pair_key(source_key: str) -> str | None:
    """The name both sides of one card share: the path without extension and side word; None
    when the name carries no side word (nothing says which card it is the side of)."""
    folder, _, name = source_key.rpartition("/")
    lowered = name.lower()
    if not any(hint in lowered for hint in _HINTS):
        return None
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem, found = _SIDE.subn(" ", stem)
    if not found:
        return None
    # "张三 正面 (1)" and "张三_反面" leave separators behind; fold runs of them to one space
    stem = " ".join("".join(" " if c in _SEPARATORS else c for c in stem).split())
    return f"{folder}/{stem}" if folder and stem else folder or stem


@dataclass(frozen=True, slots=True)
class SideRecord:
    """One recognised image of a pair group: its item, its key (path within the source), the side
    the provider read, its fields."""

    item_id: int
    key: str
    side: str | None
    fields: dict[str, Any]


def pair_checks(group: Iterable[SideRecord], *, grace_days: int = 0) -> dict[int, dict[str, Any]]:
    """``{item_id: check}`` for both items when ``group`` is exactly one front and one back,
    else ``{}``. The check names the partner under ``with``: its key, as exports show it."""
    records = list(group)
    fronts = [r for r in records if r.side == "front"]
    backs = [r for r in records if r.side == "back"]
    if len(records) != 2 or len(fronts) != 1 or len(backs) != 1:
        return {}
    front, back = fronts[0], backs[0]
    check = dict(check_pair(front.fields, back.fields, grace_days=grace_days)[PAIR_CHECK])
    return {front.item_id: {**check, "with": back.key}, back.item_id: {**check, "with": front.key}}
