"""GrpcSource against a pure-Python ToolServerService (servers/grpc_tool_server.py) over a
real Channels channel: spec conversion and policy precedence, calls with tenant and
deadline propagation, and the mapping of tool errors, timeouts, an unreachable server
and contract violations."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.channels import Channels
from trellis.runtime.convert import duration, from_struct, from_value, to_struct
from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import Tool, ToolError
from trellis_toolgateway.tools.config import GrpcToolServer
from trellis_toolgateway.tools.grpc_source import (
    DEFAULT_INPUT_SCHEMA,
    DEFAULT_OUTPUT_SCHEMA,
    GrpcSource,
    spec_of,
)

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED


def _load_server_module() -> ModuleType:
    path = Path(__file__).parent / "servers" / "grpc_tool_server.py"
    spec = importlib.util.spec_from_file_location("trellis_test_grpc_tool_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


servers = _load_server_module()


@pytest.fixture
async def tool_server() -> AsyncIterator[object]:
    running = await servers.start()
    yield running
    await running.stop()


def config(target: str, **policy: object) -> GrpcToolServer:
    return GrpcToolServer(name="pyremote", target=target, prefix="py.", **policy)  # type: ignore[arg-type]


async def tools_of(source: GrpcSource) -> dict[str, Tool]:
    return {t.spec.name: t for t in await source.tools()}


async def test_lists_tools_with_the_servers_contract(tool_server, channels: Channels) -> None:
    source = GrpcSource(config(tool_server.target), channels.get(tool_server.target))
    tools = await tools_of(source)
    assert set(tools) == {f"py.{n}" for n in ("shout", "fail", "slow", "reject", "crash", "busy")}
    shout = tools["py.shout"].spec
    assert shout.description == "Upper-case a text."
    assert shout.input_schema == servers.TEXT
    assert shout.output_schema["properties"] == {"text": {"type": "string"}}
    # Nothing set in the config: the server's version, TTL and timeout apply.
    assert (shout.version, shout.cache_ttl, shout.timeout) == ("3", 60, 2.5)
    # A spec without schemas or policy gets permissive schemas and the config defaults.
    slow = tools["py.slow"].spec
    assert slow.input_schema == DEFAULT_INPUT_SCHEMA
    assert slow.output_schema == DEFAULT_OUTPUT_SCHEMA
    assert (slow.version, slow.cache_ttl, slow.timeout) == ("1", 0, 10)
    assert tools["py.fail"].spec.side_effects
    await source.aclose()  # the channel is the factory's: it keeps working
    assert await tools["py.shout"].run({"text": "still"}) == {"text": "STILL"}


def test_explicit_config_fields_override_the_server_and_side_effects_accumulate() -> None:
    remote = common_pb2.ToolSpec(
        name="t",
        version="3",
        input_schema=to_struct({"type": "object"}),
        cache_ttl=duration(60),
        timeout=duration(2.5),
        side_effects=False,
    )
    spec = spec_of(
        config(
            "x:1",
            version="9",
            cache_ttl=0,  # explicitly "never cache", though the server allows 60 s
            side_effects=True,
            max_concurrency=4,
            cost_nano_usd=5,
            shared_cache=True,
            retries=2,
        ),
        remote,
    )
    assert (spec.name, spec.version, spec.cache_ttl, spec.timeout) == ("py.t", "9", 0, 2.5)
    assert spec.side_effects and not spec.cacheable
    assert (spec.max_concurrency, spec.cost_nano_usd, spec.shared_cache, spec.retries) == (
        4,
        5,
        True,
        2,
    )
    # The server can make a tool side-effecting; the config cannot take it back.
    remote.side_effects = True
    assert spec_of(config("x:1", side_effects=False), remote).side_effects


async def test_calls_carry_the_remote_name_args_tenant_and_deadline(
    tool_server, channels: Channels
) -> None:
    source = GrpcSource(config(tool_server.target), channels.get(tool_server.target))
    tools = await tools_of(source)
    with context.request_scope(timeout=1.5, tenant_id="acme"):
        assert await tools["py.shout"].run({"text": "hello"}) == {"text": "HELLO"}
    received = tool_server.servicer.calls[-1]
    assert received.request.tool == "shout"  # the remote name, without the prefix
    assert from_struct(received.request.args) == {"text": "hello"}
    assert received.metadata["x-tenant-id"] == "acme"
    # Shortened to the caller's deadline (1.5 s, give or take gRPC's rounding), not the
    # tool's timeout (2.5 s).
    assert received.time_remaining is not None and 0 < received.time_remaining < 2.0


async def test_a_tool_error_response_is_a_failed_outcome_with_its_code(
    tool_server, channels: Channels
) -> None:
    source = GrpcSource(config(tool_server.target), channels.get(tool_server.target))
    tools = await tools_of(source)
    invoker = Invoker(ToolRegistry(list(tools.values())), None, trace.get_tracer(__name__))
    outcome = await invoker.invoke(Call(tool="py.fail", args={}, node_id="n7"))
    assert outcome.status == FAILED
    assert (outcome.error.code, outcome.error.message) == ("QUOTA_GONE", "no quota left")
    assert outcome.error.retryable
    assert dict(outcome.error.details) == {"server": "pyremote", "left": "0"}

    ok = await invoker.invoke(Call(tool="py.shout", args={"text": "a"}))
    assert ok.status == SUCCEEDED and from_value(ok.output) == {"text": "A"}


async def test_invalid_argument_from_the_server_is_a_contract_violation(
    tool_server, channels: Channels
) -> None:
    source = GrpcSource(config(tool_server.target), channels.get(tool_server.target))
    tools = await tools_of(source)
    with pytest.raises(InvalidArgument, match=r"args\.text is required"):
        await tools["py.reject"].run({})
    # Through the invoker it stays an RPC error, not a FAILED outcome.
    invoker = Invoker(ToolRegistry(list(tools.values())), None, trace.get_tracer(__name__))
    with pytest.raises(InvalidArgument):
        await invoker.invoke(Call(tool="py.reject", args={}))


async def test_the_tool_timeout_is_the_rpc_deadline(tool_server, channels: Channels) -> None:
    source = GrpcSource(config(tool_server.target, timeout=0.2), channels.get(tool_server.target))
    tools = await tools_of(source)
    with pytest.raises(ToolError) as raised:
        await tools["py.slow"].run({"seconds": 5})
    assert (raised.value.code, raised.value.retryable) == ("TOOL_TIMEOUT", True)
    assert raised.value.details["grpc_code"] == "DEADLINE_EXCEEDED"


async def test_an_expired_caller_deadline_is_a_timeout(tool_server, channels: Channels) -> None:
    source = GrpcSource(config(tool_server.target), channels.get(tool_server.target))
    tools = await tools_of(source)
    calls = len(tool_server.servicer.calls)
    with context.request_scope(timeout=-1), pytest.raises(ToolError) as raised:
        await tools["py.shout"].run({"text": "late"})
    assert raised.value.code == "TOOL_TIMEOUT"
    assert len(tool_server.servicer.calls) == calls  # never sent


@pytest.mark.parametrize(
    ("tool", "code", "retryable"),
    [("crash", "TOOL_SERVER_INTERNAL", False), ("busy", "TOOL_SERVER_RESOURCE_EXHAUSTED", True)],
)
async def test_other_status_codes_are_tool_server_errors(
    tool_server, channels: Channels, tool: str, code: str, retryable: bool
) -> None:
    source = GrpcSource(config(tool_server.target), channels.get(tool_server.target))
    tools = await tools_of(source)
    with pytest.raises(ToolError) as raised:
        await tools[f"py.{tool}"].run({})
    assert (raised.value.code, raised.value.retryable) == (code, retryable)


async def test_an_unreachable_server_is_unavailable(channels: Channels) -> None:
    running = await servers.start()
    target = running.target
    source = GrpcSource(config(target), channels.get(target))
    tools = await tools_of(source)
    await running.stop()

    with pytest.raises(ToolError) as raised:
        await tools["py.shout"].run({"text": "anyone?"})
    assert (raised.value.code, raised.value.retryable) == ("TOOL_SERVER_UNAVAILABLE", True)
    with pytest.raises(ToolError) as listing:
        await source.tools()
    assert listing.value.code == "TOOL_SERVER_UNAVAILABLE"

    # Back on the same port: the same source and channel recover (once the channel's
    # reconnect backoff has run out, hence a few tries).
    restarted = await servers.start(int(target.rsplit(":", 1)[1]))
    try:
        for _ in range(50):
            try:
                output = await tools["py.shout"].run({"text": "back"})
                break
            except ToolError as error:
                assert error.code == "TOOL_SERVER_UNAVAILABLE"
                await asyncio.sleep(0.1)
        assert output == {"text": "BACK"}
    finally:
        await restarted.stop()


# -- batches (CallTools) ------------------------------------------------------------------


async def _batched_invoker(tool_server, channels: Channels) -> Invoker:
    batch = {"max_items": 8, "max_wait_ms": 50}
    source = GrpcSource(config(tool_server.target, batch=batch), channels.get(tool_server.target))
    tools = await tools_of(source)
    assert tools["py.shout"].spec.batch_max_items == 8
    return Invoker(ToolRegistry(list(tools.values())), None, trace.get_tracer(__name__))


async def _shout_all(invoker: Invoker, *texts: str) -> list[common_pb2.NodeOutcome]:
    return list(
        await asyncio.gather(
            *(
                invoker.invoke(
                    Call("py.shout", {"text": t}, node_id=f"n{i}"),
                    run_id="r1",
                    idempotency_key=f"r1/n{i}",
                )
                for i, t in enumerate(texts)
            )
        )
    )


async def test_calls_together_are_one_call_tools_with_each_calls_ids(
    tool_server, channels: Channels
) -> None:
    invoker = await _batched_invoker(tool_server, channels)
    outcomes = await _shout_all(invoker, "a", "boom", "c")
    (batch,) = tool_server.servicer.batches
    # shout has no side effects: its calls run without their idempotency keys
    assert [(c.tool, c.run_id, c.node_id, c.idempotency_key) for c in batch] == [
        ("shout", "r1", "n0", ""),
        ("shout", "r1", "n1", ""),
        ("shout", "r1", "n2", ""),
    ]
    assert tool_server.servicer.calls == []  # no CallTool at all
    assert [o.status for o in outcomes] == [SUCCEEDED, FAILED, SUCCEEDED]
    assert [from_value(o.output) for o in (outcomes[0], outcomes[2])] == [
        {"text": "A"},
        {"text": "C"},
    ]
    assert (outcomes[1].error.code, outcomes[1].error.details["server"]) == (
        "CANNOT_SHOUT",
        "pyremote",
    )


async def test_a_server_without_call_tools_is_called_item_by_item(
    tool_server, channels: Channels
) -> None:
    tool_server.servicer.batching = False
    invoker = await _batched_invoker(tool_server, channels)
    outcomes = await _shout_all(invoker, "a", "b")
    assert [from_value(o.output) for o in outcomes] == [{"text": "A"}, {"text": "B"}]
    assert sorted(r.request.node_id for r in tool_server.servicer.calls) == ["n0", "n1"]
    tool_server.servicer.batching = True  # it is not asked again
    await _shout_all(invoker, "c", "d")
    assert tool_server.servicer.batches == [] and len(tool_server.servicer.calls) == 4


async def test_a_side_effecting_call_carries_its_run_node_and_idempotency_key(
    tool_server, channels: Channels
) -> None:
    source = GrpcSource(config(tool_server.target), channels.get(tool_server.target))
    invoker = Invoker(ToolRegistry(await source.tools()), None, trace.get_tracer(__name__))
    await invoker.invoke(Call("py.fail", {}, node_id="n9"), run_id="r2", idempotency_key="r2/n9")
    (received,) = tool_server.servicer.calls
    assert (received.request.run_id, received.request.node_id) == ("r2", "n9")
    assert received.request.idempotency_key == "r2/n9"
