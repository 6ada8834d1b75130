"""What `idocr run` starts on this machine: the embedded services (Redis, and the sandbox when it
is the provider) and a local worker process, with the settings handed to it explicitly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import SANDBOX_ACCOUNT, SANDBOX_KEY, Settings
from pipeline.coordination.redisconn import redis_url

#: the shipped examples' ground truth, used by the sandbox when no truth file is configured
EXAMPLES_TRUTH = Path(__file__).resolve().parent.parent.parent / "examples" / "truth.json"


def sandbox_truth_paths(settings: Settings) -> list[Path]:
    if settings.sandbox_truth:
        return list(settings.sandbox_truth)
    return [EXAMPLES_TRUTH] if EXAMPLES_TRUTH.is_file() else []


def start_sandbox(settings: Settings, host: str = "127.0.0.1", port: int = 0) -> Any:
    """A sandbox server in a thread of this process."""
    from idocr_sandbox.server import FaultPlan, SandboxConfig, SandboxServer
    from idocr_sandbox.truth import TruthIndex

    truth = TruthIndex.load(*sandbox_truth_paths(settings))
    config = SandboxConfig(
        ihuyi_account=SANDBOX_ACCOUNT,
        ihuyi_api_key=SANDBOX_KEY,
        quota=settings.sandbox_quota,
        latency=settings.sandbox_latency,
        faults=FaultPlan.parse(settings.sandbox_faults) if settings.sandbox_faults else FaultPlan(),
    )
    server = SandboxServer(truth, config, host=host, port=port)
    server.start()
    return server


@contextmanager
def local_services(settings: Settings) -> Iterator[Settings]:
    """Embedded Redis and sandbox as needed; yields settings that name them (and hand them to
    child processes through :func:`child_env`). This process's environment is left alone."""
    update: dict[str, object] = {
        "data_dir": settings.data_dir.resolve(),
        "database_url": settings.resolved_database_url,
        "redis_url": redis_url(settings),  # starts the embedded Redis if there is none
    }
    sandbox = None
    if settings.resolved_provider == "sandbox" and not settings.sandbox_url:
        sandbox = start_sandbox(settings)
        update["sandbox_url"] = sandbox.url
    try:
        yield settings.model_copy(update=update)
    finally:
        if sandbox is not None:
            sandbox.stop()


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of a child process (a local worker) that must use the same services:
    this process's environment plus what :func:`local_services` started, passed explicitly."""
    env = dict(os.environ)
    env.update(
        {
            "IDOCR_DATA_DIR": str(settings.data_dir),
            "IDOCR_DATABASE_URL": settings.resolved_database_url,
            "IDOCR_PROVIDER": settings.resolved_provider,
        }
    )
    if settings.redis_url:
        env["IDOCR_REDIS_URL"] = settings.redis_url
    if settings.sandbox_url:
        env["IDOCR_SANDBOX_URL"] = settings.sandbox_url
    return env


def worker_command(
    settings: Settings, concurrency: int, name: str, beat: bool = False
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-Q",
        f"{settings.queue},{settings.queue}.control",
        "-c",
        str(concurrency),
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        cmd += ["-B", "-s", str((settings.data_dir / "celerybeat-schedule").resolve())]
    return cmd


@contextmanager
def local_workers(settings: Settings, concurrency: int) -> Iterator[subprocess.Popen[bytes]]:
    logdir = settings.data_dir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    logfile = (logdir / "worker.log").open("ab")
    cmd = worker_command(settings, concurrency, f"idocr-run-{os.getpid()}@%h")
    cmd += ["--loglevel", "INFO"]
    proc = subprocess.Popen(
        cmd,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=child_env(settings),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown: running tasks finish first
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        logfile.close()
