"""The worker's sign that its queue ran dry (``workers.tasks._spare``): a thread of its pool has
been without a task for a while, not for the moment between two messages. Only then does a slow
message give its unsent items to the idle threads (test_task_items)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import idocr_env

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import time
from workers import tasks
assert not tasks._spare()  # no task yet: nothing to give
tasks._count_running(1)  # one of the two threads busy, the other without a task...
assert not tasks._spare()  # ...but only for a moment
time.sleep(tasks._IDLE_FOR * 1.5)
assert tasks._spare()
tasks._count_running(1)  # both busy
assert not tasks._spare()
tasks._count_running(-1)  # one done: the next message is usually there at once
assert not tasks._spare()
tasks._count_running(1)
tasks._count_running(-1)
time.sleep(tasks._IDLE_FOR * 1.5)
assert tasks._spare()
print("ok")
"""


def test_a_thread_idle_for_a_while_means_the_queue_ran_dry(tmp_path: Path) -> None:
    env = idocr_env(IDOCR_CONCURRENCY="2", IDOCR_DATA_DIR=str(tmp_path / "data"))
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-c", CODE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
