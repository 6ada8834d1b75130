from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.domain.images import ImageLimits
from pipeline.workflows.producer import to_new_item
from pipeline.sources.base import SourceError
from pipeline.sources.local import LocalSource, read_uri


def tree(root: Path) -> None:
    (root / "b dir" / "子目录").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 100)
    (root / "b dir" / "子目录" / "身份证 #1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    (root / "b dir" / "readme.txt").write_text("hello")
    (root / "empty.bmp").write_bytes(b"")
    (root / ".hidden.jpg").write_bytes(b"\xff\xd8\xff")
    (root / ".git").mkdir()
    (root / ".git" / "x.jpg").write_bytes(b"\xff\xd8\xff")


def test_walks_recursively_in_a_stable_order(tmp_path: Path) -> None:
    tree(tmp_path)
    refs = list(LocalSource(tmp_path).iter_refs())
    assert [r.key for r in refs] == ["a.jpg", "b dir/readme.txt", "b dir/子目录/身份证 #1.png", "empty.bmp"]
    by = {r.key: r for r in refs}
    assert by["a.jpg"].media == "jpeg" and by["a.jpg"].size == 104 and len(by["a.jpg"].sha256) == 64
    assert by["b dir/子目录/身份证 #1.png"].media == "png"
    assert by["b dir/readme.txt"].media == "unknown"
    assert by["empty.bmp"].media is None and by["empty.bmp"].size == 0
    assert by["b dir/子目录/身份证 #1.png"].uri.startswith("file:///")


def test_producer_judges_what_it_can_without_decoding(tmp_path: Path) -> None:
    tree(tmp_path)
    rows = {r.key: to_new_item(r, ImageLimits().allowed) for r in LocalSource(tmp_path).iter_refs()}
    assert rows["a.jpg"].status == "queued"
    assert (rows["empty.bmp"].status, rows["empty.bmp"].reason) == ("rejected", "empty")
    assert rows["b dir/readme.txt"].reason == "not_image"
    (tmp_path / "x.gif").write_bytes(b"GIF89a" + b"0" * 20)
    gif = next(r for r in LocalSource(tmp_path).iter_refs() if r.key == "x.gif")
    assert to_new_item(gif, ImageLimits().allowed).reason == "unsupported_format"


def test_an_unreadable_file_becomes_a_rejected_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root reads any file regardless of its mode, so the refusal is simulated at open()
    tree(tmp_path)
    real_open = Path.open

    def deny(self: Path, *a, **k):  # type: ignore[no-untyped-def]
        if self.name == "a.jpg":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *a, **k)

    monkeypatch.setattr(Path, "open", deny)
    ref = next(r for r in LocalSource(tmp_path).iter_refs() if r.key == "a.jpg")
    assert ref.error == "cannot read: Permission denied"
    row = to_new_item(ref, ImageLimits().allowed)
    assert (row.status, row.reason, row.fingerprint) == ("rejected", "unreadable", "unreadable")


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such folder"):
        LocalSource(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SourceError, match="not a folder"):
        LocalSource(tmp_path / "f")


def test_read_bytes_cannot_escape_the_folder(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(SourceError, match="escapes"):
        LocalSource(tmp_path / "in").read_bytes("../../etc/passwd")


# --- links, hidden files, odd names ----------------------------------------------------------

JPEG = b"\xff\xd8\xff\xe0" + b"1" * 100


def keys(source: LocalSource) -> list[str]:
    return [r.key for r in source.iter_refs()]


def test_hidden_entries_are_counted(tmp_path: Path) -> None:
    tree(tmp_path)
    source = LocalSource(tmp_path)
    assert ".hidden.jpg" not in keys(source)
    assert source.skipped == {"hidden": 2}  # .hidden.jpg, and .git once (not entered)


def test_a_link_out_of_the_folder_is_not_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "scans", tmp_path / "elsewhere"
    root.mkdir()
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(JPEG)
    (outside / "dir" / "more.jpg").write_bytes(JPEG)
    (root / "a.jpg").write_bytes(JPEG)
    (root / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "leakdir").symlink_to(outside / "dir")
    source = LocalSource(root)
    assert keys(source) == ["a.jpg"]
    assert source.skipped == {"symlink_outside_root": 2}

    followed = LocalSource(root, follow_symlinks=True)
    refs = {r.key: r for r in followed.iter_refs()}
    assert sorted(refs) == ["a.jpg", "leak.jpg", "leakdir/more.jpg"]
    # read where it really is: changing the link afterwards cannot redirect the read
    assert refs["leak.jpg"].uri == (outside / "secret.jpg").resolve().as_uri()
    assert followed.skipped == {}


def test_links_inside_the_folder_are_followed_and_loops_end(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.jpg").write_bytes(JPEG)
    (tmp_path / "alias.jpg").symlink_to(tmp_path / "real" / "x.jpg")
    (tmp_path / "real" / "up").symlink_to(tmp_path)  # a loop back to the root
    (tmp_path / "real" / "self").symlink_to(tmp_path / "real")  # and onto itself
    (tmp_path / "a_view").symlink_to(tmp_path / "real")  # a second way in, listed first
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    chain = tmp_path / "chain"
    chain.symlink_to(chain)  # a link to itself
    source = LocalSource(tmp_path)
    refs = {r.key: r for r in source.iter_refs()}
    assert sorted(refs) == ["a_view/x.jpg", "alias.jpg", "real/x.jpg"]
    assert refs["alias.jpg"].uri == (tmp_path / "real" / "x.jpg").resolve().as_uri()
    assert refs["alias.jpg"].sha256 == refs["real/x.jpg"].sha256  # the producer's duplicate
    # a_view/up, a_view/self (then real/up, real/self once real is entered again as itself)
    assert source.skipped == {"symlink_loop": 4, "broken_symlink": 2}


def test_special_files_are_counted(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "a.jpg").write_bytes(JPEG)
    source = LocalSource(tmp_path)
    assert keys(source) == ["a.jpg"]
    assert source.skipped == {"special_file": 1}


def test_odd_names_become_items_with_printable_keys(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    names = {
        b"caf\xe9.jpg": "caf\\xe9.jpg",  # Latin-1, not UTF-8
        b"line\nbreak.jpg": "line\\nbreak.jpg",
        "张三 正面.jpg".encode(): "张三 正面.jpg",
        ("长" * 80 + ".jpg").encode(): "长" * 80 + ".jpg",  # 244 bytes
        b"x" * 251 + b".jpg": "x" * 251 + ".jpg",  # 255 bytes: the longest name there is
    }
    for raw in names:
        with open(os.path.join(root, raw), "wb") as fh:
            fh.write(JPEG + raw)
    refs = {r.key: r for r in LocalSource(tmp_path).iter_refs()}
    assert sorted(refs) == sorted(names.values())
    for raw, key in names.items():
        ref = refs[key]
        assert ref.error is None and ref.media == "jpeg"
        key.encode("utf-8")  # valid text, storable anywhere
        assert "\n" not in key
        assert read_uri(ref.uri) == JPEG + raw  # the URI finds the exact file
