from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.images import ImageLimits
from pipeline.producer import to_new_item
from pipeline.sources.base import SourceError
from pipeline.sources.local import LocalSource


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
