"""Ledger over a real SQLite file: idempotency, grouping, budgets."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from trellis.runtime.errors import AlreadyExists
from trellis_costs.ledger import Budget, Ledger, UsageEvent, UsageKind, parse_day
from trellis_costs.prices import PriceTable


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(tmp_path: Path, clock: Clock) -> AsyncIterator[Ledger]:
    ledger = await Ledger.open(f"sqlite:///{tmp_path}/ledger.db", PriceTable.load(), clock=clock)
    yield ledger
    await ledger.aclose()


def model_event(
    usage_id: str, *, tenant: str = "t1", model: str = "gpt-4o-mini", **kw
) -> UsageEvent:
    kw.setdefault("input_tokens", 1_000)
    kw.setdefault("output_tokens", 100)
    return UsageEvent(usage_id, tenant, UsageKind.MODEL, model=model, **kw)


def tool_event(usage_id: str, tool: str, cost: int, *, tenant: str = "t1", **kw) -> UsageEvent:
    return UsageEvent(usage_id, tenant, UsageKind.TOOL, tool=tool, tool_cost_nano_usd=cost, **kw)


# gpt-4o-mini: 150 nano-USD per input token, 600 per output token.
MINI_1000_100 = 1_000 * 150 + 100 * 600


async def test_record_prices_a_model_call(ledger: Ledger) -> None:
    recorded = await ledger.record(model_event("u1"))
    assert (recorded.cost_nano_usd, recorded.duplicate, recorded.price_known) == (
        MINI_1000_100,
        False,
        True,
    )


async def test_repeat_usage_id_returns_stored_cost_and_is_not_counted(ledger: Ledger) -> None:
    first = await ledger.record(model_event("u1"))
    # Even with different tokens, the repeat is the same event: nothing changes.
    again = await ledger.record(model_event("u1", input_tokens=9_999))
    assert again.duplicate and again.cost_nano_usd == first.cost_nano_usd
    report = await ledger.usage("t1", "2025-03-15", "2025-03-15")
    assert [(r.events, r.input_tokens) for r in report.rows] == [(1, 1_000)]
    assert report.total_cost_nano_usd == first.cost_nano_usd


async def test_usage_id_of_another_tenant_is_rejected(ledger: Ledger) -> None:
    await ledger.record(model_event("u1", tenant="t1"))
    with pytest.raises(AlreadyExists) as raised:
        await ledger.record(model_event("u1", tenant="t2"))
    assert raised.value.reason == "USAGE_ID_TAKEN"
    assert (await ledger.usage("t2", "2025-03-15", "2025-03-15")).rows == []


async def test_unknown_model_is_recorded_at_zero_cost(ledger: Ledger) -> None:
    recorded = await ledger.record(model_event("u1", model="mystery-7b"))
    assert (recorded.cost_nano_usd, recorded.duplicate, recorded.price_known) == (0, False, False)
    [row] = (await ledger.usage("t1", "2025-03-15", "2025-03-15")).rows
    assert (row.name, row.input_tokens, row.cost_nano_usd) == ("mystery-7b", 1_000, 0)


async def test_tool_cost_is_the_declared_cost(ledger: Ledger) -> None:
    recorded = await ledger.record(tool_event("t-1", "web_search", 5_000_000))
    assert (recorded.cost_nano_usd, recorded.price_known) == (5_000_000, True)


async def test_usage_groups_by_day_and_model_or_tool_within_window(
    ledger: Ledger, clock: Clock
) -> None:
    day1 = datetime(2025, 3, 14, 23, 59, tzinfo=UTC)
    await ledger.record(model_event("a", occurred_at=day1))
    await ledger.record(model_event("b", occurred_at=day1, input_tokens=10, output_tokens=0))
    await ledger.record(model_event("c", model="gpt-4o", occurred_at=day1))
    await ledger.record(tool_event("d", "web_search", 700, occurred_at=day1))
    await ledger.record(model_event("e"))  # clock: 2025-03-15
    await ledger.record(model_event("f", occurred_at=datetime(2025, 3, 13, tzinfo=UTC)))
    await ledger.record(model_event("g", tenant="other"))

    report = await ledger.usage("t1", "2025-03-14", "2025-03-15")
    got = [(r.day, r.kind, r.name, r.input_tokens, r.events, r.cost_nano_usd) for r in report.rows]
    gpt4o = 1_000 * 2_500 + 100 * 10_000
    assert got == [
        ("2025-03-14", UsageKind.MODEL, "gpt-4o", 1_000, 1, gpt4o),
        ("2025-03-14", UsageKind.MODEL, "gpt-4o-mini", 1_010, 2, MINI_1000_100 + 10 * 150),
        ("2025-03-14", UsageKind.TOOL, "web_search", 0, 1, 700),
        ("2025-03-15", UsageKind.MODEL, "gpt-4o-mini", 1_000, 1, MINI_1000_100),
    ]
    assert report.total_cost_nano_usd == sum(r.cost_nano_usd for r in report.rows)
    assert {r.tenant_id for r in report.rows} == {"t1"}


async def test_day_is_the_utc_day_of_an_aware_timestamp(ledger: Ledger) -> None:
    from datetime import timedelta, timezone

    # 01:00 on the 16th at UTC+2 is 23:00 on the 15th UTC.
    local = datetime(2025, 3, 16, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    await ledger.record(model_event("u1", occurred_at=local))
    assert len((await ledger.usage("t1", "2025-03-15", "2025-03-15")).rows) == 1


async def test_without_budget_everything_is_allowed(ledger: Ledger) -> None:
    await ledger.record(model_event("u1"))
    check = await ledger.check_budget("t1", 10**15)
    assert check.allowed
    assert (check.daily_limit_nano_usd, check.monthly_limit_nano_usd) == (0, 0)
    assert check.spent_today_nano_usd == MINI_1000_100


async def test_daily_budget_limits_spending(ledger: Ledger) -> None:
    await ledger.set_budget(Budget("t1", daily_limit_nano_usd=MINI_1000_100 * 2))
    await ledger.record(model_event("u1"))
    check = await ledger.check_budget("t1", MINI_1000_100)
    assert (check.allowed, check.spent_today_nano_usd, check.remaining_nano_usd) == (
        True,
        MINI_1000_100,
        MINI_1000_100,
    )
    assert not (await ledger.check_budget("t1", MINI_1000_100 + 1)).allowed
    await ledger.record(model_event("u2"))
    exhausted = await ledger.check_budget("t1", 0)
    assert (exhausted.allowed, exhausted.remaining_nano_usd) == (False, 0)
    assert (await ledger.check_budget("other", 0)).allowed  # budgets are per tenant


async def test_daily_budget_resets_the_next_day(ledger: Ledger, clock: Clock) -> None:
    await ledger.set_budget(Budget("t1", daily_limit_nano_usd=MINI_1000_100))
    await ledger.record(model_event("u1"))
    assert not (await ledger.check_budget("t1")).allowed
    clock.now = datetime(2025, 3, 16, 0, 0, tzinfo=UTC)
    check = await ledger.check_budget("t1")
    assert (check.allowed, check.spent_today_nano_usd) == (True, 0)


async def test_monthly_budget_counts_the_whole_month(ledger: Ledger, clock: Clock) -> None:
    await ledger.set_budget(Budget("t1", monthly_limit_nano_usd=MINI_1000_100 * 2))
    await ledger.record(model_event("old", occurred_at=datetime(2025, 2, 28, tzinfo=UTC)))
    await ledger.record(model_event("u1", occurred_at=datetime(2025, 3, 1, tzinfo=UTC)))
    await ledger.record(model_event("u2", occurred_at=datetime(2025, 3, 10, tzinfo=UTC)))
    check = await ledger.check_budget("t1")
    assert (check.allowed, check.spent_today_nano_usd, check.spent_this_month_nano_usd) == (
        False,
        0,
        MINI_1000_100 * 2,
    )


async def test_set_budget_replaces_and_zero_limits_remove_it(ledger: Ledger) -> None:
    await ledger.set_budget(Budget("t1", 10, 100))
    await ledger.set_budget(Budget("t1", 20, 200))
    assert await ledger.get_budget("t1") == Budget("t1", 20, 200)
    await ledger.set_budget(Budget("t1", 0, 0))
    assert await ledger.get_budget("t1") is None
    with pytest.raises(ValueError):
        await ledger.set_budget(Budget("t1", -1, 0))


async def test_rows_survive_reopening_the_database(tmp_path: Path, clock: Clock) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    first = await Ledger.open(url, PriceTable.load(), clock=clock)
    await first.record(model_event("u1"))
    await first.aclose()
    second = await Ledger.open(url, PriceTable.load(), clock=clock)
    try:
        assert (await second.record(model_event("u1"))).duplicate
    finally:
        await second.aclose()


@pytest.mark.parametrize("text", ["2025-03-15", "2024-02-29"])
def test_parse_day_accepts_real_days(text: str) -> None:
    assert parse_day(text) == text


@pytest.mark.parametrize("text", ["20250315", "2025-3-15", "2025-02-30", "2025-W11-6", "", "x"])
def test_parse_day_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_day(text)
