"""The usage ledger: one row per usage event, and tenants' budgets.

``open_ledger`` picks the backend from ``TRELLIS_DATABASE_URL``: SQLite (the default,
one process or several sharing a file) or PostgreSQL (several cost-accounting
replicas). Both keep the contract described in ``ledger.base``.
"""

from __future__ import annotations

from trellis.runtime.database import is_postgres, validate_database_url
from trellis_costs.ledger.base import (
    BUDGET_LIMITS,
    Budget,
    Clock,
    Decision,
    Ledger,
    Recorded,
    RunUsage,
    Standing,
    UsageEvent,
    UsageKind,
    UsageReport,
    UsageRow,
    parse_day,
    utc_day,
    utc_now,
)
from trellis_costs.ledger.postgres import PostgresLedger
from trellis_costs.ledger.sqlite import SqliteLedger
from trellis_costs.prices import PriceTable

__all__ = [
    "BUDGET_LIMITS",
    "Budget",
    "Decision",
    "Ledger",
    "PostgresLedger",
    "Recorded",
    "RunUsage",
    "SqliteLedger",
    "Standing",
    "UsageEvent",
    "UsageKind",
    "UsageReport",
    "UsageRow",
    "open_ledger",
    "parse_day",
    "utc_day",
    "utc_now",
]


async def open_ledger(url: str, prices: PriceTable, *, clock: Clock = utc_now) -> Ledger:
    """Open (and create the tables of) the ledger ``url`` names."""
    if is_postgres(validate_database_url(url)):
        return await PostgresLedger.open(url, prices, clock=clock)
    return await SqliteLedger.open(url, prices, clock=clock)
