"""Front and back of one card are paired by name; the pair's check needs both sides."""

from __future__ import annotations

import pytest

from pipeline.domain.pairing import SideRecord, pair_checks, pair_key


@pytest.mark.parametrize(("a", "b"), [
    ("高娟 正面.jpg", "高娟 背面.jpg"),
    ("scans/张三_人像面.png", "scans/张三_国徽面.png"),
    ("2026-11/p123/front.png", "2026-11/p123/back.PNG"),
    ("2026-11/p123/Front.jpg", "2026-11/p123/BACK.jpeg"),
    ("a-obverse.bmp", "a-reverse.bmp"),
    ("李四（正面）.jpg", "李四（反面）.jpg"),
    ("批次/王五正面.jpg", "批次/王五反面.pdf"),
])
def test_both_sides_share_a_key(a: str, b: str) -> None:
    assert pair_key(a) == pair_key(b)


@pytest.mark.parametrize(("a", "b"), [
    ("front side 01.png", "back side 02.png"),  # different numbers: different cards
    ("p1/front.jpg", "p2/back.jpg"),  # different folders
    ("高娟 正面.jpg", "copy of 高娟 (2) #.jpg"),
    ("backfill/x front.jpg", "x back.jpg"),  # a folder named backfill is not a side word
])
def test_different_cards_do_not_share_a_key(a: str, b: str) -> None:
    assert pair_key(a) != pair_key(b)


def test_keys_keep_the_folder_and_drop_the_extension_and_side_word() -> None:
    assert pair_key("2026-11/p123/front.png") == "2026-11/p123"
    assert pair_key("scans/张三 正面 (1).jpg") == "scans/张三 1"


def test_a_name_without_a_side_word_is_not_paired() -> None:
    assert pair_key("bucket/00/scan-0000123.jpg") is None
    assert pair_key("facebook.jpg") is None  # a word merely starting with "face"
    assert pair_key("backfill/x.jpg") is None


FRONT = SideRecord(1, "p/front.jpg", "front", {"date_of_birth": "1990-03-07", "id_number": "11010119900307803X"})
BACK_OK = SideRecord(2, "p/back.jpg", "back", {"valid_from": "2015-06-01", "valid_to": "2025-06-01"})  # 25: 10 years
BACK_WRONG = SideRecord(3, "p/back.png", "back", {"valid_from": "2015-06-01", "valid_to": "2035-06-01"})


def test_a_front_and_a_back_are_checked_together() -> None:
    got = pair_checks([FRONT, BACK_OK])
    assert got[1]["ok"] is True and got[1]["with"] == "p/back.jpg"
    assert got[2]["ok"] is True and got[2]["with"] == "p/front.jpg"
    assert "age 25" in got[1]["detail"]
    wrong = pair_checks([BACK_WRONG, FRONT])
    assert wrong[3]["ok"] is False and "requires 10 years" in wrong[3]["detail"]


def test_anything_but_one_front_and_one_back_is_left_unpaired() -> None:
    assert pair_checks([FRONT]) == {}
    assert pair_checks([FRONT, SideRecord(4, "p/front.png", "front", {})]) == {}
    assert pair_checks([FRONT, BACK_OK, BACK_WRONG]) == {}
    assert pair_checks([FRONT, SideRecord(5, "p.jpg", None, {})]) == {}
