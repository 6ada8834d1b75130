"""The work queue, as the library sees it: an interface it is handed, never a Celery import.

The library decides *what* to send (item ids, after the rows they name are committed) and
*when* workers should stop taking work (a pause); how a message travels is the queue's business.
``workers.queue.CeleryQueue`` implements it on Celery and Redis; the command line finds it by
the name in ``IDOCR_QUEUE_BACKEND`` (``module:factory``, as ``celery -A`` names an app), so the
import graph runs one way: ``workers`` → ``pipeline``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pipeline.config import Settings


class WorkQueue(Protocol):
    def enqueue(self, ids: Sequence[int]) -> None:
        """Send the items for processing (a message carries one or several ids, as the queue
        packs them); called after the rows they name are committed."""
        ...

    def set_consuming(self, consuming: bool) -> None:
        """Ask every worker to stop (False) or start again (True) taking work from the queue.
        Best effort: every task checks the pause itself before it spends anything."""
        ...

    def depth(self) -> int:
        """Messages waiting in the queue (not those a worker already holds)."""
        ...


def load_queue(settings: Settings) -> WorkQueue:
    """The queue named by ``settings.queue_backend``, built for ``settings``."""
    module, _, name = settings.queue_backend.partition(":")
    factory = getattr(importlib.import_module(module), name)
    queue: WorkQueue = factory(settings)
    return queue
