"""ToolGatewayService over real gRPC, beside a real cache service."""

import asyncio
import math
import platform
from pathlib import Path

import pytest

from trellis.clients.cache import CacheClient
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, from_value, seconds, to_struct
from trellis.runtime.errors import InvalidArgument, NotFound
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cache.service import NAME as CACHE_NAME
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED


def request(
    tool: str, args: dict, node_id: str = "n1", **kwargs
) -> toolgateway_pb2.InvokeToolRequest:
    call = common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args))
    return toolgateway_pb2.InvokeToolRequest(call=call, run_id="run-1", **kwargs)


@pytest.fixture
async def cache_server(serve):
    return await serve(CACHE_NAME, build_cache, CacheSettings(port=0, metrics_port=0))


@pytest.fixture
async def gateway(serve, channels, cache_server) -> ToolGatewayClient:
    settings = GatewaySettings(port=0, metrics_port=0, cache_target=cache_server.target)
    server = await serve(NAME, build, settings)
    return ToolGatewayClient(channels.get(server.target), timeout=10)


async def test_list_tools_has_the_builtins_with_schemas(gateway: ToolGatewayClient) -> None:
    tools = {t.name: t for t in await gateway.list_tools()}
    assert set(tools) == {
        "arithmetic", "run_command", "read_file", "list_dir", "sql_query", "sleep", "echo"
    }  # fmt: skip
    arithmetic = tools["arithmetic"]
    assert from_struct(arithmetic.input_schema)["required"] == ["expression"]
    result = from_struct(arithmetic.output_schema)["properties"]["result"]
    assert result["type"] == ["number", "string"]  # a string when a double cannot hold it
    assert (arithmetic.version, arithmetic.side_effects) == ("2", False)
    assert seconds(arithmetic.cache_ttl) == 3600
    assert seconds(tools["sleep"].cache_ttl) == seconds(tools["echo"].cache_ttl) == 0
    assert seconds(tools["run_command"].cache_ttl) == 3600
    assert "- `df -h`: " in tools["run_command"].description
    assert all(seconds(t.timeout) > 0 for t in tools.values())


async def test_unknown_tool_is_not_found(gateway: ToolGatewayClient) -> None:
    with pytest.raises(NotFound) as raised:
        await gateway.invoke(request("teleport", {}))
    assert raised.value.reason == "UNKNOWN_TOOL"
    assert raised.value.metadata == {"tool": "teleport"}


async def test_missing_tool_name_is_invalid_argument(gateway: ToolGatewayClient) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await gateway.invoke(toolgateway_pb2.InvokeToolRequest())
    assert [v.field for v in raised.value.violations] == ["call.tool"]


async def test_invalid_args_carry_field_violations(gateway: ToolGatewayClient) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await gateway.invoke(request("arithmetic", {"expression": 42}))
    assert raised.value.reason == "ARGS_INVALID"
    assert [(v.field, v.description) for v in raised.value.violations] == [
        ("args.expression", "42 is not of type 'string'")
    ]


async def test_invalid_expression_is_invalid_argument(gateway: ToolGatewayClient) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await gateway.invoke(request("arithmetic", {"expression": "__import__('os')"}))
    assert raised.value.reason == "INVALID_EXPRESSION"
    assert [v.field for v in raised.value.violations] == ["args.expression"]


async def test_failed_tool_is_an_outcome_not_an_error(gateway: ToolGatewayClient) -> None:
    outcome = await gateway.invoke(request("arithmetic", {"expression": "1 / 0"}))
    assert (outcome.status, outcome.error.code) == (FAILED, "ARITHMETIC_ERROR")


async def test_second_identical_call_is_served_from_the_cache(
    gateway: ToolGatewayClient, channels, cache_server
) -> None:
    first = await gateway.invoke(request("arithmetic", {"expression": "6 * 7"}, node_id="a"))
    second = await gateway.invoke(request("arithmetic", {"expression": "6 * 7"}, node_id="b"))
    assert (first.status, first.cache_hit) == (SUCCEEDED, False)
    assert (second.status, second.cache_hit, second.node_id) == (SUCCEEDED, True, "b")
    assert from_value(second.output) == from_value(first.output) == {"result": 42}
    stats = await CacheClient(channels.get(cache_server.target)).stats()
    assert (stats.entries, stats.hits) == (1, 1)


async def test_tenant_from_metadata_isolates_cache_entries(gateway: ToolGatewayClient) -> None:
    hits = []
    for tenant in ("acme", "globex", "acme"):
        with context.request_scope(tenant_id=tenant):  # sent as x-tenant-id
            outcome = await gateway.invoke(request("arithmetic", {"expression": "2 ** 8"}))
        hits.append(outcome.cache_hit)
    assert hits == [False, False, True]


async def test_bypass_neither_reads_nor_writes(gateway: ToolGatewayClient) -> None:
    bypass = common_pb2.CacheMode.CACHE_MODE_BYPASS
    call = request("arithmetic", {"expression": "3+3"}, cache_mode=bypass)
    for _ in range(2):
        outcome = await gateway.invoke(call)
        assert not outcome.cache_hit
    # Nothing was written, so a normal call misses too.
    assert not (await gateway.invoke(request("arithmetic", {"expression": "3+3"}))).cache_hit


async def test_run_command_runs_for_real(gateway: ToolGatewayClient) -> None:
    outcome = await gateway.invoke(request("run_command", {"command": "uname -a"}))
    output = from_value(outcome.output)
    assert outcome.status == SUCCEEDED
    assert output["exit_code"] == 0
    assert platform.system() in output["stdout"]


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("uname; touch {p}", "SHELL_SYNTAX_REJECTED"),
        ("uname -a && touch {p}", "SHELL_SYNTAX_REJECTED"),
        ("$(touch {p})", "SHELL_SYNTAX_REJECTED"),
        ("`touch {p}`", "SHELL_SYNTAX_REJECTED"),
        ("uname -a | touch {p}", "SHELL_SYNTAX_REJECTED"),
        ("uname\ntouch {p}", "SHELL_SYNTAX_REJECTED"),
        ("touch {p}", "COMMAND_NOT_ALLOWED"),
    ],
)
async def test_injection_never_runs(
    gateway: ToolGatewayClient, tmp_path: Path, template: str, reason: str
) -> None:
    sentinel = tmp_path / "sentinel"
    with pytest.raises(InvalidArgument) as raised:
        await gateway.invoke(request("run_command", {"command": template.format(p=sentinel)}))
    assert raised.value.reason == reason
    assert [v.field for v in raised.value.violations] == ["args.command"]
    await asyncio.sleep(0.2)  # anything started in the background would have run by now
    assert not sentinel.exists()


async def test_gateway_works_without_a_cache(serve, channels) -> None:
    settings = GatewaySettings(
        port=0, metrics_port=0, cache_target="127.0.0.1:1", cache_timeout_seconds=0.3
    )
    server = await serve(NAME, build, settings)
    gateway = ToolGatewayClient(channels.get(server.target), timeout=10)
    for _ in range(2):
        outcome = await gateway.invoke(request("arithmetic", {"expression": "1 + 1"}))
        assert (outcome.status, outcome.cache_hit) == (SUCCEEDED, False)
        assert from_value(outcome.output) == {"result": 2}


@pytest.mark.parametrize(
    ("changes", "reason", "fields"),
    [
        ({"run_id": "idc/a"}, "INVALID_ID", ["run_id"]),
        ({"node_id": "a/b"}, "INVALID_ID", ["call.node_id"]),
        ({"idempotency_key": "k\x00"}, "INVALID_ID", ["idempotency_key"]),
        ({"tool": "echo\n"}, "INVALID_ID", ["call.tool"]),
        ({"run_id": "r" * 60_000, "node_id": "../x"}, "INVALID_ID", ["run_id", "call.node_id"]),
        ({"args": {"value": "x" * 300_000}}, "ARGS_INVALID", ["call.args"]),
        ({"args": {"value": math.inf}}, "ARGS_INVALID", ["call.args"]),
    ],
)
async def test_ids_and_args_are_checked_before_the_tool_is_looked_up(
    gateway: ToolGatewayClient, changes: dict, reason: str, fields: list[str]
) -> None:
    call = common_pb2.ToolCall(
        node_id=changes.get("node_id", "n1"), tool=changes.get("tool", "echo")
    )
    args = changes.get("args", {"value": 1})
    call.args.update({k: (1 if isinstance(v, float) else v) for k, v in args.items()})
    for key, value in args.items():
        if isinstance(value, float):
            call.args.fields[key].number_value = value  # a Struct holds what JSON cannot
    invoke = toolgateway_pb2.InvokeToolRequest(
        call=call,
        run_id=changes.get("run_id", "run-1"),
        idempotency_key=changes.get("idempotency_key", ""),
    )
    with pytest.raises(InvalidArgument) as raised:
        await gateway.invoke(invoke)
    assert raised.value.reason == reason
    assert [v.field for v in raised.value.violations] == fields
