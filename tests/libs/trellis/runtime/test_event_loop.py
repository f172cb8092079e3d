"""A service process runs on the event loop its settings name: uvloop by default, asyncio's
own on request, and one clear start-up error where uvloop cannot be had."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from trellis.runtime.server import event_loop_runner
from trellis.runtime.settings import ServiceSettings, StartupError


def test_uvloop_by_default_and_asyncio_on_request() -> None:
    assert event_loop_runner(ServiceSettings()) is uvloop.run
    assert event_loop_runner(ServiceSettings(event_loop="asyncio")) is asyncio.run


def test_uvloop_missing_is_a_startup_error_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it cannot be installed
    with pytest.raises(StartupError) as raised:
        event_loop_runner(ServiceSettings())
    assert str(raised.value) == (
        "TRELLIS_EVENT_LOOP=uvloop: uvloop is not installed here; set TRELLIS_EVENT_LOOP=asyncio"
    )


def test_the_runner_runs_a_service_coroutine_on_uvloop() -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    seen: list[str] = []

    async def main() -> None:
        seen.append(await which())

    event_loop_runner(ServiceSettings())(main())
    assert seen == ["uvloop"]


def test_an_unknown_event_loop_is_refused_at_start(monkeypatch, capsys) -> None:
    from trellis.runtime.settings import load_settings

    monkeypatch.setenv("TRELLIS_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit) as raised:
        load_settings(ServiceSettings, "trellis-probe")
    assert raised.value.code == 2
    assert "TRELLIS_EVENT_LOOP" in capsys.readouterr().err
