"""``idocr events``: the outbox listed, and events published again (docs/events.md)."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, Settings, get_settings, settings_error_message
from pipeline.outputs.events import KINDS
from pipeline.outputs.records import utc_iso
from pipeline.storage.db import ensure_schema, unit_of_work
from pipeline.workflows.relay import STATES, build_relay, list_events, replay, webhook_of

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _settings() -> Settings:
    try:
        settings = get_settings()
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(f"configuration: {settings_error_message(exc)}") from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_schema(settings.resolved_database_url)
    return settings


def _row(ev: Any) -> dict[str, Any]:
    """What the outbox holds of one event (ids, status and codes: no personal data)."""
    return {
        "event_id": ev.event_id,
        "kind": ev.kind,
        "batch": ev.batch_id,
        "item_id": ev.item_id,
        "request_id": ev.request_id,
        "data": ev.data,
        "created_at": utc_iso(ev.created_at),
        "published_at": utc_iso(ev.published_at),
        "delivery_state": ev.delivery_state,
        "delivery_attempts": ev.delivery_attempts,
        "next_delivery_at": utc_iso(ev.next_delivery_at),
        "delivered_at": utc_iso(ev.delivered_at),
        "last_error": ev.last_error,
    }


@click.group(invoke_without_command=True)
@click.option("--kind", type=click.Choice(KINDS), help="Only events of this kind.")
@click.option("--batch", "batch_id", help="Only events of this batch.")
@click.option(
    "--state",
    type=click.Choice(STATES),
    help="unpublished: not yet on the results stream; pending, dead, delivered: webhook.",
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def events(
    ctx: click.Context,
    kind: str | None,
    batch_id: str | None,
    state: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List the events outbox, newest first (`idocr events replay` publishes again)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings()
    with unit_of_work(settings.resolved_database_url, read_only=True) as s:
        rows = [
            _row(e) for e in list_events(s, kind=kind, batch=batch_id, state=state, limit=limit)
        ]
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, ensure_ascii=False))
        return
    if not rows:
        err.print("no events")
        return
    table = Table(box=None)
    for col in ("event", "kind", "batch", "item", "status", "published", "webhook", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        data = r["data"] or {}
        webhook = r["delivery_state"]
        if r["delivery_attempts"]:
            webhook += f" ({r['delivery_attempts']})"
        table.add_row(
            r["event_id"],
            r["kind"],
            r["batch"] or "",
            str(r["item_id"] or ""),
            str(data.get("status") or data.get("kind") or ""),
            "yes" if r["published_at"] else "no",
            webhook,
            r["last_error"] or "",
        )
    out.print(table)


@events.command("replay")
@click.option("--event-id", "event_ids", multiple=True, help="This event (repeatable).")
@click.option("--batch", "batch_id", help="Every event of this batch.")
@click.option("--dead", is_flag=True, help="Every event whose webhook delivery is dead.")
@click.option(
    "--publish/--no-publish",
    default=True,
    show_default=True,
    help="Publish them from this process now (else the workers' relays do).",
)
def replay_command(
    event_ids: tuple[str, ...], batch_id: str | None, dead: bool, publish: bool
) -> None:
    """Publish chosen events again under the same ids (results stream, result keys) and, with a
    webhook configured, deliver them again (a dead delivery gets a fresh round of retries)."""
    if not (event_ids or batch_id or dead):
        raise click.UsageError("choose events: --event-id, --batch or --dead")
    settings = _settings()
    with unit_of_work(settings.resolved_database_url) as s:
        n = replay(
            s,
            event_ids=event_ids,
            batch=batch_id,
            dead=dead,
            webhook=webhook_of(settings) is not None,
        )
    click.echo(n)
    if not publish or not n:
        err.print(f"{n} events queued for publishing again (the workers' relays send them)")
        return
    relay = build_relay(settings)
    try:
        rep = relay.run_once()
    finally:
        relay.close()
    err.print(
        f"{n} events queued again: {rep.published} published to {settings.results_stream}"
        + (f", {rep.delivered} delivered, {rep.failed} to retry" if relay.webhook else "")
    )
