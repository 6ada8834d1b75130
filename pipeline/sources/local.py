"""A local folder, walked recursively and lazily.

Every regular, non-hidden file becomes a reference: those that are not images (by content and
by extension) are still recorded, so the run reports them instead of silently dropping them.
The file is read once here, to fingerprint it (sha256) and sniff its type from its content.

What is deliberately not taken is counted in :attr:`LocalSource.skipped`, by reason:

* ``hidden``: a name starting with ``.`` (``.DS_Store``, ``.git``, editor droppings); a hidden
  folder counts once and is not entered;
* ``symlink_outside_root``: a symbolic link whose target lies outside the scanned folder (unless
  ``follow_symlinks=True``): a link must not bring in, and bill, files the folder does not hold.
  A link to a file or folder inside it is followed;
* ``symlink_loop``: a link to a folder already entered (an ancestor, or a second way into one):
  a loop cannot hang the scan, and no folder is listed twice through links;
* ``broken_symlink``: a link to nothing (or to a chain of links that never ends);
* ``special_file``: a fifo, socket or device.

Names are taken as the system gives them. A name that is not valid UTF-8 (Linux allows any
bytes) or holds control characters (a newline) gets a key with those bytes and characters
written as backslash escapes (``caf\\xe9.jpg``, ``a\\nb.jpg``): keys are printed, logged and
exported, and a database will not store undecodable text. The URI keeps the exact bytes
(percent-encoded) and is what the file is read by. A file reached through a link is read by its
real location, so a link changed after the scan cannot redirect the read.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.domain.images import SNIFF_BYTES, sniff
from pipeline.sources.base import SourceError, SourceRef

_CHUNK = 1 << 20

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable_key(raw: str) -> str:
    """``raw`` (a relative path from the file system) as valid, single-line text."""
    text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


@dataclass(slots=True)
class _Folder:
    shown: Path  # under the root as the user sees it (links not resolved): gives the keys
    real: Path  # where it really is: gives the URIs
    entries: Iterator[os.DirEntry[str]]


class LocalSource:
    def __init__(self, root: str | os.PathLike[str], *, follow_symlinks: bool = False) -> None:
        path = Path(root).expanduser()
        if not path.exists():
            raise SourceError(f"no such folder: {path}")
        if not path.is_dir():
            raise SourceError(f"not a folder: {path}")
        self.root = path.resolve()
        self.uri = self.root.as_uri()
        #: follow symbolic links whose target lies outside the folder
        self.follow_symlinks = follow_symlinks
        self._skipped: Counter[str] = Counter()

    @property
    def skipped(self) -> dict[str, int]:
        """What the last (or current) :meth:`iter_refs` did not take, by reason."""
        return dict(self._skipped)

    def iter_refs(self) -> Iterator[SourceRef]:
        # Depth-first over sorted entries, with an explicit stack of directory listings: the
        # order of `find | sort`, no recursion limit, and only the open directories' entries
        # in memory.
        self._skipped = Counter()
        entered: set[tuple[int, int]] = set()
        top = self._enter(self.root, self.root, entered)
        if isinstance(top, SourceRef):
            yield top
            return
        if top is None:  # only a link is refused as a loop; the root is entered
            return
        stack = [top]
        while stack:
            folder = stack[-1]
            entry = next(folder.entries, None)
            if entry is None:
                stack.pop()
                continue
            if entry.name.startswith("."):
                self._skipped["hidden"] += 1
                continue
            shown, real = folder.shown / entry.name, folder.real / entry.name
            try:
                link = entry.is_symlink()
                if link:
                    taken = self._follow(real)
                    if taken is None:
                        continue
                    real, mode = taken
                    is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
                else:
                    # the type from the directory listing itself: no stat per file
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_file = not is_dir and entry.is_file(follow_symlinks=False)
            except OSError as exc:
                yield self._unreadable(shown, real, exc)
                continue
            if is_dir:
                listing = self._enter(shown, real, entered, via_link=link)
                if isinstance(listing, SourceRef):
                    yield listing
                elif listing is not None:
                    stack.append(listing)
            elif is_file:
                yield self._ref(shown, real)
            else:
                self._skipped["special_file"] += 1

    def _follow(self, link: Path) -> tuple[Path, int] | None:
        """The real path and mode behind a link, or None (counted) when it is not followed."""
        try:
            target = Path(os.path.realpath(link, strict=True))
            mode = target.stat().st_mode
        except OSError:
            self._skipped["broken_symlink"] += 1
            return None
        if not self.follow_symlinks and not target.is_relative_to(self.root):
            self._skipped["symlink_outside_root"] += 1
            return None
        return target, mode

    def _enter(
        self, shown: Path, real: Path, entered: set[tuple[int, int]], via_link: bool = False
    ) -> _Folder | SourceRef | None:
        # Only a link can make a loop (or reach a folder twice); a plain folder is always
        # entered, so what a link showed first is still listed where it really is.
        try:
            st = real.stat()
            if via_link and (st.st_dev, st.st_ino) in entered:
                self._skipped["symlink_loop"] += 1
                return None
            entered.add((st.st_dev, st.st_ino))
            with os.scandir(real) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            return self._unreadable(shown, real, exc)
        return _Folder(shown, real, iter(entries))

    def _key(self, shown: Path) -> str:
        return printable_key(shown.relative_to(self.root).as_posix())

    def _unreadable(self, shown: Path, real: Path, exc: OSError) -> SourceRef:
        return SourceRef(
            key=self._key(shown),
            uri=real.as_uri(),
            error=f"cannot read: {exc.strerror or type(exc).__name__}",
        )

    def _ref(self, shown: Path, real: Path) -> SourceRef:
        digest = hashlib.sha256()
        size = 0
        head = b""
        try:
            with real.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    if not head:
                        head = chunk[:SNIFF_BYTES]
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            return self._unreadable(shown, real, exc)
        return SourceRef(
            key=self._key(shown),
            uri=real.as_uri(),
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


def open_location(location: str, *, follow_symlinks: bool = False, **_: object) -> LocalSource:
    """The folder source of the scheme registry (:mod:`pipeline.locations`)."""
    return LocalSource(location.removeprefix("file://"), follow_symlinks=follow_symlinks)


def read_uri(uri: str, **_: object) -> bytes:
    """The bytes behind a file:// URI (what items store), its path taken byte for byte."""
    from urllib.parse import unquote_to_bytes, urlparse

    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise SourceError(f"not a file URI: {parsed.scheme}://")
    try:
        return Path(os.fsdecode(unquote_to_bytes(parsed.path))).read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read file: {exc.strerror or type(exc).__name__}") from None
