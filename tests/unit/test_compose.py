"""docker-compose.yml and the image cannot be run here (no Docker engine): check that they are
valid, hang together, and keep the rules they state (pinned, checked, nothing exposed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ONE_SHOTS = {"migrate", "bucket", "producer"}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
        "check-jsonschema"
    )
    assert exe, "check-jsonschema comes with the dev extra"
    res = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_file_is_consistent() -> None:
    doc = _compose()
    services = doc["services"]
    expected = {
        "redis",
        "postgres",
        "objectstore",
        "bucket",
        "migrate",
        "worker",
        "beat",
        "metrics",
        "prometheus",
        "flower",
        "producer",
    }
    assert expected <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name}: {src} is missing"
            else:
                assert src in doc["volumes"], f"{name}: undeclared volume {src}"
    assert services["worker"]["command"][:2] == ["idocr", "worker"]
    assert "celery" in services["beat"]["command"] and "beat" in services["beat"]["command"]
    env = services["worker"]["environment"]
    assert env["IDOCR_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["IDOCR_REDIS_URL"].startswith("redis://redis:")
    # secrets are passed through from the environment, never written here
    assert env["IDOCR_IHUYI_API_KEY"] == "${IDOCR_IHUYI_API_KEY:-}"
    # the work waits for its bucket and schema
    for name in ("worker", "beat", "metrics", "producer"):
        deps = services[name]["depends_on"]
        assert (
            deps["bucket"]["condition"]
            == deps["migrate"]["condition"]
            == "service_completed_successfully"
        )


def test_images_are_pinned() -> None:
    for name, svc in _compose()["services"].items():
        image = svc.get("image", "")
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image!r} is not pinned"
    base = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and re.search(r":\d+\.\d+\.\d+", base.group(1)), base
    pins = [
        ln
        for ln in (ROOT / "deploy/constraints.txt").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+]+", p) for p in pins), pins
    names = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    # every runtime dependency is pinned for the image (regenerate the file when one is added)
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[\[<>=!~;\s]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    assert wanted <= names, f"not in deploy/constraints.txt: {sorted(wanted - names)}"


def test_every_long_running_service_has_a_health_check() -> None:
    image_has_one = "HEALTHCHECK" in (ROOT / "Dockerfile").read_text()
    for name, svc in _compose()["services"].items():
        check = svc.get("healthcheck", {})
        if name in ONE_SHOTS:
            assert svc.get("restart") == "no", name
            continue
        assert not check.get("disable"), name
        built_here = "build" in svc or svc.get("image", "").startswith("idocr:")
        assert check.get("test") or (built_here and image_has_one), f"{name} has no health check"
    worker_check = " ".join(_compose()["services"]["worker"]["healthcheck"]["test"])
    assert "inspect ping" in worker_check


def test_nothing_is_published_beyond_this_host_and_flower_needs_credentials() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to every address"
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"
    script = " ".join(flower["entrypoint"])
    assert 'test -n "$$FLOWER_BASIC_AUTH"' in script and "exit 1" in script


def test_the_image_installs_dependencies_before_copying_the_sources() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    deps = next(i for i, ln in enumerate(lines) if "-c constraints.txt" in ln)
    first_source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pipeline"))
    assert deps < first_source
    assert any(ln.startswith("RUN pip install --no-deps .") for ln in lines[first_source:])
    assert any(ln.startswith("HEALTHCHECK") for ln in lines)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".idocr", ".git", ".env"} <= ignored


def test_prometheus_scrapes_the_workers_and_the_state_endpoint() -> None:
    services = _compose()["services"]
    conf = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    sd = jobs["idocr-workers"]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and str(sd["port"]) in services["worker"]["expose"]
    assert services["worker"]["environment"]["IDOCR_METRICS_PORT"] == str(sd["port"])
    (target,) = jobs["idocr-state"]["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    assert host in services and port in services[host]["command"]


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    from pipeline import metrics

    known = set(re.findall(r"\b(idocr_[a-z_]+)\{", metrics.__doc__ or ""))
    known |= {n + "_total" for n in known} | {n + "_bucket" for n in known}
    dash = json.loads((ROOT / "deploy/grafana/idocr-dashboard.json").read_text())
    used = {
        m
        for p in dash["panels"]
        for t in p["targets"]
        for m in re.findall(r"\bidocr_[a-z_]+", t["expr"])
    }
    assert used and used <= known, used - known
