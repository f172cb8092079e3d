"""``--since``: spans back from now and ISO dates or times; anything else is a usage error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import typer

from trellis_cli.since import parse_since

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "back"),
    [("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)), ("2h", timedelta(hours=2)),
     ("7d", timedelta(days=7)), ("2w", timedelta(weeks=2))],
)  # fmt: skip
def test_a_span_counts_back_from_now(text: str, back: timedelta) -> None:
    assert parse_since(text, NOW) == NOW - back


def test_iso_times_with_an_offset_or_in_local_time() -> None:
    assert parse_since("2026-12-06T09:30:00Z", NOW) == datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
    assert parse_since("2026-12-06T10:30+01:00", NOW) == datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
    local = datetime(2026, 12, 6).astimezone()
    assert parse_since("2026-12-06", NOW) == local.astimezone(UTC)


@pytest.mark.parametrize("text", ["yesterday", "5 parsecs", "-2h", "2026-13-01"])
def test_anything_else_says_what_works(text: str) -> None:
    with pytest.raises(typer.BadParameter, match=r"90s, 30m, 2h, 7d, 2w"):
        parse_since(text, NOW)
