"""Gateway test kit: every gateway a test builds from settings keeps its usage outbox in
the test's tmp dir (TRELLIS_OUTBOX_PATH), never in the checkout's ``.trellis/``, where
tool usage a test could not deliver would reach another test's ledger later."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _outbox_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRELLIS_OUTBOX_PATH", str(tmp_path / "toolgateway-outbox.db"))
