"""The tools of a remote ``trellis.tools.v1.ToolServerService``, served as gateway tools.

A tool server (written in any language, see examples/node-tool-server) answers
``ListTools`` with ``ToolSpec``s and runs ``CallTool``. ``GrpcSource`` lists them as
``Tool``s named ``config.prefix + spec.name`` and calls them on the channel it is given,
which comes from the gateway's ``Channels`` factory so tracing, deadline and tenant
propagation apply to every call like to any other onward RPC.

Contract and policy. The schemas and description are always the server's: it owns the
tool. For the fields both sides can state, the tools file wins where it sets them
explicitly (``model_fields_set``, so ``cache_ttl: 0`` can switch off caching a server
advertises): ``version``, ``timeout``, ``cache_ttl``. Otherwise the server's value is used
when it sets one, else the config default. ``side_effects`` is the OR of both: either side
can declare a tool side-effecting, neither can make it cacheable by mistake. Concurrency,
cost, shared cache and retries exist only in the config.

Batches. With ``batch`` on the server's entry, calls of its tools that arrive together
are one ``CallTools`` (results in order, each an output or that call's own error). The
RPC is optional: a server that answers it UNIMPLEMENTED is called item by item
(concurrently) from then on. Every request carries the call's run, node and idempotency
key (``current_call``), so a server can run side effects once per key.

Errors. A ``CallToolResponse.error`` is the tool's own failure (``ToolError`` with the
server's code and retryability). gRPC UNAVAILABLE and DEADLINE_EXCEEDED are retryable
``TOOL_SERVER_UNAVAILABLE`` / ``TOOL_TIMEOUT``; INVALID_ARGUMENT is the caller breaking the
contract and is raised as ``InvalidArgument`` (an RPC error, never retried); an answer
larger than the gateway's channels take (TRELLIS_MAX_MESSAGE_BYTES: gRPC refuses it by
its declared length, it never reaches the gateway's code) is ``OUTPUT_TOO_LARGE``, not
retried; other codes
become ``TOOL_SERVER_<CODE>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc import aio

from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_struct, from_value, seconds, to_struct
from trellis.runtime.errors import (
    DeadlineExceeded,
    InvalidArgument,
    from_rpc_error,
    is_retryable_code,
)
from trellis.tools.v1 import tools_pb2, tools_pb2_grpc
from trellis_toolgateway.tools.base import (
    BatchItem,
    BatchTool,
    CallInfo,
    ItemResult,
    Json,
    Spec,
    Tool,
    ToolError,
    ToolSource,
    calling,
    current_call,
)
from trellis_toolgateway.tools.config import GrpcToolServer

#: Longest wait for ``ListTools`` (the registry loads sources at start-up and reload).
LIST_TIMEOUT = 10.0

UNAVAILABLE = "TOOL_SERVER_UNAVAILABLE"
TIMEOUT = "TOOL_TIMEOUT"

#: Used when a server sends no input schema: an object of any arguments.
DEFAULT_INPUT_SCHEMA: dict[str, Json] = {"type": "object"}
#: Used when a server sends no output schema: any JSON value.
DEFAULT_OUTPUT_SCHEMA: dict[str, Json] = {}


def rpc_tool_error(error: grpc.RpcError, server: str) -> Exception:
    """The exception for a failed ``CallTool``/``ListTools`` RPC (see module docstring)."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details = {"server": server, "grpc_code": code.name}
    message = f"tool server {server!r}: {error.details() or code.name}"  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return from_rpc_error(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ToolError(UNAVAILABLE, message, retryable=True, details=details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ToolError(TIMEOUT, message, retryable=True, details=details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (
        error.details() or ""  # type: ignore[attr-defined]
    ):
        return ToolError("OUTPUT_TOO_LARGE", message, details=details)
    return ToolError(
        f"TOOL_SERVER_{code.name}", message, retryable=is_retryable_code(code), details=details
    )


def _policy(config: GrpcToolServer, remote: common_pb2.ToolSpec) -> dict[str, object]:
    explicit = config.model_fields_set

    def pick(name: str, remote_value: object) -> object:
        if name in explicit or not remote_value:
            return getattr(config, name)
        return remote_value

    return {
        "version": pick("version", remote.version),
        "timeout": pick("timeout", seconds(remote.timeout)),
        "cache_ttl": pick("cache_ttl", seconds(remote.cache_ttl)),
        "side_effects": remote.side_effects or config.side_effects,
        "max_concurrency": config.max_concurrency,
        "cost_nano_usd": config.cost_nano_usd,
        "shared_cache": config.shared_cache,
        "retries": config.retries,
        **(
            {
                "batch_max_items": config.batch.max_items,
                "batch_max_wait": config.batch.max_wait_ms / 1000,
                "batch_cost_nano_usd": config.batch.cost_nano_usd,
            }
            if config.batch is not None
            else {}
        ),
    }


def spec_of(config: GrpcToolServer, remote: common_pb2.ToolSpec) -> Spec:
    """The gateway's ``Spec`` for one remote ``ToolSpec`` under ``config``."""
    input_schema = from_struct(remote.input_schema) if remote.HasField("input_schema") else {}
    output_schema = from_struct(remote.output_schema) if remote.HasField("output_schema") else {}
    return Spec(
        name=f"{config.prefix}{remote.name}",
        description=remote.description or config.description or remote.name,
        input_schema=input_schema or DEFAULT_INPUT_SCHEMA,
        output_schema=output_schema or DEFAULT_OUTPUT_SCHEMA,
        **_policy(config, remote),  # type: ignore[arg-type]
    )


@dataclass
class _Server:
    """What the tools of one server share: its stub, its name, whether it batches."""

    stub: tools_pb2_grpc.ToolServerServiceStub
    name: str
    #: False once the server answered CallTools UNIMPLEMENTED.
    batches: bool = True


class GrpcTool(BatchTool):
    """One tool of a remote tool server; ``run`` is a ``CallTool`` RPC, ``run_batch`` a
    ``CallTools`` one."""

    def __init__(self, spec: Spec, remote_name: str, server: _Server) -> None:
        self.spec = spec
        self.remote_name = remote_name
        self._server = server

    def _request(self, args: dict[str, Json], call: CallInfo) -> tools_pb2.CallToolRequest:
        return tools_pb2.CallToolRequest(
            tool=self.remote_name,
            args=to_struct(args),
            idempotency_key=call.idempotency_key,
            run_id=call.run_id,
            node_id=call.node_id,
        )

    async def run(self, args: dict[str, Json]) -> Json:
        request = self._request(args, current_call())
        try:
            # The channel's interceptor shortens this to the incoming call's deadline.
            response = await self._server.stub.CallTool(request, timeout=self.spec.timeout)
        except grpc.RpcError as error:
            raise rpc_tool_error(error, self._server.name) from error
        except DeadlineExceeded as error:  # the deadline ran out before the call was made
            raise ToolError(TIMEOUT, error.message, retryable=True) from error
        result = self._result(response)
        if isinstance(result, ToolError):
            raise result
        return result

    async def run_batch(self, items: Sequence[BatchItem]) -> list[ItemResult]:
        if self._server.batches:
            request = tools_pb2.CallToolsRequest(
                calls=[self._request(item.args, item.call) for item in items]
            )
            try:
                response = await self._server.stub.CallTools(request, timeout=self.spec.timeout)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                    raise rpc_tool_error(error, self._server.name) from error
                self._server.batches = False
            except DeadlineExceeded as error:
                raise ToolError(TIMEOUT, error.message, retryable=True) from error
            else:
                results = list(response.results)
                return [
                    self._result(results[i]) if i < len(results) else self._missing(len(results))
                    for i in range(len(items))
                ]
        return list(await asyncio.gather(*(self._alone(item) for item in items)))

    async def _alone(self, item: BatchItem) -> ItemResult:
        """One item of a batch the server cannot take whole: its own CallTool."""
        with calling(item.call):
            try:
                return await self.run(item.args)
            except ToolError as error:
                return error

    def _result(self, response: tools_pb2.CallToolResponse) -> ItemResult:
        if response.HasField("error"):
            failure = response.error
            return ToolError(
                failure.code or "TOOL_FAILED",
                failure.message or f"{self.spec.name} failed",
                retryable=failure.retryable,
                details=_details(failure.details, self._server.name),
            )
        return from_value(response.output)

    def _missing(self, answered: int) -> ToolError:
        return ToolError(
            "BATCH_RESULT_MISSING",
            f"tool server {self._server.name!r} answered {answered} results for a larger batch",
            details={"server": self._server.name},
        )


def _details(details: Mapping[str, str], server: str) -> dict[str, str]:
    return {"server": server, **details}


class GrpcSource(ToolSource):
    """The tools of the ``ToolServerService`` at ``config.target``, called over ``channel``.

    ``tools()`` raises ``ToolError`` (``TOOL_SERVER_UNAVAILABLE``, retryable) when the
    server cannot be reached. The channel belongs to the ``Channels`` factory, which
    closes it; ``aclose()`` has nothing of its own to release.
    """

    kind = "grpc"

    def __init__(self, config: GrpcToolServer, channel: aio.Channel) -> None:
        self.config = config
        self._server = _Server(tools_pb2_grpc.ToolServerServiceStub(channel), config.name)

    @property
    def name(self) -> str:
        return self.config.name

    async def tools(self) -> list[Tool]:
        try:
            response = await self._server.stub.ListTools(
                tools_pb2.ListToolsRequest(), timeout=context.call_timeout(LIST_TIMEOUT)
            )
        except grpc.RpcError as error:
            failure = rpc_tool_error(error, self.name)
            if isinstance(failure, InvalidArgument):  # not the caller's fault here
                raise ToolError("TOOL_SERVER_INVALID_ARGUMENT", failure.message) from error
            raise failure from error
        except DeadlineExceeded as error:
            raise ToolError(TIMEOUT, error.message, retryable=True) from error
        tools: list[Tool] = []
        for remote in response.tools:
            if not remote.name:
                raise ToolError(
                    "TOOL_SERVER_BAD_SPEC", f"tool server {self.name!r} listed a tool with no name"
                )
            tools.append(GrpcTool(spec_of(self.config, remote), remote.name, self._server))
        return tools

    async def aclose(self) -> None:
        """Nothing to release: the channel is the ``Channels`` factory's."""
