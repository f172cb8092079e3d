"""What the Dockerfile installs (``pip install .``, not editable) is the whole service code.

The image cannot be built here (no Docker engine), but its one install step can: the
wheel must carry every module and data file git tracks under the packages (prices,
tools.yaml, the sandbox, generated stubs) and the console scripts the image and the
compose file run. A file missing from it works in every editable test run and breaks
only in a container.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = ("libs", "services")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("trellis-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_has_every_tracked_package_file(wheel: zipfile.ZipFile) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", *SOURCE_ROOTS], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    expected = {path.split("/", 1)[1] for path in tracked}  # libs/trellis/x -> trellis/x
    missing = expected - set(wheel.namelist())
    assert not missing, f"not in the wheel the image installs: {sorted(missing)[:20]}"


def test_wheel_has_the_commands_the_image_runs(wheel: zipfile.ZipFile) -> None:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(name).decode())
    commands = set(entry_points["console_scripts"])
    compose = (ROOT / "docker-compose.yml").read_text() + (ROOT / "Dockerfile").read_text()
    used = {c for c in commands if f'"{c}"' in compose}
    assert {
        "trellis-executor",
        "trellis-planner",
        "trellis-toolgateway",
        "trellis-cache",
        "trellis-costs",
        "trellis-offline-model",
        "trellis-probe",
    } <= used
