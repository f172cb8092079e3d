"""Planner settings: defaults, TRELLIS_* and the unprefixed OPENAI_* variables."""

import pytest

from trellis_planner.settings import PlannerSettings


def test_defaults_reach_the_offline_model() -> None:
    s = PlannerSettings()
    assert (s.port, s.metrics_port, s.max_nodes, s.model_timeout_seconds) == (50052, 9102, 50, 60)
    assert s.model == "trellis-offline-rules-v1"
    assert s.openai_base_url == "http://127.0.0.1:8400/v1"
    assert s.openai_api_key.get_secret_value() == "not-needed-offline"


def test_openai_variables_are_unprefixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("TRELLIS_MODEL", "gpt-4o-mini")
    monkeypatch.setenv("TRELLIS_MAX_NODES", "8")
    s = PlannerSettings()
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.openai_api_key.get_secret_value() == "sk-test"
    assert "sk-test" not in repr(s)
    assert (s.model, s.max_nodes) == ("gpt-4o-mini", 8)


def test_field_names_work_as_keywords_and_bad_urls_fail() -> None:
    assert PlannerSettings(openai_base_url="http://h:1/v1").openai_base_url == "http://h:1/v1"
    with pytest.raises(ValueError, match="http"):
        PlannerSettings(openai_base_url="h:1")
