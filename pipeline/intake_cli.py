"""``idocr submit``: one request through the intake code path, and its answer printed masked."""

from __future__ import annotations

import json
import os
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console

from pipeline.client import Client
from pipeline.config import Settings
from pipeline.coordination.redisconn import redis_url
from pipeline.domain.intake import IntakeRequest, describe_errors
from pipeline.domain.masking import _mask_value, redact_text
from pipeline.queue import load_queue
from pipeline.storage.db import ensure_schema
from pipeline.workflows.intake import REJECTED, Intake

EXIT_OK, EXIT_ERROR, EXIT_INCOMPLETE = 0, 1, 3

err = Console(stderr=True, soft_wrap=True)

#: the parts of an event shown one per line (the rest with --json)
_SHOWN = ("kind", "status", "reason", "detail", "code", "item_id", "batch")


def masked(event: Any) -> Any:
    """The event with personal data masked as the rest of the command line masks it."""
    return _mask_value(None, event)


def _lines(event: dict[str, Any]) -> list[str]:
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    out = []
    for name in _SHOWN:
        value = event.get(name, data.get(name) if data else None)
        if value is not None:
            out.append(f"{name}: {value}")
    # the recognised fields (an item.finished event's "fields"), once
    fields: dict[str, Any] = next(
        (
            holder[section]
            for holder in (event, data or {})
            for section in ("fields", "result", "record")
            if isinstance(holder.get(section), dict)
        ),
        {},
    )
    for k, v in fields.items():
        if v in (None, "", {}, []):
            continue
        text = json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v
        out.append(f"{k}: {text}")
    return out


def submit_command(
    settings: Settings,
    image: str,
    key: str,
    side: str | None,
    batch_id: str | None,
    metadata: str | None,
    wait: float | None,
    as_json: bool,
) -> int:
    meta = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except ValueError:
            raise click.UsageError("--metadata must be a JSON object") from None
        if not isinstance(meta, dict):
            raise click.UsageError("--metadata must be a JSON object")
    if "://" not in image:
        image = os.path.abspath(image)  # a path as typed, relative to where the command runs
    try:
        request = IntakeRequest(
            image=image,
            key=key,
            side=side,  # type: ignore[arg-type]
            batch=batch_id,
            metadata=meta,
        )
    except ValidationError as exc:
        raise click.UsageError(describe_errors(exc)) from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_schema(settings.resolved_database_url)
    intake = Intake.from_settings(settings, load_queue(settings).enqueue)
    outcome = intake.submit(request, "cli")
    if outcome.status == REJECTED:
        err.print(f"[red]refused: {redact_text(outcome.reason or '')}")
        return EXIT_ERROR
    again = " (the key was submitted before: nothing new was made)" if outcome.repeat else ""
    err.print(f"accepted as item {outcome.item_id}{again}")
    if wait is None:
        click.echo(key)
        return EXIT_OK
    with Client(
        redis_url(settings),
        stream=settings.intake_stream,
        results_stream=settings.results_stream,
    ) as client:
        event = client.result(key, timeout=wait)
    if event is None:
        err.print(f"[yellow]no result within {wait:g} s; read it later with --wait")
        return EXIT_INCOMPLETE
    shown = masked(event)
    if as_json:
        click.echo(json.dumps(shown, ensure_ascii=False))
    else:
        for line in _lines(shown):
            click.echo(line)
    return EXIT_OK
