"""Tool usage: one ledger row per execution that reached a backend, with its cost.

Over real gRPC (gateway, cache, cost accounting, its SQLite ledger read directly): a
repeated execution is counted again, a cache hit, a single-flight follower and an
idempotent replay are not, retries are in the one row's cost; usage cost accounting
missed arrives once it is back, under the caller's tenant. In the core: InvokeTool
answers without waiting for cost accounting.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from tests.support.gateway_registries import builtin_registry
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.clients.usage_outbox import UsageOutbox
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis.runtime.ports import free_port
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cache.service import NAME as CACHE
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_costs.service import NAME as COSTS
from trellis_costs.service import build as build_costs
from trellis_costs.settings import CostsSettings
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings
from trellis_toolgateway.tool_usage import ToolUsage

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED

TOOLS = """\
version: 1
tools:
  - {name: echo, builtin: echo, cost_nano_usd: 3000}
  - {name: arithmetic, builtin: arithmetic, cost_nano_usd: 1000}
  - {name: echo_once, builtin: echo, side_effects: true, cost_nano_usd: 7000}
  - {name: flaky_sleep, builtin: sleep, timeout: 0.05, retries: 2, cost_nano_usd: 2000}
"""


def request(tool: str, node_id: str, **args: object) -> toolgateway_pb2.InvokeToolRequest:
    call = common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args))
    return toolgateway_pb2.InvokeToolRequest(call=call, run_id="r1")


def ledger_rows(path: Path) -> list[tuple[str, str, str, str, str, str, int]]:
    """(tenant, usage_id, run, node, kind, tool, cost) of the ledger, by node."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT tenant_id, usage_id, run_id, node_id, kind, tool, cost_nano_usd FROM usage"
            " ORDER BY node_id, usage_id"
        ).fetchall()


def outbox_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM usage_outbox").fetchone()[0])


async def wait_for(predicate, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "not within time"
        await asyncio.sleep(0.05)


async def start_gateway(serve, channels, tmp_path: Path, costs_target: str) -> ToolGatewayClient:
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS)
    cache = await serve(CACHE, build_cache, CacheSettings(port=0, metrics_port=0))
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        tools_file=tools,
        cache_target=cache.target,
        costs_target=costs_target,
        outbox_path=tmp_path / "gateway-outbox.db",
    )
    server = await serve(NAME, build, settings)
    return ToolGatewayClient(channels.get(server.target), timeout=10)


async def start_costs(serve, ledger: Path, port: int = 0):
    return await serve(
        COSTS,
        build_costs,
        CostsSettings(port=port, metrics_port=0, database_url=f"sqlite:///{ledger}"),
    )


async def test_each_execution_is_one_row_with_its_cost(serve, channels, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    costs = await start_costs(serve, ledger)
    gateway = await start_gateway(serve, channels, tmp_path, costs.target)
    with context.request_scope(tenant_id="acme"):
        # run twice: the executor retrying a node runs (and pays for) it again
        first = await gateway.invoke(request("echo", "n1", value="hi"))
        again = await gateway.invoke(request("echo", "n1", value="hi"))
        # cacheable: the second is a cache hit, nothing ran
        computed = await gateway.invoke(request("arithmetic", "n2", expression="2+3"))
        hit = await gateway.invoke(request("arithmetic", "n2", expression="2+3"))
        # side-effecting with a key: the second is the first's outcome replayed
        keyed = request("echo_once", "n3", value="once")
        keyed.idempotency_key = "r1/n3"
        once = await gateway.invoke(keyed)
        replay = await gateway.invoke(keyed)
        # three attempts, all timing out: one execution, paid three times
        flaky = await gateway.invoke(request("flaky_sleep", "n4", ms=1000))
        # identical concurrent calls share one flight: one ran, one followed
        shared = await asyncio.gather(
            gateway.invoke(request("arithmetic", "n5", expression="6*7")),
            gateway.invoke(request("arithmetic", "n6", expression="6*7")),
        )
    assert (first.attempts, again.attempts, first.cost_nano_usd) == (1, 1, 3000)
    assert computed.cost_nano_usd == 1000 and hit.cache_hit and hit.attempts == 0
    assert once.cost_nano_usd == 7000 and replay.output == once.output
    assert flaky.status == FAILED and flaky.attempts == 3 and flaky.cost_nano_usd == 6000
    assert sorted(o.attempts for o in shared) == [0, 1]
    leader = next(o for o in shared if o.attempts == 1).node_id

    await wait_for(lambda: len(ledger_rows(ledger)) >= 6)
    await asyncio.sleep(0.3)  # nothing more arrives
    rows = ledger_rows(ledger)
    assert [(node, tool, cost) for _, _, _, node, _, tool, cost in rows] == sorted(
        [
            ("n1", "echo", 3000),
            ("n1", "echo", 3000),
            ("n2", "arithmetic", 1000),
            ("n3", "echo_once", 7000),
            ("n4", "flaky_sleep", 6000),
            (leader, "arithmetic", 1000),
        ]
    )
    assert {(tenant, run, kind) for tenant, _, run, _, kind, _, _ in rows} == {
        ("acme", "r1", "tool")
    }
    for _, usage_id, _, node, _, _, _ in rows:
        assert usage_id.startswith(f"r1/{node}/tool/")
    assert len({usage_id for _, usage_id, *_ in rows}) == 6
    assert outbox_count(tmp_path / "gateway-outbox.db") == 0


async def test_usage_missed_while_costs_is_down_arrives_once_it_is_back(
    serve, channels, tmp_path: Path
) -> None:
    port = free_port()  # cost accounting comes up here later
    gateway = await start_gateway(serve, channels, tmp_path, f"127.0.0.1:{port}")
    with context.request_scope(tenant_id="globex"):
        outcome = await gateway.invoke(request("echo", "n1", value=1))
    assert outcome.status == SUCCEEDED and outcome.cost_nano_usd == 3000
    outbox = tmp_path / "gateway-outbox.db"
    await wait_for(lambda: outbox_count(outbox) == 1)

    ledger = tmp_path / "ledger.db"
    await start_costs(serve, ledger, port)
    await wait_for(lambda: outbox_count(outbox) == 0 and len(ledger_rows(ledger)) == 1)
    [(tenant, _, run, node, kind, tool, cost)] = ledger_rows(ledger)
    assert (tenant, run, node, kind, tool, cost) == ("globex", "r1", "n1", "tool", "echo", 3000)


async def test_the_call_does_not_wait_for_cost_accounting(tmp_path: Path) -> None:
    answer = asyncio.Event()
    sent: list[costs_pb2.RecordUsageRequest] = []

    async def slow_costs(r: costs_pb2.RecordUsageRequest) -> costs_pb2.RecordUsageResponse:
        sent.append(r)
        await answer.wait()
        return costs_pb2.RecordUsageResponse(cost_nano_usd=r.tool_cost_nano_usd)

    outbox = await UsageOutbox.open(tmp_path / "o.db", slow_costs, send_timeout=30)
    invoker = Invoker(
        builtin_registry(), None, TracerProvider().get_tracer("t"), usage=ToolUsage(outbox)
    )
    try:
        call = Call(tool="echo", args={"value": 1}, node_id="n1")
        outcome = await asyncio.wait_for(invoker.invoke(call, run_id="r1"), 2)
        assert outcome.status == SUCCEEDED
        await wait_for(lambda: len(sent) == 1, within=2)
        assert outbox.pending == 0  # in flight, not failed
        answer.set()
    finally:
        await outbox.aclose()
    [recorded] = sent
    assert (recorded.kind, recorded.tool, recorded.run_id, recorded.node_id) == (
        costs_pb2.USAGE_KIND_TOOL,
        "echo",
        "r1",
        "n1",
    )
    assert outbox.pending == 0 and outbox_count(tmp_path / "o.db") == 0


def test_outbox_path_is_checked_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a directory"):
        GatewaySettings(outbox_path=tmp_path)
    with pytest.raises(ValueError, match="lost on restart"):
        GatewaySettings(outbox_path=":memory:")
