"""Field extraction from text boxes (no OCR model): the geometry, the character sets, the
cleaning, and that nothing is ever filled in from another field."""

from __future__ import annotations

import datetime

import pytest

from pipeline.domain.checks import check_fields
from pipeline.providers.cardfields import ETHNICITIES, TextBox, clean_period, extract

# A card of 856 x 540 in the upright frame; rows 40 px apart.
ID = "110105199003071235"  # checksum-valid (GB 11643)


def box(text: str, x0: float, y0: float, x1: float, h: float = 30, score: float = 0.99) -> TextBox:
    return TextBox(text, score, x0, y0, x1, y0 + h)


def front_merged() -> list[TextBox]:
    """What the detector returns for a clean card: each label merged with its value."""
    return [
        box("姓名王小明", 50, 50, 250),
        box("性别男", 50, 110, 170),
        box("民族汉", 250, 110, 370),
        box("出生1990年3月7日", 50, 170, 400),
        box("住址北京市朝阳区人民路12号", 50, 230, 480),
        box("3栋2单元301室", 145, 272, 360),
        box("公民身份号码" + ID, 50, 450, 760),
    ]


def test_a_front_with_labels_merged_into_values() -> None:
    r = extract(front_merged())
    assert r.side == "front"
    assert r.fields == {
        "name": "王小明",
        "gender": "男",
        "ethnicity": "汉",
        "date_of_birth": "1990-03-07",
        "domicile": "北京市朝阳区人民路12号3栋2单元301室",
        "id_number": ID,
    }
    assert set(r.confidence) == set(r.fields) and all(0 < c <= 1 for c in r.confidence.values())


def test_labels_split_from_values_and_into_characters_with_the_boxes_shuffled() -> None:
    boxes = [
        box("姓", 50, 50, 75),
        box("名", 100, 50, 125),
        box("欧阳娜", 150, 48, 250, h=34),
        box("性", 50, 110, 75),
        box("别", 100, 110, 125),
        box("女", 150, 110, 175),
        box("民", 250, 110, 275),
        box("族", 300, 110, 325),
        box("土家", 350, 110, 400),
        box("出", 50, 170, 75),
        box("生", 100, 170, 125),
        box("1985", 150, 170, 210),
        box("年", 215, 170, 240),
        box("12", 245, 170, 270),
        box("月", 275, 170, 300),
        box("30", 305, 170, 330),
        box("日", 335, 170, 360),
        box("住", 50, 230, 75),
        box("址", 100, 230, 125),
        box("湖南省湘西土家族苗族自治州", 150, 230, 480),
        box("吉首市幸福路8号", 150, 272, 350),
        box("公民身份号码", 50, 450, 230),
        box("43310119851230004X", 290, 446, 760),
    ]
    r = extract(list(reversed(boxes)))
    assert r.fields == {
        "name": "欧阳娜",
        "gender": "女",
        "ethnicity": "土家",
        "date_of_birth": "1985-12-30",
        "domicile": "湖南省湘西土家族苗族自治州吉首市幸福路8号",
        "id_number": "43310119851230004X",
    }


def test_a_slightly_tilted_row_still_reads_as_one_row() -> None:
    boxes = front_merged()
    boxes[2] = box("民族汉", 250, 118, 370)  # 8 px lower: a perspective photo
    assert extract(boxes).fields["ethnicity"] == "汉"


def test_stray_marks_around_a_name_and_text_far_to_its_right_are_not_the_name() -> None:
    boxes = front_merged()
    boxes[0] = box("姓名丨王小明丨", 50, 50, 270)
    boxes.append(box("中国", 620, 52, 680))  # printed far right (the portrait's area)
    boxes.append(box("福", 300, 55, 320, score=0.1))  # the background, read with low confidence
    assert extract(boxes).fields["name"] == "王小明"


def test_a_given_name_of_one_stroke_is_kept() -> None:
    boxes = front_merged()
    boxes[0] = box("姓名龙泽一", 50, 50, 250)
    assert extract(boxes).fields["name"] == "龙泽一"


def test_a_label_with_a_lost_character_still_marks_its_value() -> None:
    boxes = front_merged()
    boxes[1] = box("别男", 80, 110, 170)  # 性 not detected
    boxes[4] = box("住北京市朝阳区人民路12号", 50, 230, 480)  # 址 not detected
    r = extract(boxes)
    assert r.fields["gender"] == "男"
    assert r.fields["domicile"] == "北京市朝阳区人民路12号3栋2单元301室"


def test_overlapping_boxes_read_a_character_once() -> None:
    boxes = front_merged()
    boxes[4] = box("住址北", 50, 230, 130)
    boxes.insert(5, box("北京市朝阳区人民路12号", 112, 230, 480))
    assert extract(boxes).fields["domicile"] == "北京市朝阳区人民路12号3栋2单元301室"


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        ("O110105199003071235", ID),
        ("11O1O5199OO3O71235", ID),
        ("11010519900307123x", "11010519900307123X"),
    ],
)
def test_the_id_number_is_read_within_its_charset(read: str, expected: str) -> None:
    boxes = front_merged()
    boxes[-1] = box("公民身份号码", 50, 450, 230)
    boxes.append(box(read, 290, 446, 760))
    assert extract(boxes).fields["id_number"] == expected


def test_ethnicity_is_one_of_the_56_names() -> None:
    assert len(ETHNICITIES) == 56
    for read, name in (
        ("土家族", "土家"),
        ("维吾尔", "维吾尔"),
        ("柯尔克", "柯尔克孜"),
        ("柯尔克孜", "柯尔克孜"),
        ("佬", "佬"),
    ):  # 仫佬 or 仡佬: not guessed
        boxes = front_merged()
        boxes[2] = box("民族" + read, 250, 110, 420)
        assert extract(boxes).fields["ethnicity"] == name, read


def test_nothing_is_filled_in_from_the_id_number() -> None:
    """No birth-date row and no gender on the image: the fields stay missing, even though the
    number carries both, and the checks say so."""
    boxes = [b for b in front_merged() if not b.text.startswith(("出生", "性别"))]
    boxes.append(box("民族汉", 250, 110, 370))
    r = extract(boxes)
    assert "date_of_birth" not in r.fields and "gender" not in r.fields
    checks = check_fields("front", r.fields, today=datetime.date(2026, 11, 29))
    assert checks["birth_date_matches"]["ok"] is None and checks["gender_matches"]["ok"] is None


def test_a_misread_id_number_is_reported_as_read_and_fails_a_check() -> None:
    boxes = front_merged()
    boxes[-1] = box("公民身份号码110105199003071285", 50, 450, 760)  # one digit misread
    r = extract(boxes)
    assert r.fields["id_number"] == "110105199003071285"  # never repaired by its check digit
    checks = check_fields("front", r.fields, today=datetime.date(2026, 11, 29))
    assert any(c["ok"] is False and c["level"] == "error" for c in checks.values())


def test_a_line_is_decoded_again_within_the_row_charset() -> None:
    """Where the engine can re-decode a line, the ID row is read within 公民身份号码 + [0-9X]."""
    seen: list[object] = []

    def decode(allowed):  # type: ignore[no-untyped-def]
        seen.append(allowed)
        return "公民身份号码" + ID, 0.97, tuple(60 + 9 * i for i in range(6 + 18))

    boxes = front_merged()
    row = boxes[-1]
    boxes[-1] = TextBox(
        "公民身份号码11O1O5I99OO3O7I2S5", 0.8, row.x0, row.y0, row.x1, row.y1, decode=decode
    )
    r = extract(boxes)
    assert r.fields["id_number"] == ID and r.confidence["id_number"] == pytest.approx(0.97)
    assert seen and set("0123456789X") <= set(str(seen[0]))


def test_a_back_with_a_wrapped_authority() -> None:
    boxes = [
        box("中华人民共和国", 250, 60, 600, h=40),
        box("居民身份证", 250, 130, 650, h=60),
        box("签发机关乌鲁木齐市公安局天山", 150, 370, 700),
        box("区分局", 300, 405, 380),
        box("有效期限2006.01.03-2026.01.03", 150, 450, 600),
    ]
    r = extract(boxes)
    assert r.side == "back"
    assert r.fields == {
        "issue_authority": "乌鲁木齐市公安局天山区分局",
        "valid_from": "2006-01-03",
        "valid_to": "2026-01-03",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019.06.25-长期", ("2019-06-25", "长期")),
        ("2010.03.01一2030.03.01", ("2010-03-01", "2030-03-01")),
        ("2010,03,01-2030,O3.01", ("2010-03-01", "2030-03-01")),
        ("20100301-20300301", ("2010-03-01", "2030-03-01")),
        ("2019.06.25-长", ("2019-06-25", "长期")),
    ],
)
def test_validity_periods(text: str, expected: tuple[str, str]) -> None:
    assert clean_period(text) == expected


def test_the_period_below_its_label_and_the_authority_without_its_label() -> None:
    boxes = [
        box("居民身份证", 250, 130, 650, h=60),
        box("深圳市公安局南山分局", 330, 370, 640),
        box("有效期限", 150, 450, 300),
        box("2015.08.12-2035.08.12", 160, 495, 520),
    ]
    r = extract(boxes)
    assert r.fields == {
        "issue_authority": "深圳市公安局南山分局",
        "valid_from": "2015-08-12",
        "valid_to": "2035-08-12",
    }


def test_text_that_is_no_id_card_is_no_side() -> None:
    r = extract(
        [
            box("发票", 50, 50, 150),
            box("金额 128.00 元", 50, 110, 300),
            box("谢谢惠顾", 50, 170, 250),
        ]
    )
    assert r.side is None and r.fields == {} and r.why
    assert extract([]).side is None


def test_a_stroke_read_inside_a_spaced_out_label_is_not_the_name() -> None:
    boxes = front_merged()
    boxes[0] = box("姓一名顾曦海", 50, 50, 280)
    assert extract(boxes).fields["name"] == "顾曦海"


def test_an_unknown_ethnicity_is_the_official_name_that_best_explains_the_line() -> None:
    """Read as no official name (鑫 for 畲): the engine's likelihood of each of the 56 readings
    of the whole line decides."""
    asked: list[str] = []

    def likelihood(text: str) -> float:
        asked.append(text)
        return 0.0 if text == "民族畲" else -10.0

    boxes = front_merged()
    row = boxes[2]
    boxes[2] = TextBox(
        "民族鑫",
        0.8,
        row.x0,
        row.y0,
        row.x1,
        row.y1,
        likelihood=likelihood,
        decode=lambda allowed: ("民族鑫", 0.8, ()),
    )
    r = extract(boxes)
    assert r.fields["ethnicity"] == "畲"
    assert len(asked) == 57 and all(a.startswith("民族") for a in asked)  # the 56, and none
    # without an engine to ask, what was read is kept (and is no official name)
    boxes[2] = box("民族鑫", row.x0, row.y0, row.x1)
    assert extract(boxes).fields["ethnicity"] == "鑫"


def test_a_label_without_its_value_asks_for_a_second_look_between_the_labels() -> None:
    boxes = front_merged()
    boxes[1] = box("性别", 50, 110, 130)  # 男 not detected
    r = extract(boxes)
    assert "gender" not in r.fields
    (x0, y0, x1, y1), allowed = r.retry["gender"]
    assert x0 < 60 and 170 < x1 <= 255 and y0 < 110 and y1 > 140 and allowed == "性别男女"
    assert "ethnicity" not in r.retry  # read: nothing to look for
    # what the second look reads joins the row
    r = extract([*boxes, box("性别男", x0, y0, x1)], side="front")
    assert r.fields["gender"] == "男" and not r.retry


def test_a_value_cut_short_asks_for_a_look_further_right() -> None:
    boxes = [
        box("签发机关深圳市公安局南山分局", 150, 370, 640),
        box("有效期限2015.08.12-2035.08", 150, 450, 560),
    ]
    r = extract(boxes)
    assert r.fields["valid_from"] == "2015-08-12" and "valid_to" not in r.fields
    (x0, _, x1, _), _allowed = r.retry["valid_to"]
    assert 540 < x0 < 570 < x1
    r = extract([*boxes, box(".12", x0, 450, x0 + 40)], side="back")
    assert r.fields["valid_to"] == "2035-08-12"


def test_an_address_ending_in_a_number_asks_for_a_look_below() -> None:
    boxes = front_merged()
    boxes[4] = box("住址云南省昆明市五华区人民路272", 50, 230, 480)
    del boxes[5]  # the wrapped 号 was not detected
    r = extract(boxes)
    assert r.fields["domicile"] == "云南省昆明市五华区人民路272"
    (x0, y0, x1, y1), _ = r.retry["domicile"]
    assert 80 < x0 < 160 < x1 and 260 < y0 < y1 < 310
    r = extract([*boxes, box("号", 145, 272, 170)], side="front")
    assert r.fields["domicile"] == "云南省昆明市五华区人民路272号" and not r.retry


def test_strokes_in_front_of_an_address_or_an_authority_are_not_read_into_them() -> None:
    boxes = front_merged()
    boxes[4] = box("住址一北京市朝阳区人民路12号", 50, 230, 480)
    assert extract(boxes).fields["domicile"].startswith("北京市")
    back = [
        box("签发机关一拉萨市公安局城关分局", 150, 370, 640),
        box("有效期限2015.08.12-长期", 150, 450, 560),
    ]
    assert extract(back).fields["issue_authority"] == "拉萨市公安局城关分局"


def test_a_character_shared_by_two_overlapping_boxes_is_read_once() -> None:
    back = [
        box("签发机关", 173, 432, 298),
        box("关武汉市公安局武昌分局", 281, 431, 603),
        box("有效期限2004.12.02-2024.12.02", 173, 496, 655),
    ]
    assert extract(back).fields["issue_authority"] == "武汉市公安局武昌分局"


def test_half_of_a_label_character_read_as_one_of_its_own() -> None:
    boxes = front_merged()
    boxes[4] = box("住", 50, 230, 75)
    boxes.insert(5, box("主址北京市朝阳区人民路12号", 74, 230, 480))
    assert extract(boxes).fields["domicile"] == "北京市朝阳区人民路12号3栋2单元301室"
