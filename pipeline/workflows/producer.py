"""The producer: stream a source into items, chunk by chunk, and enqueue after each commit.

Nothing is enqueued before the rows it names are committed (a worker must find its item), and
nothing but one chunk of references is held in memory. Input that can be judged without
decoding it (unreadable, empty, not an image by its content) is rejected here, with its reason,
and never enqueued.
"""

from __future__ import annotations

import multiprocessing
import queue
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice

from pipeline.domain.images import IMAGE_EXTENSIONS, ImageLimits
from pipeline.outputs.events import Outbox
from pipeline.sources.base import Source, SourceError, SourceRef
from pipeline.storage import repo
from pipeline.storage.db import unit_of_work
from pipeline.storage.models import ItemStatus

Enqueue = Callable[[Sequence[int]], None]

CHUNK = 500


@dataclass(slots=True)
class ScanReport:
    batch_id: str
    seen: int = 0
    added: int = 0
    queued: int = 0
    rejected: int = 0
    duplicates: int = 0
    already_present: int = 0
    #: rejected items by reason
    reasons: dict[str, int] = field(default_factory=dict)
    #: duplicates by reason: same_content, already_succeeded
    skipped: dict[str, int] = field(default_factory=dict)
    #: what the source listed but did not take, so never an item, by reason (a local folder:
    #: hidden, symlink_outside_root, symlink_loop, broken_symlink, special_file)
    skipped_files: dict[str, int] = field(default_factory=dict)


def new_batch_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _chunks(refs: Iterable[SourceRef], size: int) -> Iterator[list[SourceRef]]:
    it = iter(refs)
    while chunk := list(islice(it, size)):
        yield chunk


_DONE = object()


def _prefetched(chunks: Iterator[list[SourceRef]], depth: int = 2) -> Iterator[list[SourceRef]]:
    """Lists the next chunks in a thread while this one is inserted and enqueued: the listing
    waits on the network, the inserts on the database, and the two overlap. At most ``depth``
    chunks wait in memory; an error in the listing is raised here, in order."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(chunk, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    t = threading.Thread(target=run, name="idocr-list", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()


def to_new_item(ref: SourceRef, allowed: frozenset[str]) -> repo.NewItem:
    if ref.sha256:
        fingerprint = f"sha256:{ref.sha256}"
    elif ref.etag:
        fingerprint = f"etag:{ref.etag}"
    else:
        fingerprint = "unreadable" if ref.error else f"size:{ref.size}"
    row = repo.NewItem(
        source_key=ref.key,
        source_uri=ref.uri,
        fingerprint=fingerprint,
        sha256=ref.sha256,
        size=ref.size,
        etag=ref.etag,
    )

    def reject(reason: str, msg: str) -> repo.NewItem:
        row.status, row.reason, row.msg = ItemStatus.REJECTED, reason, msg
        return row

    if ref.error:
        return reject("unreadable", ref.error)
    if ref.size == 0:
        return reject("empty", "the file is empty (0 bytes)")
    if ref.media == "unknown":
        ext = ref.key.rsplit(".", 1)[-1].lower() if "." in ref.key.rsplit("/", 1)[-1] else ""
        hint = f" although its name ends in .{ext}" if f".{ext}" in IMAGE_EXTENSIONS else ""
        return reject("not_image", f"not an image: the content is not JPEG, PNG, BMP or PDF{hint}")
    if ref.media is not None and ref.media not in allowed:
        return reject(
            "unsupported_format",
            f"{ref.media.upper()} is not accepted by the provider (JPG, JPEG, PNG, BMP, PDF)",
        )
    return row


def _list_child(source: Source, chunk_size: int, conn) -> None:
    try:
        for chunk in _chunks(source.iter_refs(), chunk_size):
            conn.send(chunk)  # blocks while the parent is behind: memory stays bounded
        conn.send(None)
    except BaseException as exc:  # the parent raises it; only the message crosses
        conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        conn.close()


def _listed_in_child(source: Source, chunk_size: int) -> Iterator[list[SourceRef]]:
    """The listing in a forked process: parsing a large bucket listing is CPU work that would
    otherwise take turns with the inserts on one core. Chunks come back through a pipe."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_list_child, args=(source, chunk_size, child), name="idocr-list", daemon=True
    )
    proc.start()
    child.close()
    try:
        while True:
            try:
                msg = parent.recv()
            except EOFError:
                raise SourceError(f"the listing of {source.uri} stopped unexpectedly") from None
            if msg is None:
                return
            if isinstance(msg, tuple):
                raise SourceError(msg[2])
            yield msg
    finally:
        parent.close()
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=5)


def scan(
    source: Source,
    *,
    database_url: str,
    batch_id: str,
    provider: str,
    enqueue: Enqueue,
    limits: ImageLimits | None = None,
    chunk_size: int = CHUNK,
    on_chunk: Callable[[ScanReport], None] | None = None,
    via: str = "bytes",
    outbox: Outbox | None = None,
) -> ScanReport:
    """Stream ``source`` into the batch; items settled at once (rejected, duplicates) get their
    ``item.finished`` events in the chunk's transaction (``outbox``: whether a webhook is
    configured)."""
    allowed = (limits or ImageLimits()).allowed
    events = outbox or Outbox()
    report = ScanReport(batch_id=batch_id)
    with unit_of_work(database_url) as s:
        batch, new_batch = repo.get_or_create_batch(s, batch_id, source.uri, provider, via)
        if batch.via != via:
            raise ValueError(f"batch {batch_id} sends images by {batch.via}, not by {via}")
    if not new_batch:
        with unit_of_work(database_url) as s:
            repo.refresh_statistics(s)
    if getattr(source, "list_in_subprocess", False):
        chunks = _listed_in_child(source, chunk_size)
    else:
        chunks = _chunks(source.iter_refs(), chunk_size)
    for refs in _prefetched(chunks):
        rows = [to_new_item(ref, allowed) for ref in refs]
        with unit_of_work(database_url) as s:
            items = repo.add_items(s, batch_id, rows, new_batch=new_batch)
            to_send = [i.id for i in items if i.status == ItemStatus.QUEUED]
            events.items_finished(
                s,
                batch_id,
                [(i.id, i.status, i.reason) for i in items if i.status != ItemStatus.QUEUED],
            )
            for i in items:
                if i.status == ItemStatus.REJECTED:
                    report.rejected += 1
                    report.reasons[i.reason or "?"] = report.reasons.get(i.reason or "?", 0) + 1
                elif i.status == ItemStatus.DUPLICATE:
                    report.duplicates += 1
                    report.skipped[i.reason or "?"] = report.skipped.get(i.reason or "?", 0) + 1
        # after the commit: a worker must find the rows its messages name
        if to_send:
            enqueue(to_send)
        report.seen += len(refs)
        report.added += len(items)
        report.queued += len(to_send)
        report.already_present += len(refs) - len(items)
        if on_chunk is not None:
            on_chunk(report)
    # read once the listing has ended (the listing thread no longer counts)
    report.skipped_files = dict(getattr(source, "skipped", {}))
    return report


def retry_failed(
    database_url: str, batch_id: str, enqueue: Enqueue, reasons: Sequence[str] = ("transient",)
) -> int:
    """Re-queue the batch's items that failed for one of ``reasons``: by default those whose
    retries ran out on transient errors; ``unknown`` ones may have been billed already."""
    with unit_of_work(database_url) as s:
        ids = repo.requeue_failed(s, batch_id, reasons)
    enqueue(ids)
    return len(ids)


def requeue(
    database_url: str,
    batch_id: str,
    enqueue: Enqueue,
    stale_before: datetime | None = None,
    chunk_size: int = 1000,
) -> int:
    """Send a message again for every queued item of the batch (after a crash between commit
    and enqueue, or a flushed broker), and for claims older than ``stale_before`` (their worker
    died). Safe: a duplicate message finds its item claimed."""
    sent, after = 0, 0
    while True:
        with unit_of_work(database_url, read_only=True) as s:
            ids = repo.claimable_ids(s, batch_id, stale_before, after_id=after, limit=chunk_size)
        if not ids:
            return sent
        enqueue(ids)
        sent += len(ids)
        after = ids[-1]
