"""Input at the edge, end to end over real gRPC, with the executor's runs in PostgreSQL:
every identifier, size and byte a caller gets wrong is INVALID_ARGUMENT naming the field
(google.rpc.BadRequest) before anything is stored or run, never INTERNAL or UNKNOWN, and
no error's trailers come near gRPC's metadata limit.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc import aio

from tests.malformed import CORRUPT, TRUNCATED, deep_struct, field, invalid_utf8
from trellis.cache.v1 import cache_pb2, cache_pb2_grpc
from trellis.common.v1 import common_pb2
from trellis.costs.v1 import costs_pb2, costs_pb2_grpc
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.planner.v1 import planner_pb2, planner_pb2_grpc
from trellis.runtime.convert import from_value, to_struct
from trellis.runtime.errors import InvalidArgument, NotFound, from_rpc_error
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc
from trellis_cli.stack import Stack, start_stack

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
#: gRPC clients drop a status whose metadata is over 8 KiB (their default limit).
METADATA_LIMIT = 8 * 1024

TOOLS = """
version: 1
sandbox_root: .
tools:
  - name: echo
    builtin: echo
  - name: side_echo
    builtin: echo
    side_effects: true
"""


@pytest.fixture
async def stack(postgres_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    """The embedded stack; the executor's run store is a fresh PostgreSQL database."""
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS)
    running = await start_stack(
        database_url=postgres_url,
        costs_database_url=f"sqlite:///{tmp_path}/costs.db",
        tools_file=tools,
        tools_reload_seconds=0,
    )
    yield running
    await running.stop()


def node(node_id: str, tool: str = "echo", deps=(), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def executor(stack: Stack, channels) -> executor_pb2_grpc.ExecutorServiceStub:
    return executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))


async def run(stub, request: executor_pb2.RunRequest) -> list[executor_pb2.RunResponse]:
    return [event async for event in stub.Run(request, timeout=60)]


async def refused(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    """The RpcError ``call`` (a unary call or a response stream) ends with."""
    with pytest.raises(grpc.RpcError) as raised:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return raised.value


def invalid(error: grpc.RpcError, reason: str, *fields: str) -> InvalidArgument:
    """``error`` is INVALID_ARGUMENT with ``reason``, naming exactly ``fields``, in
    trailers far below the metadata limit."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    trailers = error.trailing_metadata() or ()
    assert sum(len(k) + len(v) for k, v in trailers) < METADATA_LIMIT
    domain = from_rpc_error(error)
    assert isinstance(domain, InvalidArgument)
    assert domain.reason == reason, domain
    assert [v.field for v in domain.violations] == list(fields), domain.violations
    return domain


async def stored_runs(postgres_url: str) -> int:
    conn = await asyncpg.connect(postgres_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM runs")
    finally:
        await conn.close()


async def test_a_path_like_node_id_is_refused_naming_the_field(
    stack, channels, postgres_url
) -> None:
    stub = executor(stack, channels)
    request = executor_pb2.RunRequest(run_id="edge-1", plan=[node("ok"), node("../../etc")])
    error = invalid(await refused(stub.Run(request)), "INVALID_PLAN", "plan[1].node_id")
    assert "'../../etc'" in error.violations[0].description
    depends = executor_pb2.RunRequest(plan=[node("a"), node("b", deps=["../a"])])
    invalid(await refused(stub.Run(depends)), "INVALID_PLAN", "plan[1].depends_on[0]")
    with pytest.raises(NotFound):  # nothing was stored
        raise from_rpc_error(
            await refused(stub.GetRun(executor_pb2.GetRunRequest(run_id="edge-1")))
        )
    assert await stored_runs(postgres_url) == 0


async def test_idempotency_keys_of_two_runs_cannot_collide(stack, channels) -> None:
    """Run ``idc/a`` node ``b`` and run ``idc`` node ``a/b`` once shared the key
    ``idc/a/b``: the second side effect never happened. Neither id may hold ``/`` now,
    at the executor's front door and at the gateway's, so ``run_id/node_id`` names one
    node of one run; neighbouring ids still get a side effect each."""
    stub = executor(stack, channels)
    one = executor_pb2.RunRequest(run_id="idc/a", plan=[node("b", "side_echo", value=1)])
    invalid(await refused(stub.Run(one)), "INVALID_ID", "run_id")
    two = executor_pb2.RunRequest(run_id="idc", plan=[node("a/b", "side_echo", value=2)])
    invalid(await refused(stub.Run(two)), "INVALID_PLAN", "plan[0].node_id")

    gateway = toolgateway_pb2_grpc.ToolGatewayServiceStub(channels.get(stack.target("toolgateway")))
    for run_id, node_id, bad in (("idc/a", "b", "run_id"), ("idc", "a/b", "call.node_id")):
        request = toolgateway_pb2.InvokeToolRequest(
            call=node(node_id, "side_echo", value=1),
            run_id=run_id,
            idempotency_key=f"{run_id}/{node_id}",
        )
        invalid(await refused(gateway.InvokeTool(request, timeout=10)), "INVALID_ID", bad)

    outputs = []
    for run_id, node_id, value in (("idc-a", "b", 1), ("idc", "a-b", 2)):
        request = executor_pb2.RunRequest(
            run_id=run_id, plan=[node(node_id, "side_echo", value=value)]
        )
        events = await run(stub, request)
        assert events[-1].finished.status == SUCCEEDED, events[-1].finished
        outcome = next(e.node_finished.outcome for e in events if e.HasField("node_finished"))
        assert outcome.attempts == 1  # ran, not replayed from the other run's key
        outputs.append(from_value(outcome.output))
    assert outputs == [1, 2]


async def test_nul_in_goal_run_id_or_node_id_is_invalid_argument_on_postgres(
    stack, channels, postgres_url
) -> None:
    stub = executor(stack, channels)
    cases = [
        (executor_pb2.RunRequest(goal="What is 1+1?\x00"), "INVALID_GOAL", "goal"),
        (executor_pb2.RunRequest(goal="What is 1+1?", run_id="r\x00"), "INVALID_ID", "run_id"),
        (executor_pb2.RunRequest(plan=[node("n\x001")]), "INVALID_PLAN", "plan[0].node_id"),
    ]
    for request, reason, name in cases:
        invalid(await refused(stub.Run(request)), reason, name)
    for lookup in (
        stub.GetRun(executor_pb2.GetRunRequest(run_id="r\x00"), timeout=10),
        stub.CancelRun(executor_pb2.CancelRunRequest(run_id="r\x00"), timeout=10),
        stub.ResumeRun(executor_pb2.ResumeRunRequest(run_id="r\x00"), timeout=10),
    ):
        invalid(await refused(lookup), "INVALID_ID", "run_id")
    assert await stored_runs(postgres_url) == 0
    # the store is fine: a good run goes through
    events = await run(stub, executor_pb2.RunRequest(run_id="after-nul", plan=[node("a", value=1)]))
    assert events[-1].finished.status == SUCCEEDED
    assert await stored_runs(postgres_url) == 1


async def test_a_60_kb_run_id_is_refused_with_a_short_quote(stack, channels) -> None:
    stub = executor(stack, channels)
    run_id = "r" * 60_000
    calls = [
        stub.Run(executor_pb2.RunRequest(run_id=run_id, goal="What is 1+1?"), timeout=10),
        stub.GetRun(executor_pb2.GetRunRequest(run_id=run_id), timeout=10),
        stub.CancelRun(executor_pb2.CancelRunRequest(run_id=run_id), timeout=10),
        stub.ResumeRun(executor_pb2.ResumeRunRequest(run_id=run_id), timeout=10),
    ]
    for call in calls:
        error = invalid(await refused(call), "INVALID_ID", "run_id")
        quoted = "'" + "r" * 32 + "'…"
        assert quoted in error.message and quoted in error.violations[0].description
        assert "r" * 33 not in error.message


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("corrupt", CORRUPT),
        ("truncated", TRUNCATED),
        ("invalid utf-8 in goal", invalid_utf8(1)),
        ("invalid utf-8 in run_id", field(1, b"goal") + invalid_utf8(4)),
        (
            "args nested past the depth limit",
            field(2, field(1, b"a") + field(2, b"echo") + field(3, deep_struct(60))),
        ),
    ],
)
async def test_undecodable_run_requests_are_malformed_request(
    stack, name: str, data: bytes
) -> None:
    async with aio.insecure_channel(stack.executor_target) as channel:
        raw = channel.unary_stream(
            "/trellis.executor.v1.ExecutorService/Run",
            request_serializer=None,
            response_deserializer=executor_pb2.RunResponse.FromString,
        )
        error = await refused(raw(data, timeout=10))
    domain = invalid(error, "MALFORMED_REQUEST")
    assert "RunRequest" in domain.message or "Struct" in domain.message


async def test_a_120000_character_goal_is_refused_before_the_model(stack, channels) -> None:
    assert stack.model is not None
    before = len(stack.model.requests)
    goal = "What is 1+1? " + "x" * 120_000
    error = invalid(
        await refused(executor(stack, channels).Run(executor_pb2.RunRequest(goal=goal))),
        "GOAL_TOO_LARGE",
        "goal",
    )
    assert "over the limit of 32768" in error.violations[0].description
    # the planner holds its own requests to the same bound (TRELLIS_MAX_GOAL_BYTES)
    planner = planner_pb2_grpc.PlannerServiceStub(channels.get(stack.target("planner")))
    request = planner_pb2.PlanRequest(run_id="direct", goal=goal)
    invalid(await refused(planner.Plan(request, timeout=10)), "GOAL_TOO_LARGE", "goal")
    join = planner_pb2.JoinRequest(run_id="a/b", goal="fine")
    invalid(await refused(planner.Join(join, timeout=10)), "INVALID_ID", "run_id")
    assert len(stack.model.requests) == before


async def test_each_services_own_entry_checks_its_ids(stack, channels) -> None:
    gateway = toolgateway_pb2_grpc.ToolGatewayServiceStub(channels.get(stack.target("toolgateway")))
    nan = node("n1", value=1)
    nan.args.fields["value"].number_value = math.nan
    request = toolgateway_pb2.InvokeToolRequest(call=nan, run_id="r1", idempotency_key="r1/n1")
    invalid(await refused(gateway.InvokeTool(request, timeout=10)), "ARGS_INVALID", "call.args")
    request = toolgateway_pb2.InvokeToolRequest(call=node("n1"), idempotency_key="k\x00")
    invalid(await refused(gateway.InvokeTool(request, timeout=10)), "INVALID_ID", "idempotency_key")

    costs = costs_pb2_grpc.CostAccountingServiceStub(channels.get(stack.target("costs")))
    usage = costs_pb2.RecordUsageRequest(
        usage_id="u\x00",
        run_id="r" * 200,
        node_id="a/b",
        kind=costs_pb2.USAGE_KIND_TOOL,
        tool="echo",
    )
    invalid(
        await refused(costs.RecordUsage(usage, timeout=10)),
        "INVALID_USAGE",
        "usage_id",
        "run_id",
        "node_id",
    )
    report = costs_pb2.GetUsageRequest(tenant_id="../other")
    invalid(await refused(costs.GetUsage(report, timeout=10)), "INVALID_ID", "tenant_id")

    cache = cache_pb2_grpc.CacheServiceStub(channels.get(stack.target("cache")))
    get = cache_pb2.GetRequest(key="key\nwith newline")
    invalid(await refused(cache.Get(get, timeout=10)), "INVALID_ID", "key")
    put = cache_pb2.SetRequest(key="k", value=b"v", tags=["ok", "bad tag"])
    invalid(await refused(cache.Set(put, timeout=10)), "INVALID_ID", "tags[1]")
