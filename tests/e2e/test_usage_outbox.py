"""Nothing lost (issue 6): usage made while cost accounting is down reaches the ledger
once it is back, every row exactly once, at the cost it would have had.

The five services run as processes (``process_stack``), each planner and gateway with
its outbox file in the test's tmp dir, the gateway with tools that cost money and are
never cached (so the same goal executes the same tools every time). Three runs go with
cost accounting up: the control. Three more runs of the same goals start (the executor
checks the budget first, so it must be up then), and cost accounting is SIGKILLed the
moment they have started; the offline model streams plans a line at a time, so every
model call and tool execution of those runs ends after the kill. The runs still
succeed. The gateway is then SIGKILLed too and the planner stopped, with the usage on
disk; both are started again (new processes, same files), then cost accounting.

Both outboxes drain, and the ledger (its SQLite file, read directly) holds for every
outage run exactly the rows of its control twin: one per model call (the plan and the
join), one per tool execution, each once, under the caller's tenant, with the same
tokens and costs; and a run's ledger total is what its ``finished`` event reported when
nothing was down.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from pathlib import Path

from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis_cli.stack import outbox_paths

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
TENANT = "acme"
GOALS = (
    'Compute (17*23)+4, then sleep 1200 ms and echo "first"',
    'What is 2**10? Sleep 1200 ms and echo "second"',
    'Compute 6*7, sleep 1200 ms, echo "third"',
)
TOOL_COSTS = {"arithmetic": 1_000, "sleep": 2_000, "echo": 3_000}
#: arithmetic is cacheable by default: not here, so every run executes every node.
TOOLS_FILE = "version: 1\ntools:\n" + "".join(
    f"  - {{name: {name}, builtin: {name}, cache_ttl: 0, cost_nano_usd: {cost}}}\n"
    for name, cost in TOOL_COSTS.items()
)
#: Pace of the offline model's plan lines during the outage (a plan is 3 lines).
LINE_DELAY_MS = 400
DRAIN_TIMEOUT = 60.0


def outbox_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*-outbox.db"))


def count(path: Path) -> int:
    """Events waiting in an outbox file."""
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM usage_outbox").fetchone()[0])


def ledger(path: Path, prefix: str) -> list[tuple]:
    """The ledger rows of the runs ``{prefix}-*``, made comparable across prefixes: the
    run id without its prefix, model rows by step, tool rows by node."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT usage_id, tenant_id, run_id, node_id, kind, model, tool, input_tokens,"
            " output_tokens, cost_nano_usd, estimated FROM usage WHERE run_id LIKE ?",
            (f"{prefix}-%",),
        ).fetchall()
    out = []
    for usage_id, tenant, run_id, node_id, kind, model, tool, tin, tout, cost, est in rows:
        run = run_id.removeprefix(f"{prefix}-")
        if kind == "model":
            step = usage_id.removeprefix(f"{run_id}/")  # plan/0, join/0
            out.append((run, "model", step, tenant, model, tin, tout, cost, est))
        else:
            assert usage_id.startswith(f"{run_id}/{node_id}/tool/"), usage_id
            out.append((run, "tool", node_id, tenant, tool, tin, tout, cost, est))
    return sorted(out)


async def run_all(
    executor: ExecutorClient, prefix: str, *, on_all_started=None
) -> dict[str, list[executor_pb2.RunResponse]]:
    """Run every goal at once as ``{prefix}-{i}``; ``on_all_started()`` once all have
    their ``started`` event."""
    started = [asyncio.Event() for _ in GOALS]

    async def one(i: int) -> list[executor_pb2.RunResponse]:
        request = executor_pb2.RunRequest(run_id=f"{prefix}-{i}", goal=GOALS[i])
        events = []
        with context.request_scope(tenant_id=TENANT):
            async for event in executor.run(request):
                events.append(event)
                if event.WhichOneof("event") == "started":
                    started[i].set()
        return events

    async def watch() -> None:
        await asyncio.gather(*(event.wait() for event in started))
        if on_all_started is not None:
            on_all_started()

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(one(i) for i in range(len(GOALS))))
    finally:
        watcher.cancel()
    return {f"{prefix}-{i}": events for i, events in enumerate(results)}


def tool_executions(events: list[executor_pb2.RunResponse]) -> list[tuple[str, int]]:
    outcomes = [e.node_finished.outcome for e in events if e.WhichOneof("event") == "node_finished"]
    return sorted((o.node_id, o.cost_nano_usd) for o in outcomes if o.attempts > 0)


async def wait_until(predicate, what: str, within: float = DRAIN_TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {within:g}s"
        await asyncio.sleep(0.1)


async def test_usage_made_while_cost_accounting_is_down_arrives_exactly_once(
    process_stack, model, channels, tmp_path: Path
) -> None:
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS_FILE)
    outbox = {name: tmp_path / f"{name}-outbox.db" for name in ("planner", "toolgateway")}
    costs_db = tmp_path / "costs.db"
    stack = await process_stack(
        per_service={
            "planner": {"TRELLIS_OUTBOX_PATH": str(outbox["planner"])},
            "toolgateway": {
                "TRELLIS_OUTBOX_PATH": str(outbox["toolgateway"]),
                "TRELLIS_TOOLS_FILE": str(tools),
            },
        }
    )
    executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)

    # -- the control: cost accounting up all along ------------------------------------
    control = await run_all(executor, "up")
    assert all(events[-1].finished.status == SUCCEEDED for events in control.values())
    await wait_until(lambda: len(ledger(costs_db, "up")) == 3 * (2 + 3), "control rows")

    # -- the outage: cost accounting killed as soon as the runs have started ----------
    model.state.line_delay_ms = LINE_DELAY_MS
    outage = await run_all(executor, "down", on_all_started=stack.processes["costs"].kill)
    model.state.line_delay_ms = 0
    assert stack.processes["costs"].process.poll() is not None  # it was down throughout
    for events in outage.values():
        assert events[-1].finished.status == SUCCEEDED  # nobody waited for the ledger
        # the tools' costs come with their outcomes; the model calls' were not known (0)
        assert events[-1].finished.cost_nano_usd == sum(TOOL_COSTS.values())
    # every model call (plan, join) and tool execution is waiting on disk
    await wait_until(lambda: count(outbox["planner"]) == 3 * 2, "planner usage in its outbox")
    await wait_until(lambda: count(outbox["toolgateway"]) == 3 * 3, "tool usage in its outbox")

    # the processes that hold it go away, a crash and a graceful stop; new ones take over
    stack.processes["toolgateway"].kill()
    await stack.restart("planner")
    await stack.restart("costs")
    await stack.restart("toolgateway")
    await wait_until(
        lambda: count(outbox["planner"]) == 0 and count(outbox["toolgateway"]) == 0,
        "both outboxes drained",
    )
    await wait_until(lambda: len(ledger(costs_db, "down")) == 3 * (2 + 3), "outage rows")
    await asyncio.sleep(1.0)  # and nothing more arrives afterwards

    up, down = ledger(costs_db, "up"), ledger(costs_db, "down")
    assert down == up  # same rows, same tokens, same costs: as if nothing had been down
    kinds = Counter((run, kind, key) for run, kind, key, *_ in down)
    assert set(kinds.values()) == {1}  # each model call and each node once
    assert sorted(kinds) == sorted(
        (str(i), kind, key)
        for i in range(len(GOALS))
        for kind, key in (
            ("model", "plan/0"),
            ("model", "join/0"),
            ("tool", "n1"),
            ("tool", "n2"),
            ("tool", "n3"),
        )
    )
    assert {row[3] for row in down} == {TENANT}
    assert all(row[7] > 0 and row[8] == 0 for row in down)  # priced, exact tokens
    for run_id, events in outage.items():
        run = run_id.removeprefix("down-")
        tools_billed = sorted(
            (row[2], row[7]) for row in down if row[0] == run and row[1] == "tool"
        )
        assert tools_billed == tool_executions(events)
    for run_id, events in control.items():  # what the run reported with cost accounting up
        run = run_id.removeprefix("up-")
        total = sum(row[7] for row in down if row[0] == run)
        assert total == events[-1].finished.cost_nano_usd


async def test_the_embedded_stack_keeps_each_outbox_beside_its_database(
    stack, tmp_path: Path
) -> None:
    """Stacks in different directories never share an outbox (nor the checkout's one)."""
    assert outbox_files(tmp_path) == [
        "trellis-planner-outbox.db",
        "trellis-toolgateway-outbox.db",
    ]
    assert outbox_paths("postgresql://db/x", f"sqlite:///{tmp_path}/r.db") == {
        "planner": tmp_path / "r-planner-outbox.db",
        "toolgateway": tmp_path / "r-toolgateway-outbox.db",
    }
    assert outbox_paths("sqlite:///:memory:") == {}  # the settings' defaults then
