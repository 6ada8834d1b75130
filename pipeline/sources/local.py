"""A local folder, walked recursively and lazily.

Every regular, non-hidden file becomes a reference: those that are not images (by content and
by extension) are still recorded, so the run reports them instead of silently dropping them.
The file is read once here, to fingerprint it (sha256) and sniff its type from its content.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.images import SNIFF_BYTES, sniff
from pipeline.sources.base import SourceError, SourceRef

_CHUNK = 1 << 20


class LocalSource:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = Path(root).expanduser()
        if not path.exists():
            raise SourceError(f"no such folder: {path}")
        if not path.is_dir():
            raise SourceError(f"not a folder: {path}")
        self.root = path.resolve()
        self.uri = self.root.as_uri()

    def iter_refs(self) -> Iterator[SourceRef]:
        # Depth-first over sorted entries, with an explicit stack of directory listings: the
        # order of `find | sort`, no recursion limit, and only the open directories' entries
        # in memory.
        top = self._listing(self.root)
        if isinstance(top, SourceRef):
            yield top
            return
        stack = [top]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            if entry.name.startswith("."):
                continue  # .DS_Store, .git, editor droppings
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                yield self._unreadable(path, exc)
                continue
            if is_dir:
                listing = self._listing(path)
                if isinstance(listing, SourceRef):
                    yield listing
                else:
                    stack.append(listing)
            elif is_file:  # not sockets, fifos, broken links
                yield self._ref(path)

    def _listing(self, folder: Path) -> Iterator[os.DirEntry[str]] | SourceRef:
        try:
            with os.scandir(folder) as it:
                return iter(sorted(it, key=lambda e: e.name))
        except OSError as exc:
            return self._unreadable(folder, exc)

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _unreadable(self, path: Path, exc: OSError) -> SourceRef:
        return SourceRef(
            key=self._key(path),
            uri=path.as_uri(),
            error=f"cannot read: {exc.strerror or type(exc).__name__}",
        )

    def _ref(self, path: Path) -> SourceRef:
        digest = hashlib.sha256()
        size = 0
        head = b""
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    if not head:
                        head = chunk[:SNIFF_BYTES]
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            return self._unreadable(path, exc)
        return SourceRef(
            key=self._key(path),
            uri=path.as_uri(),
            size=size,
            sha256=digest.hexdigest(),
            media=(sniff(head) or "unknown") if head else None,
        )

    def read_bytes(self, key: str) -> bytes:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise SourceError("key escapes the source folder")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise SourceError(f"cannot read {key}: {exc.strerror or type(exc).__name__}") from None


def read_uri(uri: str) -> bytes:
    """The bytes behind a file:// URI (what items store)."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise SourceError(f"not a file URI: {parsed.scheme}://")
    try:
        return Path(unquote(parsed.path)).read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or type(exc).__name__}") from None
