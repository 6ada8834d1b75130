"""The key ring: sealing, opening, tamper detection, deterministic seals, blind indexes, rotation
look-ups, and errors that never carry key material or data."""

from __future__ import annotations

import base64

import pytest

from pipeline.storage.crypto import (
    CryptoError,
    KeyRing,
    KeyRingError,
    TamperedError,
    UnknownKeyError,
    keyring,
    new_key_entry,
    token_kid,
)

NAME = "欧阳娜娜"
ID = "11010119900307123X"


@pytest.fixture
def a() -> str:
    return new_key_entry("a")


@pytest.fixture
def b() -> str:
    return new_key_entry("b")


def material(entry: str) -> str:
    return entry.split(":", 1)[1]


def test_round_trip_and_token_shape(a: str) -> None:
    ring = KeyRing.parse(a)
    assert ring.enabled and ring.current_kid == "a"
    token = ring.seal(NAME, "results.name")
    assert token is not None and token.startswith("enc1:a:")
    assert NAME not in token
    assert ring.open(token, "results.name") == NAME
    # random nonce: two seals of one value differ, both open
    again = ring.seal(NAME, "results.name")
    assert again != token and ring.open(again, "results.name") == NAME
    assert ring.seal(None, "results.name") is None and ring.open(None, "results.name") is None
    assert ring.seal("", "results.name") != "" and ring.open(ring.seal("", "x"), "x") == ""


def test_json_round_trip(a: str) -> None:
    ring = KeyRing.parse(a)
    raw = {"code": 2, "data": {"name": NAME, "list": [1, None, "长期"]}}
    token = ring.seal_json(raw, "results.raw")
    assert isinstance(token, str) and token.startswith("enc1:a:") and NAME not in token
    assert ring.open_json(token, "results.raw") == raw
    assert ring.seal_json(None, "results.raw") is None
    # a value stored before there was a key is read as it is
    assert ring.open_json(raw, "results.raw") == raw
    assert ring.open_json("plain", "results.raw") == "plain"


def test_disabled_ring_passes_values_through() -> None:
    for spec in (None, "", " , "):
        ring = KeyRing.parse(spec)
        assert not ring.enabled and ring.current_kid is None
        assert ring.seal(NAME, "results.name") == NAME
        assert ring.seal_fixed("a.jpg", "items.source_key") == "a.jpg"
        assert ring.seal_json({"x": 1}, "results.raw") == {"x": 1}
        assert ring.blind_index(ID) is None and ring.blind_indexes(ID) == []
        assert not ring.needs_rotation(NAME)


def test_plain_values_open_as_they_are(a: str) -> None:
    ring = KeyRing.parse(a)
    assert ring.open(NAME, "results.name") == NAME
    # looks a little like a token but is not one (no key id)
    assert ring.open("enc1:", "results.name") == "enc1:"


def test_wrong_key_names_the_key_id_never_data(a: str, b: str) -> None:
    token = KeyRing.parse(a).seal(NAME, "results.name")
    with pytest.raises(UnknownKeyError) as exc:
        KeyRing.parse(b).open(token, "results.name")
    msg = str(exc.value)
    assert "'a'" in msg and "results.name" in msg and "IDOCR_DATA_KEYS" in msg
    assert NAME not in msg and material(a) not in msg and token not in msg
    # the same key id with other material does not open it either
    impostor = "a:" + base64.b64encode(b"\x01" * 32).decode()
    with pytest.raises(TamperedError):
        KeyRing.parse(impostor).open(token, "results.name")


def test_tampering_and_moving_are_detected(a: str) -> None:
    ring = KeyRing.parse(a)
    token = ring.seal(NAME, "results.name")
    assert token is not None
    head, payload = token.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for i in (0, 13, len(raw) - 1):  # nonce, ciphertext, tag
        bad = bytearray(raw)
        bad[i] ^= 1
        forged = head + ":" + base64.urlsafe_b64encode(bytes(bad)).decode().rstrip("=")
        with pytest.raises(TamperedError) as exc:
            ring.open(forged, "results.name")
        assert NAME not in str(exc.value) and material(a) not in str(exc.value)
    with pytest.raises(TamperedError):
        ring.open(token[:-4], "results.name")  # truncated
    with pytest.raises(TamperedError):
        ring.open(head + ":", "results.name")  # nothing at all
    with pytest.raises(TamperedError):
        ring.open(token, "results.domicile")  # copied into another column


def test_seal_fixed_is_deterministic_per_key_and_place(a: str, b: str) -> None:
    ring = KeyRing.parse(a)
    t1 = ring.seal_fixed("张三 正面.jpg", "items.source_key")
    assert t1.startswith("det1:a:") and "张三" not in t1
    assert ring.seal_fixed("张三 正面.jpg", "items.source_key") == t1
    assert ring.seal_fixed("张三 背面.jpg", "items.source_key") != t1
    assert ring.seal_fixed("张三 正面.jpg", "items.source_uri") != t1
    assert ring.open(t1, "items.source_key") == "张三 正面.jpg"
    with pytest.raises(TamperedError):
        ring.open(t1, "items.source_uri")
    both = KeyRing.parse(f"{b},{a}")
    assert both.seal_fixed("张三 正面.jpg", "items.source_key") != t1  # under b now
    assert t1 in both.seal_fixed_all("张三 正面.jpg", "items.source_key")
    assert both.open(t1, "items.source_key") == "张三 正面.jpg"


def test_blind_index_is_stable_normalised_and_keyed(a: str, b: str) -> None:
    ring = KeyRing.parse(a)
    idx = ring.blind_index(ID)
    assert idx is not None and idx.startswith("a:") and len(idx) == 2 + 64
    assert ID not in idx
    # same value, same index, in another process too (a ring parsed again)
    assert KeyRing.parse(a).blind_index(ID) == idx
    assert ring.blind_index(" 11010119900307123x ") == idx
    assert ring.blind_index("110101 19900307 123X") == idx
    assert ring.blind_index("110101199003071234") != idx
    assert KeyRing.parse(b).blind_index(ID) != idx
    assert ring.blind_index(None) is None


def test_blind_indexes_find_rows_of_either_key_during_a_rotation(a: str, b: str) -> None:
    old = KeyRing.parse(a)
    stored_before = old.blind_index(ID)
    rotating = KeyRing.parse(f"{b},{a}")
    stored_after = rotating.blind_index(ID)
    assert stored_after is not None and stored_after.startswith("b:")
    look = rotating.blind_indexes(ID)
    assert look == [stored_after, stored_before]
    assert rotating.index_needs_rotation(stored_before)
    assert not rotating.index_needs_rotation(stored_after)


def test_rotation_helpers(a: str, b: str) -> None:
    old = KeyRing.parse(a)
    token = old.seal(NAME, "results.name")
    fixed = old.seal_fixed("x.jpg", "items.source_key")
    raw = old.seal_json({"n": NAME}, "results.raw")
    ring = KeyRing.parse(f"{b},{a}")
    assert ring.needs_rotation(token) and ring.needs_rotation(fixed)
    assert ring.needs_rotation(NAME)  # written without a key
    assert not ring.needs_rotation(None)
    new = ring.reseal(token, "results.name")
    assert token_kid(new) == "b" and not ring.needs_rotation(new)
    assert ring.open(new, "results.name") == NAME
    new_fixed = ring.reseal(fixed, "items.source_key", kind="fixed")
    assert new_fixed == ring.seal_fixed("x.jpg", "items.source_key")
    new_raw = ring.reseal(raw, "results.raw", kind="json")
    assert token_kid(new_raw) == "b" and ring.open_json(new_raw, "results.raw") == {"n": NAME}
    # after the rotation the old key can go
    assert KeyRing.parse(b).open(new, "results.name") == NAME


@pytest.mark.parametrize(
    "spec",
    [
        "nokey",
        "a:not base64!!",
        "a:" + base64.b64encode(b"short").decode(),
        "bad id:" + base64.b64encode(b"\0" * 32).decode(),
    ],
)
def test_bad_specs_are_refused_without_quoting_the_material(spec: str) -> None:
    with pytest.raises(KeyRingError) as exc:
        KeyRing.parse(spec)
    msg = str(exc.value)
    assert "IDOCR_DATA_KEYS" in msg
    secret = spec.partition(":")[2]
    assert not secret or secret not in msg


def test_duplicate_key_ids_are_refused(a: str) -> None:
    other = "a:" + base64.b64encode(b"\x02" * 32).decode()
    with pytest.raises(KeyRingError, match="twice"):
        KeyRing.parse(f"{a},{other}")


def test_new_key_entries_are_fresh_and_valid() -> None:
    e1, e2 = new_key_entry(), new_key_entry()
    assert e1 != e2
    ring = KeyRing.parse(f"{e1},{e2}")
    assert ring.kids == [e1.split(":")[0], e2.split(":")[0]]
    assert len(base64.b64decode(material(e1))) == 32
    with pytest.raises(CryptoError):
        new_key_entry("not valid:id")


def test_repr_and_errors_never_show_material(a: str) -> None:
    ring = KeyRing.parse(a)
    assert material(a) not in repr(ring) and "a" in repr(ring)


def test_keyring_of_settings_is_built_once(a: str) -> None:
    from pipeline.config import Settings

    s1 = Settings(data_keys=a)
    s2 = Settings(data_keys=a)
    assert keyring(s1) is keyring(s2)
    assert keyring(s1).current_kid == "a"
