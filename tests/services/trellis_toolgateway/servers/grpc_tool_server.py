"""A pure-Python ``trellis.tools.v1.ToolServerService`` for the GrpcSource tests.

Faster than the Node example and scriptable: each tool exercises one mapping (an output,
a tool error, a slow call, a contract violation, other gRPC codes), and every request and
its metadata and deadline are recorded so tests can check what reached the server.
Loaded by path from the tests (tests are not a package).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import duration, from_struct, to_struct, to_value
from trellis.tools.v1 import tools_pb2, tools_pb2_grpc

TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def specs() -> list[common_pb2.ToolSpec]:
    return [
        common_pb2.ToolSpec(
            name="shout",
            description="Upper-case a text.",
            version="3",
            input_schema=to_struct(TEXT),
            output_schema=to_struct({"type": "object", "properties": {"text": {"type": "string"}}}),
            cache_ttl=duration(60),
            timeout=duration(2.5),
        ),
        common_pb2.ToolSpec(name="fail", description="Fails as a tool.", side_effects=True),
        common_pb2.ToolSpec(name="slow", description="Sleeps for args.seconds."),
        common_pb2.ToolSpec(name="reject", description="Refuses its arguments."),
        common_pb2.ToolSpec(name="crash", description="A server bug."),
        common_pb2.ToolSpec(name="busy", description="Out of capacity."),
    ]


@dataclass
class Received:
    """One CallTool as the server saw it."""

    request: tools_pb2.CallToolRequest
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class ScriptedToolServer(tools_pb2_grpc.ToolServerServiceServicer):
    calls: list[Received] = field(default_factory=list)
    #: Each CallTools request's calls.
    batches: list[list[tools_pb2.CallToolRequest]] = field(default_factory=list)
    #: False: CallTools answers UNIMPLEMENTED, as a server without it does.
    batching: bool = True

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(tools=specs())

    async def CallTool(
        self, request: tools_pb2.CallToolRequest, context: aio.ServicerContext
    ) -> tools_pb2.CallToolResponse:
        metadata = {m.key: str(m.value) for m in context.invocation_metadata() or ()}
        self.calls.append(Received(request, metadata, context.time_remaining()))
        args: dict[str, Any] = from_struct(request.args)
        if request.tool == "shout":
            return tools_pb2.CallToolResponse(output=to_value({"text": args["text"].upper()}))
        if request.tool == "fail":
            error = common_pb2.Error(
                code="QUOTA_GONE", message="no quota left", retryable=True, details={"left": "0"}
            )
            return tools_pb2.CallToolResponse(error=error)
        if request.tool == "slow":
            await asyncio.sleep(float(args.get("seconds", 5)))
            return tools_pb2.CallToolResponse(output=to_value("done"))
        if request.tool == "reject":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "args.text is required")
        if request.tool == "crash":
            await context.abort(grpc.StatusCode.INTERNAL, "server bug")
        if request.tool == "busy":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls")
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown tool {request.tool!r}")
        raise AssertionError("unreachable")

    async def CallTools(
        self, request: tools_pb2.CallToolsRequest, context: aio.ServicerContext
    ) -> tools_pb2.CallToolsResponse:
        """``shout`` for each call (a text "boom" fails that call alone); other tools of a
        batch fail as unsupported."""
        if not self.batching:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.batches.append(list(request.calls))
        results = []
        for call in request.calls:
            text = from_struct(call.args).get("text", "")
            if call.tool != "shout" or text == "boom":
                error = common_pb2.Error(code="CANNOT_SHOUT", message=f"cannot shout {text!r}")
                results.append(tools_pb2.CallToolResponse(error=error))
            else:
                results.append(tools_pb2.CallToolResponse(output=to_value({"text": text.upper()})))
        return tools_pb2.CallToolsResponse(results=results)


@dataclass
class RunningToolServer:
    server: aio.Server
    servicer: ScriptedToolServer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)


async def start(port: int = 0) -> RunningToolServer:
    """Serve a ``ScriptedToolServer`` on 127.0.0.1 (port 0: a free one)."""
    server = aio.server()
    servicer = ScriptedToolServer()
    tools_pb2_grpc.add_ToolServerServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return RunningToolServer(server, servicer, bound)
