"""Settings: typed from TRELLIS_* variables; a bad value exits with one clear line."""

import subprocess
import sys

import pytest

from trellis.runtime.settings import ServiceSettings, load_settings


def test_values_come_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_PORT", "6000")
    monkeypatch.setenv("TRELLIS_LOG_LEVEL", "debug")
    settings = load_settings(ServiceSettings, "test")
    assert (settings.port, settings.log_level) == (6000, "debug")


def test_bad_value_exits_2_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRELLIS_PORT", "not-a-port")
    monkeypatch.setenv("TRELLIS_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as exited:
        load_settings(ServiceSettings, "trellis-test")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("trellis-test: invalid configuration: ")
    assert "TRELLIS_PORT" in err and "'not-a-port'" in err and "TRELLIS_LOG_LEVEL" in err


@pytest.mark.parametrize(
    ("module", "env"),
    [
        ("trellis_executor", {"TRELLIS_MAX_PARALLEL": "0"}),
        ("trellis_cache", {"TRELLIS_PORT": "70000"}),
        ("trellis_executor", {"TRELLIS_DATABASE_URL": "mysql://x"}),
    ],
)
def test_service_process_with_invalid_setting_exits_nonzero(module: str, env: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert next(iter(env)) in lines[0]
