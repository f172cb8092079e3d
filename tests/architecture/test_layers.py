"""The layering contract (``[tool.importlinter]`` in pyproject.toml) holds, and it is a
real check: a deliberate violation - libs importing a service, one service importing
another, a cycle inside a package - makes ``lint-imports`` fail naming it.

The violations are made in copies of the packages put first on ``PYTHONPATH``, so the
checkout is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(shadow: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if shadow is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_repository_keeps_its_layers() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("package", "module", "violation", "broken"),
    [
        # libs pointing up at a service
        ("libs/trellis", "runtime/context.py", "import trellis_executor.limits", "layers"),
        # one service importing another
        ("services/trellis_cache", "store.py", "import trellis_costs.prices", "layers"),
        # a cycle between two modules of one package
        ("services/trellis_planner", "replan.py", "import trellis_planner.core", "acyclic"),
    ],
)
def test_a_deliberate_violation_breaks_the_contract(
    tmp_path: Path, package: str, module: str, violation: str, broken: str
) -> None:
    copy = tmp_path / Path(package).name
    shutil.copytree(ROOT / package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{violation}  # deliberate\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    names = {"layers": "application -> services -> libs", "acyclic": "no import cycles"}
    line = next(line for line in result.stdout.splitlines() if names[broken] in line)
    assert line.endswith("BROKEN"), result.stdout
