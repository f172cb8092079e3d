"""README.md stays true: its configuration table is the one the settings classes give,
and the commands it tells users to run exist."""

import re
import subprocess
from pathlib import Path

from trellis.cli.app import app
from trellis.cli.config_table import markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_configuration_table_matches_settings() -> None:
    assert markdown() in README, "regenerate with: python -m trellis.cli.config_table"


def test_make_targets_in_readme_exist() -> None:
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    mentioned = set(re.findall(r"\bmake ([a-z]+)\b", README))
    assert mentioned and mentioned <= targets


def test_trellis_commands_in_readme_exist() -> None:
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    commands |= {group.name for group in app.registered_groups}
    mentioned = set(re.findall(r"trellis (demo|run|up|[a-z]+)\b", README)) - {"is", "runs"}
    assert mentioned <= commands, mentioned - commands


def test_service_console_scripts_in_readme_are_installed() -> None:
    for script in re.findall(r"`(trellis-[a-z-]+)`", README):
        result = subprocess.run(
            ["bash", "-c", f"command -v {script} || ls .venv/bin/{script}"],
            cwd=ROOT,
            capture_output=True,
        )
        assert result.returncode == 0, script
