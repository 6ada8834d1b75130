"""The work queue on Celery and Redis (:class:`pipeline.queue.WorkQueue`).

A backfill enqueues millions of messages, and Celery's ``send_task`` costs ~150 µs of Python
per message even pipelined (6,600 messages/s measured), more than listing and inserting the
item together. So on a Redis broker, messages are stamped from a template instead (52,600/s):
one message is produced by Celery and kombu themselves (to a probe queue of its own, read back
at once), and each message is that envelope with its own task id, argument and delivery tag,
pushed 1000 at a time through a Redis pipeline into the list the probe showed kombu uses for a
queue. The wire format is therefore whatever the installed Celery/kombu produce. Any other
broker, or a template that does not look as expected, takes the ordinary path (``send_task``).

A message carries up to ``IDOCR_TASK_ITEMS`` ids (a list; one id alone as itself): the worker
claims them in one statement, and Celery's own cost is paid once for them all.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import redis

from pipeline.config import Settings
from pipeline.coordination.redisconn import redis_client, redis_url
from pipeline.workflows.reconcile import ensure_epoch

log = logging.getLogger(__name__)

SUBMIT_TASK = "idocr.ocr.submit"
#: messages per Redis round trip (each of up to IDOCR_TASK_ITEMS items)
PUBLISH_BATCH = 1000

_template_lock = threading.Lock()
_templates: dict[str, dict[str, Any] | None] = {}


class CeleryQueue:
    """The OCR queue of ``settings`` on the Celery app of ``workers.app``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.queue
        self._epoch_ensured = False

    def enqueue(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        from workers.app import app

        if not self._epoch_ensured:
            # before the first message: the reconciler tells a broker that lost its messages
            # by this token being gone
            ensure_epoch(redis_client(self.settings), self.name)
            self._epoch_ensured = True
        n = self.settings.task_items
        messages = [ids[i : i + n] for i in range(0, len(ids), n)]
        template = _template(app, self.name)
        if template is not None:
            _stamp_and_push(redis_url(self.settings), self.name, template, messages)
        else:
            _send_each(app, self.name, messages)

    def set_consuming(self, consuming: bool) -> None:
        from workers.app import app

        if consuming:
            app.control.add_consumer(self.name, reply=False)
        else:
            app.control.cancel_consumer(self.name, reply=False)

    def depth(self) -> int:
        return int(redis_client(self.settings).llen(self.name))


def _argument(ids: Sequence[int]) -> int | list[int]:
    """The task's argument: an item id, or the ids of several items."""
    return int(ids[0]) if len(ids) == 1 else [int(i) for i in ids]


def _send_each(app: Any, queue: str, messages: Sequence[Sequence[int]]) -> None:
    with app.producer_or_acquire() as producer:
        batch = getattr(producer, "batch", None)  # kombu ≥ 5.7 pipelines Redis publishes
        with batch(max_size=PUBLISH_BATCH) if batch is not None else nullcontext():
            for ids in messages:
                app.send_task(SUBMIT_TASK, args=[_argument(ids)], queue=queue, producer=producer)


def _template(app: Any, queue: str) -> dict[str, Any] | None:
    with _template_lock:
        if queue not in _templates:
            try:
                _templates[queue] = _probe_template(app, queue)
            except Exception:  # the ordinary path always works
                log.info(
                    "message template unavailable; enqueueing through send_task", exc_info=True
                )
                _templates[queue] = None
        return _templates[queue]


def _probe_template(app: Any, queue: str) -> dict[str, Any] | None:
    from kombu import Queue

    if not app.conf.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        return None
    probe = f"{queue}.probe.{uuid.uuid4().hex}"
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        try:
            app.send_task(
                SUBMIT_TASK, args=[0], queue=Queue(probe, routing_key=probe), connection=conn
            )
            client = channel.client
            raw = client.rpop(probe)
        finally:
            channel.client.delete(probe, f"_kombu.binding.{probe}")
        if raw is None:
            return None
    msg = json.loads(raw)
    headers, props = msg["headers"], msg["properties"]
    body = json.loads(base64.b64decode(msg["body"]))
    # only a message shaped as expected (protocol 2, base64 JSON body) is used as a template
    if (
        headers.get("task") != SUBMIT_TASK
        or props.get("body_encoding") != "base64"
        or msg.get("content-type") != "application/json"
        or props.get("delivery_info", {}).get("routing_key") != probe
        or not (isinstance(body, list) and body[0] == [0])
        or headers.get("id") != props.get("correlation_id")
    ):
        return None
    props["delivery_info"]["routing_key"] = queue
    msg["_body_rest"] = body[1:]
    return msg


_TID, _TAG, _BODY, _ARGS = "@@idocr-task-id@@", "@@idocr-tag@@", "@@idocr-body@@", "@@idocr-args@@"


def _stamp_and_push(
    url: str, queue: str, template: dict[str, Any], messages: Sequence[Sequence[int]]
) -> None:
    # The envelope serialised once, with markers where each message differs.
    msg = {k: v for k, v in template.items() if k != "_body_rest"}
    msg = json.loads(json.dumps(msg))
    msg["body"] = _BODY
    msg["headers"]["id"] = msg["headers"]["root_id"] = _TID
    msg["headers"]["argsrepr"] = _ARGS
    msg["properties"]["correlation_id"] = _TID
    msg["properties"]["delivery_tag"] = _TAG
    envelope = json.dumps(msg)
    body_tail = json.dumps(template["_body_rest"])[1:]  # the body after the args: ", {}, {...}]"

    client = redis.Redis.from_url(url)
    try:
        for start in range(0, len(messages), PUBLISH_BATCH):
            pipe = client.pipeline(transaction=False)
            for ids in messages[start : start + PUBLISH_BATCH]:
                arg = json.dumps(_argument(ids))
                tid = str(uuid.uuid4())
                body = base64.b64encode(f"[[{arg}], {body_tail}".encode()).decode()
                pipe.lpush(
                    queue,
                    envelope.replace(_TID, tid)
                    .replace(_TAG, str(uuid.uuid4()))
                    .replace(_BODY, body)
                    .replace(_ARGS, f"({arg},)"),
                )
            pipe.execute()
    finally:
        client.close()
