"""Settings from TRELLIS_OFFLINE_MODEL_* and the one-line exit on a bad value."""

import pytest

from trellis.runtime.settings import load_settings
from trellis_offline_model.settings import OfflineModelSettings


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (OfflineModelSettings().host, OfflineModelSettings().port) == ("127.0.0.1", 8400)
    monkeypatch.setenv("TRELLIS_OFFLINE_MODEL_PORT", "9000")
    monkeypatch.setenv("TRELLIS_OFFLINE_MODEL_DELAY_MS", "15")
    settings = OfflineModelSettings()
    assert (settings.port, settings.delay_ms) == (9000, 15)


def test_bad_value_exits_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRELLIS_OFFLINE_MODEL_DELAY_MS", "-1")
    with pytest.raises(SystemExit) as raised:
        load_settings(OfflineModelSettings, "trellis-offline-model")
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TRELLIS_OFFLINE_MODEL_DELAY_MS" in err
