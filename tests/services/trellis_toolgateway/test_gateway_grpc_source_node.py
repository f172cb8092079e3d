"""The gateway calls the Node.js example tool server (examples/node-tool-server) through
GrpcSource and the Invoker: listing, outputs, the tool's own error path, input schema
validation before the server is called, the server's own contract check, batches
(CallTools), and SIGTERM.

Needs node and examples/node-tool-server/node_modules (``make install`` installs them)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.runtime.channels import Channels
from trellis.runtime.convert import from_value
from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import Tool
from trellis_toolgateway.tools.config import GrpcToolServer
from trellis_toolgateway.tools.grpc_source import GrpcSource

ROOT = Path(__file__).resolve().parents[3]
NODE_DIR = ROOT / "examples" / "node-tool-server"
SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
FAILED = common_pb2.NodeStatus.NODE_STATUS_FAILED


@dataclass
class NodeServer:
    process: asyncio.subprocess.Process
    port: int
    #: "call <tool>" lines the server printed, one per CallTool it received ("calls <tool>
    #: x<n>" per CallTools).
    calls: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def read_calls(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.calls.append(line.decode().strip())

    async def wait_for_call(self, tool: str, count: int) -> None:
        for _ in range(200):
            if self.calls.count(f"call {tool}") >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the server did not log call {tool} x{count}: {self.calls}")

    async def terminate(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), 10)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            if self.reader is not None:
                await self.reader


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the Node tool server test needs Node.js (v18+)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            "examples/node-tool-server/node_modules is missing: run `make install` "
            "(or `npm install --prefix examples/node-tool-server`)"
        )
    return node


async def start_node_server() -> NodeServer:
    # PORT=0: the server binds a free port and prints it, so there is no race for one.
    env = {**os.environ, "PORT": "0", "LOG_CALLS": "1"}
    process = await asyncio.create_subprocess_exec(
        require_node(), "server.js", cwd=NODE_DIR, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if not line.startswith("listening "):
        process.kill()
        await process.wait()
        pytest.fail(f"the Node tool server did not start: {line!r}")
    server = NodeServer(process, int(line.split()[1]))
    server.reader = asyncio.create_task(server.read_calls())
    return server


@pytest.fixture
async def node_server() -> AsyncIterator[NodeServer]:
    server = await start_node_server()
    yield server
    await server.terminate()


@pytest.fixture
async def node_tools(node_server: NodeServer, channels: Channels) -> dict[str, Tool]:
    config = GrpcToolServer(name="node", target=node_server.target, prefix="node.")
    source = GrpcSource(config, channels.get(node_server.target))
    return {t.spec.name: t for t in await source.tools()}


@pytest.fixture
def invoker(node_tools: dict[str, Tool]) -> Invoker:
    return Invoker(ToolRegistry(list(node_tools.values())), None, trace.get_tracer(__name__))


async def test_lists_the_node_servers_tools(node_tools: dict[str, Tool]) -> None:
    assert set(node_tools) == {"node.word_count", "node.reverse"}
    word_count = node_tools["node.word_count"].spec
    assert word_count.description == "Count the words and characters of a text."
    assert word_count.input_schema["required"] == ["text"]
    assert word_count.input_schema["additionalProperties"] is False
    assert word_count.output_schema["required"] == ["words", "chars"]
    # The Node server's Durations arrive as the gateway's policy.
    assert (word_count.cache_ttl, word_count.timeout) == (3600, 5)


async def test_calls_the_node_tools_through_the_invoker(
    invoker: Invoker, node_server: NodeServer
) -> None:
    counted = await invoker.invoke(
        Call(tool="node.word_count", args={"text": "the quick  brown fox\n"}, node_id="n1")
    )
    assert counted.status == SUCCEEDED, counted.error
    assert from_value(counted.output) == {"words": 4, "chars": 21}

    reversed_ = await invoker.invoke(Call(tool="node.reverse", args={"text": "héllo wörld 👋"}))
    assert reversed_.status == SUCCEEDED, reversed_.error
    assert from_value(reversed_.output) == {"text": "👋 dlröw olléh"}
    await node_server.wait_for_call("reverse", 1)
    assert node_server.calls == ["call word_count", "call reverse"]


async def test_a_too_long_text_is_a_failed_outcome_with_the_servers_code(invoker: Invoker) -> None:
    outcome = await invoker.invoke(Call(tool="node.reverse", args={"text": "x" * 10_001}))
    assert outcome.status == FAILED
    assert outcome.error.code == "TEXT_TOO_LONG"
    assert "at most 10000" in outcome.error.message
    assert not outcome.error.retryable
    assert dict(outcome.error.details) == {"server": "node", "max_chars": "10000"}


async def test_arguments_are_validated_before_the_server_is_called(
    invoker: Invoker, node_server: NodeServer
) -> None:
    for args, field_name in [
        ({"text": 42}, "args.text"),
        ({}, "args.text"),
        ({"text": "a", "x": 1}, "args"),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            await invoker.invoke(Call(tool="node.word_count", args=args))
        assert raised.value.reason == "ARGS_INVALID"  # the gateway's check, not the server's
        assert [v.field for v in raised.value.violations] == [field_name]
    # A valid call afterwards is the first (and only) one the server logs.
    ok = await invoker.invoke(Call(tool="node.word_count", args={"text": "a b"}))
    assert ok.status == SUCCEEDED
    await node_server.wait_for_call("word_count", 1)
    assert node_server.calls == ["call word_count"]


async def test_the_server_rejects_a_contract_violation_the_gateway_let_through(
    node_tools: dict[str, Tool],
) -> None:
    # Calling the tool directly skips the gateway's validation: the server's own
    # INVALID_ARGUMENT comes back as the same contract violation.
    with pytest.raises(InvalidArgument, match=r"args\.text must be a string"):
        await node_tools["node.reverse"].run({"text": 7})


async def test_calls_together_are_one_call_tools_and_fail_alone(
    node_server: NodeServer, channels: Channels
) -> None:
    batch = {"max_items": 10, "max_wait_ms": 100}
    config = GrpcToolServer(name="node", target=node_server.target, prefix="node.", batch=batch)
    tools = await GrpcSource(config, channels.get(node_server.target)).tools()
    invoker = Invoker(ToolRegistry(tools), None, trace.get_tracer(__name__))
    texts = ["one two", "x" * 10_001, "three"]
    outcomes = await asyncio.gather(
        *(
            invoker.invoke(Call("node.word_count", {"text": t}, node_id=f"n{i}"))
            for i, t in enumerate(texts)
        )
    )
    assert [o.status for o in outcomes] == [SUCCEEDED, FAILED, SUCCEEDED]
    assert from_value(outcomes[0].output) == {"words": 2, "chars": 7}
    assert from_value(outcomes[2].output) == {"words": 1, "chars": 5}
    assert outcomes[1].error.code == "TEXT_TOO_LONG"
    for _ in range(200):
        if node_server.calls:
            break
        await asyncio.sleep(0.01)
    assert node_server.calls == ["calls word_count x3"]


async def test_the_node_server_exits_cleanly_on_sigterm() -> None:
    server = await start_node_server()
    assert await server.terminate() == 0
