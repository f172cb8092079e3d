"""``--since``: a moment as a person writes it on a command line.

Either a span back from now (``90s``, ``30m``, ``2h``, ``7d``, ``2w``) or an ISO 8601 date
or time (``2026-12-06``, ``2026-12-06T09:30``, ``2026-12-06T09:30:00Z``); a time without
an offset is the local time. Anything else is a usage error (exit 2) saying what works.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import typer

_SPAN = re.compile(r"(\d+)\s*([smhdw])", re.ASCII)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """The aware UTC datetime ``text`` means (``now`` for a span, default: the clock)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if span := _SPAN.fullmatch(text):
        count, unit = span.groups()
        return now - timedelta(**{_UNITS[unit]: int(count)})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: give a span back from now (90s, 30m, 2h, 7d, 2w) or an ISO 8601"
            " date or time (2026-12-06, 2026-12-06T09:30, 2026-12-06T09:30:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a local time
    return moment.astimezone(UTC)
