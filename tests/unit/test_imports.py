"""Importing the product starts nothing and reaches no service; the library never imports the
workers package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

MODULES = ["workers.app", "workers.tasks", "workers.queue", "pipeline.cli", "pipeline.runtime",
           "pipeline.workflows.processing", "pipeline.workflows.reconcile", "pipeline.workflows.control", "pipeline.metrics"]


def test_importing_every_entry_module_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDOCR_", "PROMETHEUS"))}
    env["IDOCR_DATA_DIR"] = str(data)  # the embedded Redis and SQLite would appear here
    code = "import " + ", ".join(MODULES) + "; from workers.app import app"
    subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, check=True, timeout=120)
    assert not data.exists(), list(data.rglob("*"))


def test_pipeline_never_imports_workers() -> None:
    offenders = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "workers"]
    assert offenders == []
