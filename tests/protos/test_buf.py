"""buf lint (STANDARD) and buf format pass on protos/ (buf comes from npm, see package.json)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def buf() -> str:
    if not BUF.exists():
        pytest.fail("buf is not installed: run `make install` (npm ci)")
    return str(BUF)


def test_buf_lint_is_clean(buf: str) -> None:
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean(buf: str) -> None:
    result = subprocess.run(
        [buf, "format", "--diff", "--exit-code"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(buf: str, tmp_path: Path) -> None:
    # The check above must be able to fail: a module with a badly named enum is rejected.
    proto_dir = tmp_path / "protos" / "bad" / "v1"
    proto_dir.mkdir(parents=True)
    (proto_dir / "bad.proto").write_text(
        'syntax = "proto3";\npackage bad.v1;\nenum Color { RED = 0; }\n'
    )
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    result = subprocess.run([buf, "lint"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ENUM_ZERO_VALUE_SUFFIX" in result.stdout or "UNSPECIFIED" in result.stdout
