"""``idocr``: the command line.

Exit codes: 0 every item reached a final state (succeeded, failed, rejected, duplicate);
1 a configuration or source error; 2 wrong usage; 3 stopped before every item was final
(paused for the account or the clock, interrupted, or --timeout).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.config import (
    SANDBOX_ACCOUNT,
    SANDBOX_KEY,
    UNENCRYPTED_WARNING,
    ConfigError,
    Settings,
    get_settings,
    provider_identity,
    settings_error_message,
)
from pipeline.domain.masking import redact_text
from pipeline.events_cli import events as events_group
from pipeline.intake_cli import submit_command
from pipeline.locations import scheme_of
from pipeline.logs import configure_logging
from pipeline.metrics import build_registry, serve
from pipeline.outputs.events import Outbox
from pipeline.outputs.files import OutputError, open_output, write_batch_output
from pipeline.outputs.records import records, write_csv, write_jsonl
from pipeline.queue import load_queue
from pipeline.runtime import build_provider, build_reconciler
from pipeline.sources import open_source
from pipeline.sources.base import SourceError
from pipeline.storage import repo
from pipeline.storage.db import (
    current_revision,
    engine_for,
    ensure_schema,
    head_revision,
    unit_of_work,
)
from pipeline.storage.models import Batch
from pipeline.workflows import control, producer
from pipeline.workflows.local import local_services, local_workers, start_sandbox, worker_command
from pipeline.workflows.producer import new_batch_id
from pipeline.workflows.relay import RelayThread, build_relay
from pipeline.workflows.status import (
    RATE_WINDOW,
    NoSuchBatch,
    collect,
    format_duration,
    latest_batch_id,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3

# soft_wrap: a line is not broken at the terminal width (logs and pipes keep it whole)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
log = logging.getLogger("idocr")


def _setup_logging(verbose: int, log_format: str = "text") -> None:

    configure_logging(verbose, log_format)


def _settings() -> Settings:
    try:
        return get_settings()
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(f"configuration: {settings_error_message(exc)}") from None


def _schema(settings: Settings) -> None:

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_schema(settings.resolved_database_url)


def _warn_unencrypted(settings: Settings) -> None:
    """The embedded database may run without a key: say so where work starts."""
    if not settings.encrypts_data:
        err.print(f"[yellow]warning: {UNENCRYPTED_WARNING}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="IDOCR_LOG_FORMAT",
    help="json: one object per line, PII masked in every field.",
)
def cli(verbose: int, log_format: str) -> None:
    """Batch OCR of Chinese resident ID cards: folders and S3 buckets through Celery workers to
    an OCR provider, results in SQL.

    With no configuration everything is embedded: SQLite and Redis in ./.idocr/, and the local
    OCR engine. See README.md for the IDOCR_* settings.
    """
    # the worker processes `run` starts read the same variable
    os.environ["IDOCR_LOG_FORMAT"] = log_format
    _setup_logging(verbose, log_format)


# -- the local runtime of `idocr run` ----------------------------------------------------------


def _scheme_presign(location: str) -> str | None:

    try:
        return scheme_of(location).presign
    except ValueError:
        return None  # refused with its own message when the source is opened


def _prepare_scan(
    settings: Settings,
    location: str,
    batch_id: str | None,
    via: str | None = None,
):
    """The source (or a clear error), a migrated schema, and the batch id to use. Everything
    that can be refused is refused here, before anything is scanned or a batch created.
    ``via`` defaults to the running command's ``--via``; an existing batch keeps its own."""

    explicit = via is not None
    ctx = click.get_current_context(silent=True)
    if via is None and ctx is not None:
        via = ctx.params.get("via")
        explicit = ctx.get_parameter_source("via") not in (None, ParameterSource.DEFAULT)
    via = via or "bytes"
    batch_via = _batch_via(settings, batch_id) if batch_id else None
    if batch_via is not None and batch_via != via:
        if explicit:
            raise click.UsageError(
                f"batch {batch_id} was scanned with --via {batch_via}; go on with --via {batch_via}"
            )
        via = batch_via
    if via == "url" and _scheme_presign(location) is None:
        # the provider fetches the image itself: it needs a URL it can reach, and only an
        # object store can presign one
        raise click.UsageError(
            "--via url needs an s3://bucket/prefix source (the provider fetches a presigned "
            "URL); a folder is sent with --via bytes, the default"
            + (f" (batch {batch_id} was scanned with --via url)" if batch_via == "url" else "")
        )
    follow = ctx.params.get("follow_symlinks") if ctx is not None else None
    try:
        src = open_source(
            location,
            endpoint_url=settings.s3_endpoint_url,
            follow_symlinks=settings.follow_symlinks if follow is None else follow,
        )
    except (SourceError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _schema(settings)
    return src, batch_id or new_batch_id()


def _batch_via(settings: Settings, batch_id: str) -> str | None:
    """How an existing batch sends its images (None: no such batch yet)."""

    if current_revision(settings.resolved_database_url) != head_revision():
        return None  # a new (or not yet migrated) database: no batch to go on with
    with unit_of_work(settings.resolved_database_url, read_only=True) as s:
        batch = s.get(Batch, batch_id)
        return None if batch is None else batch.via


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=False,
    )


def print_summary(settings: Settings, batch_id: str) -> None:

    with unit_of_work(settings.resolved_database_url, read_only=True) as s:
        codes = repo.code_counts(s, batch_id)
    table = Table(title=f"batch {batch_id}")
    table.add_column("status")
    table.add_column("code / reason")
    table.add_column("items", justify="right")
    for (status, code), n in sorted(codes.items()):
        table.add_row(status, code or "", str(n))
    table.add_row("[bold]total", "", f"[bold]{sum(codes.values())}")
    err.print(table)


_via = click.option(
    "--via",
    type=click.Choice(["bytes", "url"]),
    default="bytes",
    show_default=True,
    help="bytes: the worker sends the image; "
    "url: the provider fetches a presigned URL (s3:// only).",
)
_follow_symlinks = click.option(
    "--follow-symlinks/--no-follow-symlinks",
    default=None,
    help="Take symbolic links whose target lies outside the folder "
    "(default IDOCR_FOLLOW_SYMLINKS, off: counted as symlink_outside_root and skipped).",
)
_retry_failed = click.option(
    "--retry-failed",
    is_flag=True,
    help="Also re-queue the batch's items whose retries ran out on transient errors.",
)
_retry_unknown = click.option(
    "--retry-unknown",
    is_flag=True,
    help="Also re-queue items whose worker died while the provider had them "
    "(they may have been billed).",
)


def _requeue_batch(
    settings: Settings,
    batch_id: str,
    report,
    retry_failed: bool,
    retry_unknown: bool,
) -> None:
    """After scanning into an existing batch: items an earlier run left waiting get a message
    again (a duplicate message is harmless: the claim is a compare-and-set), and on request
    failed ones are queued again."""

    enqueue_items = load_queue(settings).enqueue
    url = settings.resolved_database_url
    if report.already_present:
        stale = datetime.now(UTC) - timedelta(seconds=settings.claim_lease)
        n = producer.requeue(url, batch_id, enqueue_items, stale_before=stale)
        if n:
            err.print(f"{n} items an earlier run left waiting sent again")
    if retry_failed:
        err.print(
            f"{producer.retry_failed(url, batch_id, enqueue_items)} items that failed "
            "transiently re-queued"
        )
    if retry_unknown:
        n = producer.retry_failed(url, batch_id, enqueue_items, reasons=("unknown",))
        err.print(f"{n} items whose answer was lost re-queued")


def _scan_report(rep) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(rep.skipped.items()))
    not_taken = ", ".join(f"{n} {why}" for why, n in sorted(rep.skipped_files.items()))
    return (
        f"{rep.seen} files: {rep.queued} queued, {rep.rejected} rejected by the scan, "
        f"{rep.duplicates} not sent again ({skipped or 'none'}), "
        f"{rep.already_present} already in the batch; not taken: {not_taken or 'none'}"
    )


@cli.command()
@click.argument("source")
@click.option("--batch", "batch_id", help="Batch id; give an existing one to resume or extend it.")
@_via
@_retry_failed
@_retry_unknown
@click.option(
    "--output",
    "output",
    help="Also write one JSON per image and a manifest here (folder or s3://bucket/prefix).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Calls in flight (default IDOCR_CONCURRENCY).",
)
@click.option("--timeout", type=float, help="Stop waiting after this many seconds (exit 3).")
@_follow_symlinks
def run(
    source: str,
    batch_id: str | None,
    via: str,
    retry_failed: bool,
    retry_unknown: bool,
    output: str | None,
    concurrency: int | None,
    timeout: float | None,
    follow_symlinks: bool | None,
) -> None:
    """Scan SOURCE (a folder or s3://bucket/prefix), process it with local workers, and wait.

    On the embedded default this starts Redis itself (and the sandbox, when it is the provider).
    """

    settings = _settings()
    _warn_unencrypted(settings)
    src, batch_id = _prepare_scan(settings, source, batch_id)
    started = time.monotonic()
    with (
        local_services(settings) as settings,
        local_workers(settings, concurrency or settings.concurrency) as worker,
    ):
        queue = load_queue(settings)
        enqueue_items = queue.enqueue
        # the events outbox (docs/events.md): published from here too, drained before the end
        relay = RelayThread(build_relay(settings)).start() if settings.relay else None
        provider = build_provider(settings)
        url = settings.resolved_database_url
        reading = control.check_balance(settings, provider, queue.enqueue, queue.set_consuming)
        if reading.remaining is not None:
            log.info("%s balance: %s calls left", provider.name, reading.remaining)
        with _progress() as progress:
            task = progress.add_task("scanning", total=None, detail="")

            def on_chunk(rep: producer.ScanReport) -> None:
                progress.update(task, total=rep.seen, detail=f"{rep.seen} found")

            try:
                report = producer.scan(
                    src,
                    database_url=url,
                    batch_id=batch_id,
                    provider=provider.name,
                    enqueue=enqueue_items,
                    limits=None,
                    on_chunk=on_chunk,
                    via=via,
                    outbox=Outbox.from_settings(settings),
                )
            except (SourceError, ValueError) as exc:
                raise click.ClickException(str(exc)) from None
            _requeue_batch(settings, batch_id, report, retry_failed, retry_unknown)
            progress.update(task, description="processing")
            try:
                code = _wait(
                    settings, queue, provider, batch_id, worker, progress, task, started, timeout
                )
            except KeyboardInterrupt:
                err.print("[yellow]interrupted: the workers finish their current calls and stop")
                code = EXIT_INCOMPLETE
        provider.close()
        if relay is not None:
            relay.drain_and_stop()
    print_summary(settings, batch_id)
    err.print(
        f"batch [bold]{batch_id}[/]: {_scan_report(report)}; {time.monotonic() - started:.1f} s"
    )
    if output:
        _write_output(settings, batch_id, output)
    err.print(f"results: idocr export {batch_id} --format jsonl")
    if code:
        # the source is shown with ID numbers masked, like every other name
        again = shlex.quote(source) if redact_text(source) == source else "SOURCE"
        err.print(f"to go on later: idocr run {again} --batch {batch_id}")
    sys.exit(code)


def _wait(
    settings: Settings,
    queue,
    provider,
    batch_id: str,
    worker,
    progress,
    task,
    started: float,
    timeout: float | None,
) -> int:
    """Until every item of the batch is final (0), or there is a reason to stop (3)."""

    url = settings.resolved_database_url
    last_balance = 0.0
    # `run` is its own reconciler (no beat here): lost messages and dead workers' claims
    reconciler = build_reconciler(settings, queue)
    last_reconcile = time.monotonic()
    while True:
        with unit_of_work(url, read_only=True) as s:
            counts = repo.status_counts(s, batch_id)
            pending = repo.pending_count(s, batch_id)
            pause = repo.open_pause(s, provider.name, provider.account)
        total = sum(counts.values())
        progress.update(task, total=total, completed=total - pending, detail=_detail(counts, pause))
        if pending == 0:
            return EXIT_OK
        if pause is not None and pause.kind in ("auth", "clock") and len(settings.chain) == 1:
            err.print(f"[red]stopped: {pause.reason}")
            return EXIT_INCOMPLETE
        # while the quota is paused, `run` is its own balance monitor: it ends by itself
        # once the quota is topped up
        if (
            pause is not None
            and pause.kind == "quota"
            and time.monotonic() - last_balance > min(settings.balance_interval, 5.0)
        ):
            last_balance = time.monotonic()
            control.check_balance(settings, provider, queue.enqueue, queue.set_consuming)
        if time.monotonic() - last_reconcile >= settings.reconcile_interval:
            last_reconcile = time.monotonic()
            try:
                reconciler.run_once()
            except Exception as exc:  # the database or Redis away: the next pass tries again
                log.warning("reconciler pass failed (%s)", type(exc).__name__)
        if worker.poll() is not None:
            err.print(
                f"[red]the worker process exited ({worker.returncode}); "
                f"see {settings.data_dir / 'logs' / 'worker.log'}"
            )
            return EXIT_INCOMPLETE
        if timeout is not None and time.monotonic() - started > timeout:
            err.print(f"[yellow]--timeout: {pending} items not final yet")
            return EXIT_INCOMPLETE
        time.sleep(0.5)


def _detail(counts: dict[str, int], pause) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
    return f"{shown}  [yellow]paused: {pause.kind}[/]" if pause is not None else shown


@cli.command()
@click.argument("source")
@click.option(
    "--batch",
    "batch_id",
    help="Batch id (default: a new one); rescanning into it adds only what is new.",
)
@_via
@_retry_failed
@_retry_unknown
@_follow_symlinks
def scan(
    source: str,
    batch_id: str | None,
    via: str,
    retry_failed: bool,
    retry_unknown: bool,
    follow_symlinks: bool | None,
) -> None:
    """Scan SOURCE and enqueue its items for workers started elsewhere; prints the batch id."""

    settings = _settings()
    src, batch_id = _prepare_scan(settings, source, batch_id)
    url = settings.resolved_database_url
    try:
        rep = producer.scan(
            src,
            database_url=url,
            batch_id=batch_id,
            provider=settings.resolved_provider,
            enqueue=load_queue(settings).enqueue,
            via=via,
            outbox=Outbox.from_settings(settings),
        )
    except (SourceError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    err.print(_scan_report(rep))
    _requeue_batch(settings, batch_id, rep, retry_failed, retry_unknown)
    click.echo(batch_id)


@cli.command()
@click.argument("image")
@click.option("--key", required=True, help="Your idempotency key: the same key is done once.")
@click.option("--side", type=click.Choice(["front", "back"]), help="The card's side, if known.")
@click.option("--batch", "batch_id", help="Batch to add it to (default: intake-YYYYMMDD).")
@click.option("--metadata", help="A small JSON object, echoed back in the request's events.")
@click.option("--wait", type=float, help="Wait up to this many seconds for the result.")
@click.option("--json", "as_json", is_flag=True, help="Print the result event as JSON.")
def submit(
    image: str,
    key: str,
    side: str | None,
    batch_id: str | None,
    metadata: str | None,
    wait: float | None,
    as_json: bool,
) -> int:
    """Hand one IMAGE over as another system would (docs/intake.md): a path under
    IDOCR_INTAKE_ROOTS, s3://bucket/key or an https:// URL. Workers started elsewhere do the
    work; with --wait the result is printed (personal data masked)."""
    return submit_command(_settings(), image, key, side, batch_id, metadata, wait, as_json)


@cli.command()
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Calls in flight in this worker (default IDOCR_CONCURRENCY).",
)
@click.option(
    "-P",
    "--pool",
    type=click.Choice(["threads", "prefork"]),
    default="threads",
    show_default=True,
    help="Celery pool: threads suit the I/O-bound calls.",
)
@click.option("-n", "--name", default="idocr@%h", show_default=True, help="Worker node name.")
@click.option(
    "--beat/--no-beat", default=False, help="Also run the beat scheduler (balance checks)."
)
@click.option("-l", "--loglevel", default="INFO", show_default=True)
def worker(concurrency: int | None, pool: str, name: str, beat: bool, loglevel: str) -> None:
    """Run a Celery worker on the OCR queue (`celery -A workers.app worker`, idocr's defaults)."""
    settings = _settings()
    _warn_unencrypted(settings)
    _schema(settings)
    cmd = worker_command(settings, concurrency or settings.concurrency, name, beat)
    cmd += ["--pool", pool, "--loglevel", loglevel]
    os.execv(sys.executable, cmd)


@cli.command()
@click.argument("batch_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (times in UTC).")
@click.option(
    "--watch",
    "watch",
    type=float,
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="A live view, redrawn every SECONDS (2), until every item is final or Ctrl-C.",
)
def status(batch_id: str | None, as_json: bool, watch: float | None) -> None:
    """BATCH's items (default: the latest batch) by status and code, the rate achieved against
    the limit, an ETA, the pause state and the quota left; on stdout."""
    import json

    settings = _settings()
    _schema(settings)
    if watch is not None and watch <= 0:
        raise click.BadParameter("must be a positive number of seconds", param_hint="--watch")

    def snapshot():
        with unit_of_work(settings.resolved_database_url, read_only=True) as s:
            try:
                return collect(settings, s, batch_id)
            except NoSuchBatch:
                raise click.ClickException(f"no batch {batch_id!r}") from None

    if watch is None:
        st = snapshot()
        if as_json:
            click.echo(json.dumps(st.to_dict(), ensure_ascii=False))
        else:
            out.print(_status_view(st))
        return
    from contextlib import nullcontext

    from rich.live import Live

    # --json: one object per line per round (for a pipe); otherwise the view redrawn in place
    live = nullcontext() if as_json else Live(console=out, auto_refresh=False)
    try:
        with live:
            while True:
                st = snapshot()
                if as_json:
                    click.echo(json.dumps(st.to_dict(), ensure_ascii=False))
                else:
                    live.update(_status_view(st), refresh=True)  # type: ignore[union-attr]
                if st.batch is None or st.final:
                    return
                time.sleep(watch)
    except KeyboardInterrupt:
        return


def _status_view(st):
    """The human rendering of a BatchStatus: a few lines and the table by status and code."""
    from rich.console import Group
    from rich.text import Text

    lines = [Text(f"provider: {st.provider} (account {st.account})")]
    if st.pause is not None:
        lines.append(
            Text(
                f"paused ({st.pause['kind']}) since {st.pause['since']}: {st.pause['reason']}",
                style="yellow",
            )
        )
    else:
        lines.append(Text("submissions: running"))
    if st.balance is not None:
        lines.append(
            Text(
                f"last balance reading: {st.balance['remaining']} calls left "
                f"at {st.balance['taken_at']}"
            )
        )
    if st.quota is not None:
        lines.append(Text(f"quota left: {st.quota_left} calls ({st.quota['reserved']} in flight)"))
    if st.batch is None:
        lines.append(Text("no batches yet"))
        return Group(*lines)
    lines.append(
        Text(
            f"rate: {st.rate_achieved:.2f} calls/s of {st.rate_limit:g}/s allowed "
            f"(last {int(RATE_WINDOW)} s)"
        )
    )
    table = Table(title=f"batch {st.batch}")
    table.add_column("status")
    table.add_column("code / reason")
    table.add_column("items", justify="right")
    for status_, code, n in st.by_code:
        table.add_row(status_, code, str(n))
    table.add_row("[bold]total", "", f"[bold]{st.total}")
    lines.append(table)
    if st.purged:
        lines.append(Text(f"{st.purged} items purged (retention): personal data removed"))
    if st.pending:
        lines.append(
            Text(f"{st.pending} items not final yet; ETA {format_duration(st.eta_seconds)}")
        )
    else:
        lines.append(Text("every item is final"))
    return Group(*lines)


@cli.command()
@click.argument("batch_id", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="File to write (default: stdout).",
)
@click.option(
    "--to",
    "to",
    help="Instead: one JSON per image and a manifest, in a folder or s3://bucket/prefix.",
)
@click.option(
    "--excel",
    is_flag=True,
    help="CSV for Excel: UTF-8 BOM, ID numbers and other long digit strings kept as text.",
)
def export(
    batch_id: str | None, fmt: str, output: Path | None, to: str | None, excel: bool
) -> None:
    """Write BATCH's results (default: the latest batch) as JSONL or CSV. The export is the
    product: it carries the recognised fields unmasked; keep it where ID data may be kept."""
    from functools import partial

    if excel:
        ctx = click.get_current_context()
        if fmt != "csv" and ctx.get_parameter_source("fmt") != ParameterSource.DEFAULT:
            raise click.UsageError("--excel writes CSV: use it with --format csv")
        if to:
            raise click.UsageError("--excel applies to the CSV export, not to --to")
        fmt = "csv"
    settings = _settings()
    _schema(settings)
    with unit_of_work(settings.resolved_database_url, read_only=True) as s:
        batch_id = batch_id or latest_batch_id(s)
        if batch_id is None:
            raise click.ClickException("no batches yet")
        if s.get(Batch, batch_id) is None:
            raise click.ClickException(f"no batch {batch_id!r}")
    # Workers pair the two sides of a card as they finish; a worker that died in between left
    # a pair unchecked: the export checks every pair of the batch first.
    with unit_of_work(settings.resolved_database_url) as s:
        repo.pair_batch(s, batch_id)
    if to:
        _write_output(settings, batch_id, to)
        return
    with unit_of_work(settings.resolved_database_url, read_only=True) as s:
        writer = partial(write_csv, excel=excel) if fmt == "csv" else write_jsonl
        if output is None:
            n = writer(records(s, batch_id), sys.stdout)
        else:
            with output.open("w", encoding="utf-8", newline="") as fh:
                n = writer(records(s, batch_id), fh)
    err.print(f"{n} records of batch {batch_id}")


def _write_output(settings: Settings, batch_id: str, location: str) -> None:

    try:
        sink = open_output(location, endpoint_url=settings.s3_endpoint_url)
        try:
            with unit_of_work(settings.resolved_database_url) as s:
                rep = write_batch_output(s, batch_id, sink)
        finally:
            sink.close()
    except (OutputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    err.print(f"{rep.records} results and the manifest written to {rep.manifest}")


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    help="Purge items final for longer than this (30d, 12h, 2w). "
    "Default: IDOCR_RETENTION, or every final item of --batch.",
)
@click.option("--batch", "batch_id", help="Only this batch.")
@click.option("--dry-run", is_flag=True, help="Count what would be purged; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="The counts as one JSON object on stdout.")
def purge(older_than: str | None, batch_id: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove the personal data (recognised fields, raw answers, file names, request metadata,
    their copies in Redis) of final items; keep the audit record (status, codes, ocrid,
    attempts). Exit 1 when the copies in Redis could not be reached. See README "Retention"."""
    import json

    from pipeline.units import format_age, parse_age
    from pipeline.workflows.retention import purge as run_purge

    settings = _settings()
    age: timedelta | None
    if older_than is not None:
        try:
            age = parse_age(older_than)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--older-than") from None
    else:
        age = settings.retention_age if batch_id is None else None
    if age is None and batch_id is None:
        raise click.UsageError("give --older-than (e.g. 30d) or --batch, or set IDOCR_RETENTION")
    _schema(settings)
    if batch_id is not None:
        with unit_of_work(settings.resolved_database_url, read_only=True) as s:
            if s.get(Batch, batch_id) is None:
                raise click.ClickException(f"no batch {batch_id!r}")
    if dry_run:
        rep = run_purge(
            settings.resolved_database_url, older_than=age, batch_id=batch_id, dry_run=True
        )
    else:
        from pipeline.runtime import retention_copies

        # the copies in Redis too (the embedded one is started if need be)
        rep = run_purge(
            settings.resolved_database_url,
            older_than=age,
            batch_id=batch_id,
            chunk=settings.retention_chunk,
            copies=retention_copies(settings),
        )
    if as_json:
        click.echo(json.dumps(rep.to_dict()))
    scope = (f"batch {batch_id}" if batch_id else "all batches") + (
        f", final for more than {format_age(age)}" if age is not None else ""
    )
    if dry_run:
        err.print(f"would purge {rep.items} items ({rep.results} results) of {scope}")
        return
    err.print(
        f"purged {rep.items} items of {scope}: {rep.results} results, {rep.requests} requests, "
        f"{rep.journal} answer journal entries, {rep.result_keys} result keys, {rep.stream} "
        f"results stream entries; {rep.transactions} transactions, {rep.seconds:.1f} s"
    )
    for problem in rep.errors:
        err.print(f"[yellow]not done: {problem}")
    if rep.errors:
        sys.exit(EXIT_ERROR)


@cli.command()
def balance() -> None:
    """Query the provider's remaining quota (ihuyi GetNum), record it, pause or resume on it."""

    settings = _settings()
    _schema(settings)
    with local_services(settings) as settings:
        provider = build_provider(settings)
        queue = load_queue(settings)
        rep = control.check_balance(settings, provider, queue.enqueue, queue.set_consuming)
        provider.close()
    if rep.action == "error" or (rep.remaining is None and rep.action == "paused"):
        raise click.ClickException(f"balance query failed: {rep.detail}")
    if rep.remaining is None:
        err.print(rep.detail)
        return
    click.echo(rep.remaining)
    err.print(
        f"{rep.remaining} calls left ({rep.reserved} in flight)"
        + (f"; {rep.action}" if rep.action != "none" else "")
    )


@cli.command()
@click.option("--reason", default="paused by the operator", show_default=True)
def pause(reason: str) -> None:
    """Pause submissions to the configured provider account (nothing is failed)."""

    settings = _settings()
    _schema(settings)
    provider, account = provider_identity(settings)
    control.pause(
        settings,
        provider,
        account,
        "operator",
        reason,
        broadcast=load_queue(settings).set_consuming,
    )
    err.print(f"paused {provider} ({account})")


@cli.command()
def resume() -> None:
    """Resume submissions and re-enqueue the items the pause held back."""

    settings = _settings()
    _schema(settings)
    provider, account = provider_identity(settings)
    queue = load_queue(settings)
    n = control.resume(
        settings,
        provider,
        account,
        by="operator",
        enqueue=queue.enqueue,
        broadcast=queue.set_consuming,
    )
    err.print(f"resumed {provider} ({account}); {n} items re-enqueued")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option(
    "--truth",
    "truth",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Ground-truth file(s) (default: the examples').",
)
@click.option("--quota", type=int, help="Calls the account may make (default IDOCR_SANDBOX_QUOTA).")
@click.option("--latency", type=float, help="Seconds before each answer.")
@click.option("--faults", help='Fault injection, e.g. "http_500=0.05,garbage=0.02,code:4010=0.1".')
def sandbox(
    host: str,
    port: int,
    truth: tuple[str, ...],
    quota: int | None,
    latency: float | None,
    faults: str | None,
) -> None:
    """Run the local emulator of the providers' APIs (ihuyi and showapi protocols)."""

    settings = _settings()
    update: dict[str, object] = {}
    if truth:
        update["sandbox_truth"] = [Path(t) for t in truth]
    if quota is not None:
        update["sandbox_quota"] = quota
    if latency is not None:
        update["sandbox_latency"] = latency
    if faults is not None:
        update["sandbox_faults"] = faults
    settings = settings.model_copy(update=update)
    # One process answers every connection: a short GIL switch interval lets a thread woken by a
    # new request note its arrival time at once, not after another thread's 5 ms slice.
    sys.setswitchinterval(0.0005)
    server = start_sandbox(settings, host=host, port=port)
    err.print(
        f"sandbox listening on {server.url}  "
        f"(ihuyi account {SANDBOX_ACCOUNT!r}, key {SANDBOX_KEY!r})"
    )
    err.print(f"use it: IDOCR_PROVIDER=sandbox IDOCR_SANDBOX_URL={server.url}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


@cli.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""

    settings = _settings()
    url = settings.resolved_database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    before = current_revision(url)
    _schema(settings)
    head = head_revision()
    if before is None:
        err.print(f"schema created (revision {head})")
    elif before != head:
        err.print(f"schema upgraded from revision {before} to {head}")
    else:
        err.print(f"schema is up to date (revision {head})")


@cli.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=9100, show_default=True, type=click.IntRange(1, 65535))
def metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics on http://HOST:PORT/metrics: the workers' counters on this host
    (PROMETHEUS_MULTIPROC_DIR) and the state of the work (items by status, queue depth, quota,
    pause), computed from SQL and Redis at each scrape."""

    settings = _settings()
    _schema(settings)
    try:
        server = serve(port, host, build_registry(settings, state=True))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    err.print(f"metrics on http://{host}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


@cli.command()
def health() -> None:
    """Exit 0 if the database answers with the current schema and Redis (when configured)
    answers; otherwise 1 with what is wrong. For container health checks."""
    import redis
    from sqlalchemy import text

    settings = _settings()
    url = settings.resolved_database_url
    with engine_for(url).connect() as conn:
        conn.execute(text("SELECT 1"))
    if current_revision(url) != head_revision():
        raise click.ClickException("the database schema is not up to date: run idocr migrate")
    if settings.redis_url:
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=5
        )
        try:
            client.ping()
        finally:
            client.close()
    click.echo("ok")


# -- data protection (README "Data protection") -------------------------------------------------


@cli.group()
def keys() -> None:
    """The keys personal data is encrypted with at rest (IDOCR_DATA_KEYS)."""


@keys.command("new")
def keys_new() -> None:
    """Print a fresh key entry for IDOCR_DATA_KEYS (nothing is stored)."""
    from pipeline.storage.crypto import new_key_entry

    entry = new_key_entry()
    click.echo(entry)
    err.print(
        "first key: IDOCR_DATA_KEYS=<this entry>; a new key for a rotation goes first, the old "
        'ones stay after it: IDOCR_DATA_KEYS="<this entry>,$IDOCR_DATA_KEYS", restart the '
        "workers, then `idocr keys rotate`"
    )


@keys.command("rotate")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Rows re-encrypted per transaction.",
)
def keys_rotate(batch_size: int) -> None:
    """Re-encrypt every stored value not under the first key of IDOCR_DATA_KEYS (and the ID
    numbers' blind index). Safe while workers run; stop and run it again at will."""
    from pipeline.storage.crypto import CryptoError, active_ring
    from pipeline.workflows.keys import RotationReport, rotate

    settings = _settings()
    if not settings.encrypts_data:
        raise click.ClickException(
            "IDOCR_DATA_KEYS is not set: there is no key to encrypt with (`idocr keys new`)"
        )
    _schema(settings)
    ring = active_ring()
    err.print(f"re-encrypting under key {ring.current_kid} (keys in the ring: {len(ring.kids)})")
    shown = [time.monotonic()]

    def progress(r: RotationReport) -> None:
        if time.monotonic() - shown[0] >= 5:
            shown[0] = time.monotonic()
            err.print(f"{r.total} value(s) re-encrypted so far (pass {r.passes})")

    try:
        rep = rotate(settings.resolved_database_url, batch_size=batch_size, on_batch=progress)
    except CryptoError as exc:  # names the key id and the column, never data
        raise click.ClickException(str(exc)) from None
    for label, n in sorted(rep.resealed.items()):
        click.echo(f"{label}\t{n} re-encrypted")
    for label, n in sorted(rep.skipped.items()):
        click.echo(f"{label}\t{n} left as they were (unreadable, or the name is taken)")
    click.echo(f"total\t{rep.total} re-encrypted in {rep.passes} pass(es)")
    if rep.remaining or rep.skipped:
        err.print(
            f"[yellow]{rep.remaining} value(s) still under an older key: workers still running "
            "with the old IDOCR_DATA_KEYS? Restart them with the new one and run this again"
            if rep.remaining
            else "[yellow]some values were left as they were (above)"
        )
        sys.exit(EXIT_INCOMPLETE)
    err.print(f"every value is under key {rep.kid}: older keys may be removed from the ring")


@cli.command()
@click.option("--id-number", "id_number", required=True, help="The ID number to look for.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per match on stdout.")
def find(id_number: str, as_json: bool) -> None:
    """Find the recognised cards with an ID number (by its blind index: nothing is decrypted to
    search). Personal fields are shown masked; `idocr export` writes them in full."""
    import json

    from pipeline.domain.masking import mask_fields, mask_file_name
    from pipeline.storage.crypto import CryptoError
    from pipeline.workflows.keys import find_by_id_number

    settings = _settings()
    _schema(settings)
    with unit_of_work(settings.resolved_database_url, read_only=True) as s:
        try:
            found = find_by_id_number(s, id_number)
        except CryptoError as exc:
            raise click.ClickException(str(exc)) from None
        rows = []
        for f in found:
            fields = mask_fields(
                {k: getattr(f.result, k) for k in ("name", "id_number", "date_of_birth")}
            )
            for it in [f.item, *f.duplicates]:
                rows.append(
                    {
                        "item": it.id,
                        "batch": it.batch_id,
                        "source": mask_file_name(it.source_key),
                        "status": it.status,
                        "side": f.result.side,
                        "duplicate_of": f.item.id if it is not f.item else None,
                        **fields,
                    }
                )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
    else:
        # one line per item, tab-separated: never wrapped or cut at the terminal's width
        columns = ("item", "batch", "status", "side", "name", "id_number", "source")
        if rows:
            click.echo("\t".join(columns))
        for row in rows:
            click.echo("\t".join(str(row[k] if row[k] is not None else "") for k in columns))
        err.print(f"{len(rows)} item(s) found; `idocr export BATCH` writes their fields in full")
    if not rows:
        sys.exit(EXIT_ERROR)


def _one_line(exc: BaseException) -> str:
    """The first line of an error from a library, ID numbers masked."""

    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return redact_text(text[0] if text else type(exc).__name__)


cli.add_command(events_group, "events")


def main() -> None:
    """The entry point: every error a user can cause ends as one line on stderr and its exit
    code, never a traceback; ID numbers in a message (a path can hold one) are masked."""
    import redis
    from botocore.exceptions import BotoCoreError, ClientError
    from sqlalchemy.exc import OperationalError

    from pipeline.storage.crypto import CryptoError

    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.message = redact_text(exc.message)  # type: ignore[misc]  # click's stubs: Final
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(EXIT_INCOMPLETE)
    except (ConfigError, ValueError) as exc:
        if not isinstance(exc, ConfigError) and type(exc).__name__ != "ValidationError":
            raise
        err.print(f"[red]configuration: {redact_text(settings_error_message(exc))}")
        sys.exit(EXIT_ERROR)
    except OperationalError as exc:  # cannot connect, refused login, unwritable file
        err.print(f"[red]database (IDOCR_DATABASE_URL): {_one_line(exc)}")
        sys.exit(EXIT_ERROR)
    except redis.exceptions.ConnectionError as exc:
        err.print(f"[red]Redis (IDOCR_REDIS_URL) unreachable: {_one_line(exc)}")
        sys.exit(EXIT_ERROR)
    except CryptoError as exc:  # names the key id and the column, never data or key material
        err.print(f"[red]data keys (IDOCR_DATA_KEYS): {exc}")
        sys.exit(EXIT_ERROR)
    except (BotoCoreError, ClientError) as exc:  # no credentials, endpoint down, access denied
        err.print(f"[red]S3 (IDOCR_S3_ENDPOINT_URL, AWS credentials): {_one_line(exc)}")
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
