"""docker-compose.yml cannot be run here (no Docker engine); check that it hangs together."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_consistent() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"redis", "postgres", "objectstore", "worker", "beat", "flower", "producer"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if not src.startswith((".", "/")):
                assert src in doc["volumes"], f"{name}: undeclared volume {src}"
    assert services["worker"]["command"][:2] == ["idocr", "worker"]
    assert "celery" in services["beat"]["command"] and "beat" in services["beat"]["command"]
    env = services["worker"]["environment"]
    assert env["IDOCR_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["IDOCR_REDIS_URL"].startswith("redis://redis:")
    # secrets are passed through from the environment, never written here
    assert env["IDOCR_IHUYI_API_KEY"] == "${IDOCR_IHUYI_API_KEY:-}"
    assert (ROOT / "Dockerfile").is_file()
