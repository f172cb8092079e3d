"""docker-compose.yml, .env and the Dockerfile, checked without a Docker engine.

``docker-compose config -q`` (Debian's docker-compose, installed by ``make
system-deps``) validates the file against the Compose schema and resolves ``.env``;
the rest reads the resolved configuration and checks what a typo would break at
``docker compose up`` time: every variable a service is given is one it reads, ports
and health checks agree with the settings, versions come from ``.env``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from trellis.runtime.settings import env_names
from trellis_cli.config_table import SERVICES

ROOT = Path(__file__).resolve().parents[2]
#: Compose service -> its command (a console script of this package).
TRELLIS_SERVICES = {
    "executor": "trellis-executor",
    "planner": "trellis-planner",
    "toolgateway": "trellis-toolgateway",
    "cache": "trellis-cache",
    "costs": "trellis-costs",
    "offline-model": "trellis-offline-model",
}
#: Variables read by libraries rather than by settings classes.
LIBRARY_PREFIXES = ("OTEL_",)


def _compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is needed to validate docker-compose.yml: run `make install`")
    return binary


@pytest.fixture(scope="module")
def config() -> dict:
    """The file as docker-compose resolves it (anchors merged, .env substituted)."""
    result = subprocess.run(
        [_compose_binary(), "--project-directory", str(ROOT), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        [_compose_binary(), "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_stack_has_every_part(config: dict) -> None:
    assert set(config["services"]) == {
        *TRELLIS_SERVICES,
        "redis",
        "postgres",
        "jaeger",
        "prometheus",
        "grafana",
    }


def test_every_variable_is_one_the_service_reads(config: dict) -> None:
    for name, command in TRELLIS_SERVICES.items():
        service = config["services"][name]
        assert service["command"] == [command]
        unknown = {
            var
            for var in service.get("environment", {})
            if not var.startswith(LIBRARY_PREFIXES) and var not in env_names(SERVICES[name])
        }
        assert not unknown, f"{name} is given variables it does not read: {sorted(unknown)}"


def test_ports_and_health_checks_follow_the_settings(config: dict) -> None:
    for name in TRELLIS_SERVICES.keys() - {"offline-model"}:
        service, settings = config["services"][name], SERVICES[name]
        env = service["environment"]
        assert int(env["TRELLIS_PORT"]) == settings.model_fields["port"].default
        assert int(env["TRELLIS_METRICS_PORT"]) == settings.model_fields["metrics_port"].default
        assert env["TRELLIS_HOST"] == "0.0.0.0"  # reachable from the other containers
        assert service["healthcheck"]["test"] == ["CMD", "trellis-probe"]
        assert service["read_only"] is True
        # Compose gives SIGKILL after stop_grace_period: it must outlast the server's grace.
        grace = float(env["TRELLIS_GRACE_SECONDS"])
        assert _seconds(service["stop_grace_period"]) > grace
    targets = config["services"]["executor"]["environment"]
    for name in ("planner", "toolgateway", "cache", "costs"):
        port = config["services"][name]["environment"]["TRELLIS_PORT"]
        assert targets[f"TRELLIS_{name.upper()}_TARGET"] == f"{name}:{port}"


def test_prometheus_scrapes_every_service_and_grafana_is_provisioned(config: dict) -> None:
    prometheus = config["services"]["prometheus"]
    assert any(v.startswith(f"{ROOT}/deploy/prometheus:") for v in _volumes(prometheus))
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    scraped = {
        target
        for job in scrape["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    for name in TRELLIS_SERVICES.keys() - {"offline-model"}:
        env = config["services"][name]["environment"]
        assert f"{name}:{env['TRELLIS_METRICS_PORT']}" in scraped
    grafana = _volumes(config["services"]["grafana"])
    assert f"{ROOT}/deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert f"{ROOT}/deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana


def test_versions_are_pinned_in_dot_env(config: dict) -> None:
    pinned = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    raw = (ROOT / "docker-compose.yml").read_text()
    images = re.findall(r"^\s*image:\s*(\S+)", raw, re.M)
    assert images and all(re.fullmatch(r"\$\{[A-Z_]+\}", image) for image in images), images
    for name, service in config["services"].items():
        image = service["image"]
        assert image in pinned.values(), f"{name}: {image} is not pinned in .env"
        assert ":" in image and not image.endswith(":latest"), image


def test_image_runs_as_non_root_with_a_health_check() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["trellis-probe"\]$', dockerfile, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"trellis-probe", *TRELLIS_SERVICES.values()} <= scripts.keys()


def _volumes(service: dict) -> list[str]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            out.append(volume)
        else:  # long syntax
            mode = ":ro" if volume.get("read_only") else ""
            out.append(f"{volume['source']}:{volume['target']}{mode}")
    return out


def _seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    value, unit = float(match[1]), match[2]
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
