"""Batch output: one JSON document per item plus a manifest, in a folder or under an S3 prefix.

This is how batch document services (Textract, Document AI batch jobs) hand back results: the
caller names an output location and finds there, per batch::

    {batch}/results/{item_id:012d}.json   the normalised record of one item (outputs.records)
    {batch}/manifest.jsonl                one line per item: source, key, status, result
    {batch}/manifest.json                 summary: batch, created_at, counts, the jsonl's name

Choices:

* **Result names are the item's database id**, zero-padded. It is stable (re-running the output
  of a batch overwrites the same names: idempotent), unique (two items never share it, not even
  the two versions of a file that changed at the same path between scans, which share a source
  URI), and it says nothing about the person: source keys often carry names or ID numbers, and
  even a hash of the key can be reversed by trying the ~10^11 plausible ID numbers. The record
  inside, and the manifest, carry ``source`` and ``key``.
* **The manifest is written last**, after every result was stored: its presence means the
  output is complete. A run that fails part-way leaves results but no new manifest.
* **Memory stays flat** for millions of items: records are streamed from the database, manifest
  lines are spooled to a temporary file (then moved or uploaded), and concurrent uploads are
  bounded to twice the number of upload threads.
* Local writes are atomic (a temporary file in the destination directory, then ``os.replace``):
  a reader never sees half a document. Files are created ``0600`` (``mkstemp``): they hold ID
  card data.
* Errors name the location and the (non-personal) object name, never credentials or content.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Generator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from boto3.exceptions import S3UploadFailedError
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.locations import load, scheme_of
from pipeline.outputs.records import records
from pipeline.s3 import SCHEME, S3Retry, describe_error, is_transient, make_s3_client, parse_s3_uri
from pipeline.storage.models import Batch, Item

log = logging.getLogger(__name__)

T = TypeVar("T")

JSON_TYPE = "application/json"
JSONL_TYPE = "application/x-ndjson"
MANIFEST = "manifest.json"
MANIFEST_LINES = "manifest.jsonl"
RESULTS_DIR = "results"
MANIFEST_VERSION = 1

# A batch id becomes a path segment / key prefix: nothing that could climb out of the output
# location or need escaping. Generated ids (20240101-120000-ab12) fit; so do sensible custom ones.
_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class OutputError(Exception):
    """The output location could not be written (after retries, for S3)."""


class OutputSink(Protocol):
    """Where a batch's documents go. Names are relative POSIX paths (``batch/results/1.json``)."""

    #: how many ``put`` calls may run at once (1: call it from one thread only)
    concurrency: int

    def put(self, name: str, data: bytes, content_type: str) -> None: ...

    def put_file(self, name: str, path: str | os.PathLike[str], content_type: str) -> None:
        """Store a (large) file's content under ``name``; the file may be moved away."""
        ...

    def location(self, name: str) -> str:
        """Where ``name`` ends up, for messages and reports (``s3://…`` or a local path)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class OutputReport:
    records: int
    #: where the summary manifest was written (a local path or an s3:// URI)
    manifest: str
    counts: dict[str, int] = field(default_factory=dict)


def _check_name(name: str) -> str:
    """A relative path with no empty, ``.`` or ``..`` segment: it stays inside the location."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"not a relative output name: {name!r}")
    return name


def _check_batch_id(batch_id: str) -> None:
    if not isinstance(batch_id, str) or not _BATCH_ID.fullmatch(batch_id):
        raise ValueError(
            f"batch id {batch_id!r} cannot name an output folder "
            "(letters, digits, '.', '_', '-'; at most 64; not starting with '.' or '-')"
        )


# -- local folder ------------------------------------------------------------------------------


class FolderOutput:
    """A local folder (created if missing); every write is atomic."""

    # Local writes are disk-bound and cheap; one thread keeps them simple and in order.
    concurrency = 1

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        """``fsync``: flush every document (and its directory entry) to disk as it is written,
        so that a power cut cannot leave a manifest pointing at lost results. Off by default:
        millions of fsyncs cost hours, and the atomic replace already protects readers and
        process crashes; a run interrupted by a power cut is simply run again."""
        self.root = Path(root)
        self._fsync = fsync
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.root}: {exc.strerror}") from exc

    def __repr__(self) -> str:
        return f"FolderOutput({str(self.root)!r})"

    def location(self, name: str) -> str:
        return str(self.root / _check_name(name))

    def _dest(self, name: str) -> Path:
        dest = self.root / _check_name(name)
        parent = dest.parent
        if parent not in self._dirs:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create folder {parent}: {exc.strerror}") from exc
            with self._dirs_lock:
                self._dirs.add(parent)
        return dest

    def _write_atomic(self, dest: Path, write: Callable[[Any], None], *, sync: bool) -> None:
        # The temporary file sits next to the destination: os.replace is only atomic within
        # one file system. Its name starts with "." so listings and globs skip it.
        try:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        except OSError as exc:
            raise OutputError(f"cannot write {dest}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                if sync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException as exc:
            with suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {dest}: {exc.strerror}") from exc
            raise
        if sync:
            self._sync_dir(dest.parent)

    @staticmethod
    def _sync_dir(path: Path) -> None:
        # The rename itself is durable only once the directory entry is on disk.
        with suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put(self, name: str, data: bytes, content_type: str) -> None:
        self._write_atomic(self._dest(name), lambda fh: fh.write(data), sync=self._fsync)

    def put_file(self, name: str, path: str | os.PathLike[str], content_type: str) -> None:
        dest = self._dest(name)
        src = Path(path)
        try:
            same_fs = src.stat().st_dev == dest.parent.stat().st_dev
        except OSError as exc:
            raise OutputError(f"cannot write {dest}: {exc.strerror}") from exc
        if same_fs:
            # A rename on one file system: atomic, and no copy of a possibly huge file.
            try:
                if self._fsync:
                    fd = os.open(src, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                os.replace(src, dest)
            except OSError as exc:
                raise OutputError(f"cannot write {dest}: {exc.strerror}") from exc
            if self._fsync:
                self._sync_dir(dest.parent)
            return

        def copy(fh: Any) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, fh, 1024 * 1024)

        self._write_atomic(dest, copy, sync=self._fsync)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- S3 ----------------------------------------------------------------------------------------


def _upload_cause(exc: BaseException) -> BaseException:
    # boto3's upload_file turns a ClientError into S3UploadFailedError, raised while handling it:
    # the original (with its code and status) is the implicit context.
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc


def _transient(exc: BaseException) -> bool:
    return is_transient(_upload_cause(exc))


class S3Output:
    """Objects under ``s3://bucket/prefix/`` (AWS or any S3-compatible store).

    ``put`` is thread-safe (boto3 clients are) and is meant to be called from ``concurrency``
    threads at once. Each request is retried with bounded, jittered backoff on transient errors
    only (on top of botocore's own retries), as the S3 source does.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        max_workers: int = 8,
        retry_attempts: int = 5,
        retry_wait: float = 0.5,
        retry_max_wait: float = 20.0,
        retry_deadline: float = 120.0,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"{SCHEME}{self.bucket}/{self.prefix}"
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._retry = S3Retry(retry_attempts, retry_wait, retry_max_wait, retry_deadline)
        self.concurrency = max_workers
        self.endpoint_url = endpoint_url
        self._owns_client = client is None
        # One pooled connection per upload thread, plus the manifest's multipart upload.
        self._client: Any = client or make_s3_client(
            endpoint_url=endpoint_url, region=region, max_pool_connections=max_workers + 2
        )

    def __repr__(self) -> str:
        return f"S3Output({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    def location(self, name: str) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}{_check_name(name)}"

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return self._retry.call(
                f"{what} s3://{self.bucket}/{key}",
                fn,
                transient=_transient,
                describe=lambda exc: describe_error(_upload_cause(exc)),
            )
        except Exception as exc:  # every failure becomes an OutputError
            raise OutputError(
                f"cannot write to bucket {self.bucket!r} prefix {self.prefix!r} "
                f"(object {key.removeprefix(self.prefix)!r}): {describe_error(_upload_cause(exc))}"
            ) from exc

    def put(self, name: str, data: bytes, content_type: str) -> None:
        key = self.prefix + _check_name(name)
        self._call(
            "put",
            key,
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
            ),
        )

    def put_file(self, name: str, path: str | os.PathLike[str], content_type: str) -> None:
        # upload_file switches to a multipart upload for big files (the manifest of millions).
        key = self.prefix + _check_name(name)
        filename = os.fspath(path)
        self._call(
            "upload",
            key,
            lambda: self._client.upload_file(
                filename, self.bucket, key, ExtraArgs={"ContentType": content_type}
            ),
        )

    def close(self) -> None:
        """Close the connection pool of a client this sink created (a given one is left be)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_output(
    location: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> FolderOutput | S3Output:
    """``s3://bucket/prefix`` → :class:`S3Output`; a path → :class:`FolderOutput` (created).

    Another URL scheme (``gs://``, ``https://``…) is refused rather than becoming a local
    folder named ``gs:`` (:func:`pipeline.locations.scheme_of`).
    """
    try:
        opener = load(scheme_of(location).output)
    except ValueError as exc:
        raise ValueError(str(exc).replace("location scheme", "output location scheme")) from None
    sink: FolderOutput | S3Output = opener(location, endpoint_url=endpoint_url, region=region)
    return sink


def open_s3_output(
    location: str, *, endpoint_url: str | None = None, region: str | None = None, **_: object
) -> S3Output:
    """The S3 output of the scheme registry."""
    return S3Output(location, endpoint_url=endpoint_url, region=region)


def open_folder_output(location: str, **_: object) -> FolderOutput:
    """The folder output of the scheme registry."""
    return FolderOutput(location.removeprefix("file://"))


# -- writing a batch ---------------------------------------------------------------------------


class _Uploader:
    """Runs ``sink.put`` on ``sink.concurrency`` threads with at most twice that many pending,
    so memory holds a handful of documents whatever the batch size. The first failure stops
    new submissions and is raised."""

    def __init__(self, sink: OutputSink, *, max_pending: int | None = None) -> None:
        self._sink = sink
        workers = max(1, int(sink.concurrency))
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="idocr-output") if workers > 1 else None
        )
        self.max_pending = max_pending or 2 * workers
        self._pending: set[Future[None]] = set()

    def _reap(self, done: set[Future[None]]) -> None:
        for fut in done:
            fut.result()  # raises the put's error

    def submit(self, name: str, data: bytes, content_type: str) -> None:
        if self._pool is None:
            self._sink.put(name, data, content_type)
            return
        while len(self._pending) >= self.max_pending:
            done, not_done = wait(self._pending, return_when=FIRST_COMPLETED)
            self._pending = not_done
            self._reap(done)
        self._pending.add(self._pool.submit(self._sink.put, name, data, content_type))

    def finish(self) -> None:
        """Wait for every put; raise the first failure."""
        while self._pending:
            done, not_done = wait(self._pending, return_when=FIRST_COMPLETED)
            self._pending = not_done
            self._reap(done)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On failure, puts not started are dropped and running ones awaited: nothing is still
        # writing once the error reaches the caller.
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=e is not None)
        self._pending.clear()


def _records_with_ids(
    session: Session, batch_id: str, chunk: int
) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """``records()`` paired with each item's id (the result name), which the record lacks.

    A second query streams ``(id, source_uri)`` in the same order (both order by item id). The
    records query is started first, so items added meanwhile by a concurrent scan can only show
    up as extra ids at the end (ignored); a pair that does not match means the batch changed
    under us, and the run stops rather than misname a result.
    """
    recs = records(session, batch_id, chunk=chunk)
    with closing(recs):
        first = next(recs, None)
        if first is None:
            return
        ids = session.execute(
            select(Item.id, Item.source_uri)
            .where(Item.batch_id == batch_id)
            .order_by(Item.id)
            .execution_options(yield_per=chunk)
        )
        with closing(ids):
            id_rows = iter(ids)
            rec: dict[str, Any] | None = first
            while rec is not None:
                row = next(id_rows, None)
                # a purged record has no source left to compare (its names are gone)
                if row is None or (rec["source"] is not None and row.source_uri != rec["source"]):
                    raise OutputError(
                        f"batch {batch_id!r} changed while its output was being written "
                        "(items added or removed); run the output again"
                    )
                yield int(row.id), rec
                rec = next(recs, None)


def result_name(item_id: int) -> str:
    """The name of an item's result document, relative to its batch folder."""
    return f"{RESULTS_DIR}/{item_id:012d}.json"


def write_batch_output(
    session: Session,
    batch_id: str,
    sink: OutputSink,
    *,
    chunk: int = 500,
    spool_dir: str | os.PathLike[str] | None = None,
) -> OutputReport:
    """Write every record of the batch, then its manifest, to ``sink``.

    ``spool_dir`` holds the manifest lines until they are stored (default: the system's temp
    directory; give a disk-backed one if that is a small tmpfs and the batch is huge).
    """
    _check_batch_id(batch_id)
    if session.get(Batch, batch_id) is None:
        raise OutputError(f"no batch {batch_id!r}")
    created_at = datetime.now(UTC)
    counts: Counter[str] = Counter()
    n = 0
    fd, spool = tempfile.mkstemp(dir=spool_dir, prefix=f".{batch_id}.", suffix=".jsonl")
    try:
        with (
            os.fdopen(fd, "w", encoding="utf-8", newline="\n") as lines,
            _Uploader(sink) as up,
            closing(_records_with_ids(session, batch_id, chunk)) as rows,
        ):
            for item_id, rec in rows:
                rel = result_name(item_id)
                doc = json.dumps(rec, ensure_ascii=False, indent=2) + "\n"
                up.submit(f"{batch_id}/{rel}", doc.encode("utf-8"), JSON_TYPE)
                status = str(rec["status"])
                entry = {
                    "source": rec["source"],
                    "key": rec["key"],
                    "status": status,
                    "result": rel,
                }
                lines.write(json.dumps(entry, ensure_ascii=False) + "\n")
                counts[status] += 1
                n += 1
            up.finish()
        # Every result is stored: now the manifest, the summary last (it marks completion).
        sink.put_file(f"{batch_id}/{MANIFEST_LINES}", spool, JSONL_TYPE)
        summary = {
            "version": MANIFEST_VERSION,
            "batch": batch_id,
            "created_at": created_at.isoformat(timespec="seconds"),
            "records": n,
            "counts": dict(sorted(counts.items())),
            "manifest": MANIFEST_LINES,
            "results": f"{RESULTS_DIR}/",
        }
        body = json.dumps(summary, ensure_ascii=False, indent=2) + "\n"
        sink.put(f"{batch_id}/{MANIFEST}", body.encode("utf-8"), JSON_TYPE)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(spool)  # gone already if the folder sink moved it into place
    where = sink.location(f"{batch_id}/{MANIFEST}")
    log.info("batch %s: %d result documents and the manifest written to %s", batch_id, n, where)
    return OutputReport(records=n, manifest=where, counts=dict(sorted(counts.items())))
