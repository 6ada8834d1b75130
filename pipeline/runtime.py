"""Wiring: settings → provider, limiter, ledger, processor. One set per process, built lazily
(after a fork, never inherited: sockets and HTTP pools must not be shared)."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

from pipeline.config import (
    SANDBOX_ACCOUNT,
    SANDBOX_KEY,
    ConfigError,
    Settings,
    provider_identity,
)
from pipeline.coordination.admission import Admission
from pipeline.coordination.dedupe import ContentClaims
from pipeline.coordination.gate import PauseSignal
from pipeline.coordination.heartbeat import Heartbeat
from pipeline.coordination.journal import AnswerJournal, SentMarks
from pipeline.coordination.quota import QuotaExhausted, QuotaLedger
from pipeline.coordination.ratelimit import provider_limiter
from pipeline.coordination.redisconn import redis_client
from pipeline.domain.images import DECODE_BUDGET, ImageLimits
from pipeline.outputs.events import Outbox
from pipeline.providers.base import Provider
from pipeline.providers.ihuyi import IhuyiClient
from pipeline.queue import WorkQueue
from pipeline.sources import head_uri, presign_uri, read_uri
from pipeline.workflows.local import start_sandbox
from pipeline.workflows.processing import Processor, RetryPolicy
from pipeline.workflows.reconcile import Reconciler
from pipeline.workflows.retention import RedisCopies

log = logging.getLogger(__name__)


_lock = threading.Lock()
_sandbox = None


def _sandbox_url(settings: Settings) -> str:
    global _sandbox
    if settings.sandbox_url:
        return settings.sandbox_url
    with _lock:
        if _sandbox is None:
            _sandbox = start_sandbox(settings)
            log.info("started an in-process sandbox at %s", _sandbox.url)
        return _sandbox.url


def build_provider(settings: Settings, name: str | None = None) -> Provider:
    """The client of provider ``name`` (default: the first of the chain)."""
    name = name or settings.resolved_provider
    if name == "local":
        # imported here: only a process that runs OCR pays for loading the engine
        from pipeline.providers.local import LocalOCRClient

        return LocalOCRClient(timeout=settings.http_timeout)
    if name == "sandbox":
        return IhuyiClient(
            SANDBOX_ACCOUNT,
            SANDBOX_KEY,
            _sandbox_url(settings),
            timeout=settings.http_timeout,
            name="sandbox",
        )
    if name == "ihuyi":
        if not settings.ihuyi_account or settings.ihuyi_api_key is None:
            raise ConfigError(
                "IDOCR_PROVIDER=ihuyi needs IDOCR_IHUYI_ACCOUNT and IDOCR_IHUYI_API_KEY"
            )
        return IhuyiClient(
            settings.ihuyi_account,
            settings.ihuyi_api_key.get_secret_value(),
            settings.ihuyi_base_url,
            timeout=settings.http_timeout,
        )
    if name == "showapi":
        if settings.showapi_app_key is None:
            raise ConfigError("IDOCR_PROVIDER=showapi needs IDOCR_SHOWAPI_APP_KEY")
        from pipeline.providers.showapi import ShowapiClient

        return ShowapiClient(
            settings.showapi_app_key.get_secret_value(),
            settings.showapi_base_url,
            timeout=settings.http_timeout,
        )
    raise ConfigError(f"unknown provider {name!r}")


#: showapi asks for images under 1.5 MB (seed 003); ihuyi allows 8 MB after base64 + urlencoding
SHOWAPI_MAX_PAYLOAD = 1_500_000


def image_limits(settings: Settings) -> ImageLimits:
    payload = ImageLimits().max_payload_bytes
    if settings.max_payload_bytes:
        payload = settings.max_payload_bytes
    elif "showapi" in settings.chain:  # one image, prepared once, fits every provider it may meet
        payload = SHOWAPI_MAX_PAYLOAD
    return ImageLimits(
        max_payload_bytes=payload,
        max_decode_bytes=settings.max_decode_bytes,
        max_pixels=settings.max_pixels,
    )


def apply_decode_memory(settings: Settings) -> None:
    """The process-wide decode budget (:data:`pipeline.domain.images.DECODE_BUDGET`): what the
    images this worker's threads decode at once may take together (IDOCR_DECODE_MEMORY)."""
    DECODE_BUDGET.set_total(settings.decode_memory or 2 * settings.max_decode_bytes)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def build_processor(
    settings: Settings,
    queue: WorkQueue | None = None,
    on_pause: Callable[[str, str], None] | None = None,
) -> Processor:
    """The processor of the first provider of the chain, linked to one for each next provider
    (``fallback``); they share the claim heartbeat, the journal and the readers. ``queue``:
    where an item goes back when a pause ended while it was being parked. ``on_pause`` (stop
    consuming the queue) is called only when the last provider of the chain pauses."""
    r = redis_client(settings)
    wid = worker_id()
    apply_decode_memory(settings)
    heartbeat = Heartbeat(settings.resolved_database_url, wid, settings.heartbeat_interval)
    journal = answer_journal(settings)
    chain = settings.chain
    processors: list[Processor] = []
    for position, name in enumerate(chain):
        provider = build_provider(settings, name)
        # The local engine has no rate limit to keep and no paid quota to count.
        local = name == "local"
        limiter = None if local else provider_limiter(settings, provider)
        ledger = (
            None
            if local
            else QuotaLedger(
                r, provider.name, provider.account, low_watermark=settings.quota_low_watermark
            )
        )
        marks = SentMarks(r)
        processors.append(
            Processor(
                database_url=settings.resolved_database_url,
                provider=provider,
                limits=image_limits(settings),
                retry=RetryPolicy(
                    settings.max_attempts, settings.retry_initial, settings.retry_max
                ),
                worker_id=wid,
                limiter=limiter,
                quota=ledger,
                quota_exhausted=QuotaExhausted,
                on_pause=on_pause if position == len(chain) - 1 else None,
                reader=functools.partial(read_uri, endpoint_url=settings.s3_endpoint_url),
                head_reader=functools.partial(head_uri, endpoint_url=settings.s3_endpoint_url),
                url_for=functools.partial(
                    presign_uri,
                    expires=settings.presign_expires,
                    endpoint_url=settings.s3_endpoint_url,
                ),
                first_claim=ContentClaims(r).first,
                claim_lease=timedelta(seconds=settings.claim_lease),
                enqueue=queue.enqueue if queue is not None else None,
                journal=journal,
                sent_marks=marks,
                admission=None
                if limiter is None or ledger is None
                else Admission(ledger, limiter, marks),
                heartbeat=heartbeat,
                infra_patience=settings.infra_retry_for,
                resend_unknown=settings.resend_unknown,
                pause_signal=PauseSignal(r, provider.name, provider.account),
                outbox=Outbox.from_settings(settings),
            )
        )
    for earlier, later in zip(processors, processors[1:], strict=False):
        earlier.fallback = later
    for p in processors[1:]:
        p.primary = processors[0]
    return processors[0]


def answer_journal(settings: Settings) -> AnswerJournal:
    return AnswerJournal(
        redis_client(settings), settings.data_dir.resolve() / "journal", worker_id()
    )


def retention_copies(settings: Settings) -> RedisCopies:
    """What a purge removes in Redis: journal entries, result keys, content claims, the
    results stream."""
    r = redis_client(settings)
    return RedisCopies(r, answer_journal(settings), settings.results_stream, ContentClaims(r))


def build_reconciler(settings: Settings, queue: WorkQueue) -> Reconciler:
    provider, account = provider_identity(settings)
    return Reconciler(
        database_url=settings.resolved_database_url,
        redis_client=redis_client(settings),
        queue=settings.queue,
        enqueue=queue.enqueue,
        queue_depth=queue.depth,
        claim_lease=settings.claim_lease,
        interval=settings.reconcile_interval,
        provider=provider,
        account=account,
        journal=answer_journal(settings),
        outbox=Outbox.from_settings(settings),
    )
