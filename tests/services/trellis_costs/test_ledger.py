"""The ledger contract, checked against every backend (SQLite and PostgreSQL):
idempotency, tenants, grouping, days, estimated figures, runs, budgets (partial
updates), the standing a check reads and the holds it writes."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest

from trellis.runtime.errors import AlreadyExists
from trellis_costs.ledger import (
    Budget,
    Ledger,
    PostgresLedger,
    RunUsage,
    SqliteLedger,
    Standing,
    UsageEvent,
    UsageKind,
    open_ledger,
    parse_day,
)
from trellis_costs.prices import PriceTable

DAY = "2025-03-15"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(ledger_url: str, clock: Clock) -> AsyncIterator[Ledger]:
    opened = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    yield opened
    await opened.close()


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


async def test_url_picks_backend(ledger: Ledger, ledger_url: str) -> None:
    expected = SqliteLedger if ledger_url.startswith("sqlite") else PostgresLedger
    assert isinstance(ledger, expected)


async def test_unsupported_url_is_refused() -> None:
    with pytest.raises(ValueError, match="sqlite:///path or postgresql://"):
        await open_ledger("mysql://db/costs", PriceTable.load())


async def test_record_prices_a_model_call_on_the_clock_day(ledger: Ledger) -> None:
    recorded = await ledger.record(model_event("u1"))
    assert (recorded.cost_nano_usd, recorded.duplicate, recorded.price_known, recorded.day) == (
        MINI_1000_100,
        False,
        True,
        "2025-03-15",
    )


async def test_repeat_usage_id_returns_stored_cost_and_is_not_counted(
    ledger: Ledger, clock: Clock
) -> None:
    first = await ledger.record(model_event("u1"))
    clock.now += timedelta(days=1)
    # Even with other tokens on another day, the repeat is the same event: nothing changes.
    again = await ledger.record(model_event("u1", input_tokens=9_999))
    assert (again.duplicate, again.cost_nano_usd, again.day) == (
        True,
        first.cost_nano_usd,
        first.day,
    )
    report = await ledger.usage("t1", "2025-03-15", "2025-03-16")
    assert [(r.day, r.events, r.input_tokens) for r in report.rows] == [("2025-03-15", 1, 1_000)]
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


async def test_usage_groups_by_day_kind_and_name_within_window(ledger: Ledger) -> None:
    day1 = datetime(2025, 3, 14, 23, 59, tzinfo=UTC)
    await ledger.record(model_event("a", occurred_at=day1))
    await ledger.record(model_event("b", occurred_at=day1, input_tokens=10, output_tokens=0))
    await ledger.record(model_event("c", model="gpt-4o", occurred_at=day1))
    await ledger.record(tool_event("d", "web_search", 700, occurred_at=day1))
    await ledger.record(tool_event("d2", "Zeta", 1, occurred_at=day1))  # sorts as bytes
    await ledger.record(model_event("e"))  # clock: 2025-03-15
    await ledger.record(model_event("f", occurred_at=datetime(2025, 3, 13, tzinfo=UTC)))
    await ledger.record(model_event("g", tenant="other"))

    report = await ledger.usage("t1", "2025-03-14", "2025-03-15")
    got = [(r.day, r.kind, r.name, r.input_tokens, r.events, r.cost_nano_usd) for r in report.rows]
    gpt4o = 1_000 * 2_500 + 100 * 10_000
    assert got == [
        ("2025-03-14", UsageKind.MODEL, "gpt-4o", 1_000, 1, gpt4o),
        ("2025-03-14", UsageKind.MODEL, "gpt-4o-mini", 1_010, 2, MINI_1000_100 + 10 * 150),
        ("2025-03-14", UsageKind.TOOL, "Zeta", 0, 1, 1),
        ("2025-03-14", UsageKind.TOOL, "web_search", 0, 1, 700),
        ("2025-03-15", UsageKind.MODEL, "gpt-4o-mini", 1_000, 1, MINI_1000_100),
    ]
    assert report.total_cost_nano_usd == sum(r.cost_nano_usd for r in report.rows)
    assert {r.tenant_id for r in report.rows} == {"t1"}


async def test_day_is_the_utc_day_of_an_aware_timestamp(ledger: Ledger) -> None:
    # 01:00 on the 16th at UTC+2 is 23:00 on the 15th UTC.
    local = datetime(2025, 3, 16, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert (await ledger.record(model_event("u1", occurred_at=local))).day == "2025-03-15"
    assert len((await ledger.usage("t1", "2025-03-15", "2025-03-15")).rows) == 1
    naive = datetime(2025, 3, 16, 0, 30)  # taken as UTC
    assert (await ledger.record(model_event("u2", occurred_at=naive))).day == "2025-03-16"


async def test_usage_counts_estimated_events_and_their_tokens(ledger: Ledger) -> None:
    await ledger.record(model_event("exact"))
    await ledger.record(model_event("cut", input_tokens=300, output_tokens=40, estimated=True))
    await ledger.record(model_event("other", model="gpt-4o", estimated=True))
    await ledger.record(tool_event("t", "echo", 5))
    report = await ledger.usage("t1", DAY, DAY)
    got = {
        r.name: (r.events, r.estimated_events, r.estimated_input_tokens, r.estimated_output_tokens)
        for r in report.rows
    }
    assert got == {
        "gpt-4o": (1, 1, 1_000, 100),
        "gpt-4o-mini": (2, 1, 300, 40),
        "echo": (1, 0, 0, 0),
    }
    assert (report.total_input_tokens, report.total_output_tokens) == (2_300, 240)
    assert report.estimated_events == 2


async def test_run_usage_adds_up_the_tenants_rows_of_one_run(ledger: Ledger, clock: Clock) -> None:
    await ledger.record(model_event("r1/plan/0", run_id="r1", model="gpt-4o"))
    clock.now += timedelta(seconds=1)
    await ledger.record(tool_event("r1/n1/tool/a", "echo", 700, run_id="r1", node_id="n1"))
    clock.now += timedelta(seconds=1)
    await ledger.record(
        model_event("r1/join/0", run_id="r1", input_tokens=10, output_tokens=5, estimated=True)
    )
    await ledger.record(model_event("r2/plan/0", run_id="r2"))
    await ledger.record(model_event("x/plan/0", run_id="r1-other-tenant", tenant="t2"))
    run = await ledger.run_usage("t1", "r1")
    gpt4o = 1_000 * 2_500 + 100 * 10_000
    mini = 10 * 150 + 5 * 600
    assert run == RunUsage(
        model="gpt-4o-mini",  # the latest model row's
        input_tokens=1_010,
        output_tokens=105,
        cached_input_tokens=0,
        model_cost_nano_usd=gpt4o + mini,
        estimated=True,
        tool_cost_nano_usd=700,
        usage_ids=("r1/plan/0", "r1/n1/tool/a", "r1/join/0"),
    )
    assert run.cost_nano_usd == gpt4o + mini + 700
    assert await ledger.run_usage("t2", "r1") == RunUsage()  # another tenant's run: nothing
    assert await ledger.run_usage("t1", "nope") == RunUsage()


async def test_set_budget_replaces_and_zero_limits_remove_it(ledger: Ledger) -> None:
    assert await ledger.get_budget("t1") is None
    assert await ledger.set_budget(Budget("t1", 10, 100)) == Budget("t1", 10, 100)
    await ledger.set_budget(Budget("t1", 20, 200))
    assert await ledger.get_budget("t1") == Budget("t1", 20, 200)
    assert await ledger.set_budget(Budget("t1", 0, 0)) == Budget("t1")
    assert await ledger.get_budget("t1") is None
    with pytest.raises(ValueError):
        await ledger.set_budget(Budget("t1", -1, 0))


async def test_set_budget_writes_only_the_named_limits(ledger: Ledger) -> None:
    await ledger.set_budget(Budget("t1", 10, 100))
    monthly = await ledger.set_budget(Budget("t1", 0, 200), ["monthly_limit_nano_usd"])
    assert monthly == Budget("t1", 10, 200) == await ledger.get_budget("t1")
    daily = await ledger.set_budget(Budget("t1", 30, 0), ["daily_limit_nano_usd"])
    assert daily == Budget("t1", 30, 200)
    # A new tenant's unnamed limit is 0; naming a limit with 0 removes that one.
    assert await ledger.set_budget(Budget("t2", 5, 9), ["daily_limit_nano_usd"]) == Budget(
        "t2", 5, 0
    )
    assert await ledger.set_budget(Budget("t1", 0, 0), ["daily_limit_nano_usd"]) == Budget(
        "t1", 0, 200
    )
    # Removing the last limit removes the budget.
    await ledger.set_budget(Budget("t1"), ["monthly_limit_nano_usd"])
    assert await ledger.get_budget("t1") is None
    with pytest.raises(ValueError, match="not a budget limit"):
        await ledger.set_budget(Budget("t1", 1, 1), ["weekly_limit_nano_usd"])


async def test_standing_sums_the_day_and_its_whole_month(ledger: Ledger, clock: Clock) -> None:
    await ledger.set_budget(Budget("t1", daily_limit_nano_usd=5, monthly_limit_nano_usd=50))
    for usage_id, cost, when in [
        ("feb", 1, datetime(2025, 2, 28, 23, 59, tzinfo=UTC)),
        ("mar1", 10, datetime(2025, 3, 1, tzinfo=UTC)),
        ("today-a", 100, datetime(2025, 3, 15, 1, tzinfo=UTC)),
        ("today-b", 1_000, datetime(2025, 3, 15, 23, tzinfo=UTC)),
        ("mar31", 10_000, datetime(2025, 3, 31, 23, 59, tzinfo=UTC)),
        ("apr", 100_000, datetime(2025, 4, 1, tzinfo=UTC)),
    ]:
        await ledger.record(tool_event(usage_id, "x", cost, occurred_at=when))
    await ledger.record(tool_event("other-tenant", "x", 7, tenant="t2"))

    assert await ledger.standing("t1", DAY, clock.now) == Standing(
        Budget("t1", 5, 50), 1_100, 11_110, 0
    )
    assert await ledger.standing("nobody", DAY, clock.now) == Standing(Budget("nobody"), 0, 0, 0)


@dataclass(frozen=True)
class Hold:
    """A decision that holds a fixed amount (what ``Budgets`` decides is tested there)."""

    hold_nano_usd: int


async def hold(ledger: Ledger, clock: Clock, reservation: str, amount: int, *, tenant="t1"):
    """Hold ``amount`` under ``reservation`` for 60 s; the standing the check saw."""
    seen: list[Standing] = []

    def decide(standing: Standing) -> Hold:
        seen.append(standing)
        return Hold(amount)

    await ledger.decide_and_hold(
        tenant, DAY, clock.now, reservation, clock.now + timedelta(seconds=60), decide
    )
    return seen[0]


async def test_holds_count_for_others_until_recorded_or_expired(
    ledger: Ledger, clock: Clock
) -> None:
    await ledger.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    assert (await hold(ledger, clock, "a", 300)).reserved_nano_usd == 0
    seen = await hold(ledger, clock, "b", 200)
    assert (seen.reserved_nano_usd, seen.held_nano_usd) == (300, 0)
    # Asked again, a reservation sees the others' holds and its own apart.
    again = await hold(ledger, clock, "a", 400)
    assert (again.reserved_nano_usd, again.held_nano_usd) == (200, 300)
    assert (await ledger.standing("t1", DAY, clock.now)).reserved_nano_usd == 600
    assert (await ledger.standing("t2", DAY, clock.now)).reserved_nano_usd == 0  # per tenant

    # Recording a reservation's usage ends its hold; the real cost counts instead.
    await ledger.record(tool_event("a", "x", 250))
    standing = await ledger.standing("t1", DAY, clock.now)
    assert (standing.spent_today_nano_usd, standing.reserved_nano_usd) == (250, 200)
    await ledger.record(tool_event("a", "x", 250))  # a duplicate changes nothing
    assert await ledger.standing("t1", DAY, clock.now) == standing

    # A hold of 0 lets it go; an expired one no longer counts, and renewing it restarts it.
    await hold(ledger, clock, "b", 0)
    assert (await ledger.standing("t1", DAY, clock.now)).reserved_nano_usd == 0
    await hold(ledger, clock, "c", 100)
    clock.now += timedelta(seconds=30)
    await hold(ledger, clock, "c", 150)  # the same hold: it keeps its expiry
    clock.now += timedelta(seconds=30)
    assert (await ledger.standing("t1", DAY, clock.now)).reserved_nano_usd == 0
    assert (await hold(ledger, clock, "c", 100)).held_nano_usd == 0  # expired: a new one
    clock.now += timedelta(seconds=59)
    assert (await ledger.standing("t1", DAY, clock.now)).reserved_nano_usd == 100


async def test_running_totals_are_filled_for_a_ledger_from_before_them(
    ledger_url: str, clock: Clock
) -> None:
    """A ledger whose usage rows were written before spend_by_day existed gets its
    totals once, at open; rows written afterwards are added once."""
    first = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    await first.record(tool_event("a", "x", 100))
    await first.record(tool_event("b", "x", 20, occurred_at=datetime(2025, 3, 1, tzinfo=UTC)))
    await first.close()
    await _forget_running_totals(ledger_url)
    second = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    try:
        assert await second.standing("t1", DAY, clock.now) == Standing(Budget("t1"), 100, 120, 0)
        await second.record(tool_event("c", "x", 3))
    finally:
        await second.close()
    third = await open_ledger(ledger_url, PriceTable.load(), clock=clock)  # no second fill
    try:
        assert await third.standing("t1", DAY, clock.now) == Standing(Budget("t1"), 103, 123, 0)
    finally:
        await third.close()


async def _forget_running_totals(url: str) -> None:
    """Make ``url`` look like a ledger from before running totals: no table, no trigger."""
    if url.startswith("sqlite"):
        import aiosqlite

        async with aiosqlite.connect(url.removeprefix("sqlite:///")) as db:
            await db.executescript(
                "DROP TRIGGER usage_count_spend; DROP TABLE spend_by_day; DROP TABLE budget_holds;"
            )
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "DROP TRIGGER usage_count_spend ON usage; DROP FUNCTION ledger_count_spend();"
            " DROP TABLE spend_by_day; DROP TABLE budget_holds;"
        )
    finally:
        await conn.close()


async def test_rows_survive_reopening_the_database(ledger_url: str, clock: Clock) -> None:
    first = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    await first.record(model_event("u1"))
    await first.close()
    second = await open_ledger(ledger_url, PriceTable.load(), clock=clock)
    try:
        assert (await second.record(model_event("u1"))).duplicate
    finally:
        await second.close()


@pytest.mark.parametrize("text", ["2025-03-15", "2024-02-29"])
def test_parse_day_accepts_real_days(text: str) -> None:
    assert parse_day(text) == text


@pytest.mark.parametrize("text", ["20250315", "2025-3-15", "2025-02-30", "2025-W11-6", "", "x"])
def test_parse_day_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_day(text)


async def test_standings_are_every_budgeted_tenants(ledger: Ledger, clock: Clock) -> None:
    await ledger.set_budget(Budget("t1", daily_limit_nano_usd=1_000))
    await ledger.set_budget(Budget("t2", monthly_limit_nano_usd=5_000))
    await ledger.record(tool_event("a", "x", 100))
    await ledger.record(tool_event("b", "x", 7, tenant="t3"))  # no budget: not listed
    await hold(ledger, clock, "r", 40, tenant="t2")
    standings = sorted(await ledger.standings(DAY, clock.now), key=lambda s: s.budget.tenant_id)
    assert standings == [
        Standing(Budget("t1", 1_000, 0), 100, 100, 0),
        Standing(Budget("t2", 0, 5_000), 0, 0, 40),
    ]


async def test_usage_of_one_session(ledger: Ledger) -> None:
    await ledger.record(model_event("u1", session_id="chat-1", run_id="r1"))
    await ledger.record(tool_event("u2", "search", 7, session_id="chat-1", run_id="r1"))
    await ledger.record(model_event("u3", session_id="chat-2", run_id="r2"))
    await ledger.record(model_event("u4", run_id="r3"))
    await ledger.record(model_event("u5", tenant="t2", session_id="chat-1"))
    day = (await ledger.record(model_event("u1"))).day
    one = await ledger.usage("t1", day, day, "chat-1")
    assert one.total_cost_nano_usd == MINI_1000_100 + 7
    assert sum(row.events for row in one.rows) == 2
    everything = await ledger.usage("t1", day, day)
    assert sum(row.events for row in everything.rows) == 4
    assert (await ledger.usage("t1", day, day, "nobody")).rows == []
