"""The product code passes its linters: ruff (pycodestyle, pyflakes, bugbear, pyupgrade, import
order), ruff's formatter and mypy, configured in pyproject.toml. Run with the suite, so CI runs
them too."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

TARGETS = ["pipeline", "workers"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


def test_ruff_finds_nothing() -> None:
    res = _run("ruff", "check", *TARGETS)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_would_change_nothing() -> None:
    res = _run("ruff", "format", "--check", *TARGETS)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_finds_nothing() -> None:
    res = _run("mypy", *TARGETS)
    assert res.returncode == 0, res.stdout + res.stderr
