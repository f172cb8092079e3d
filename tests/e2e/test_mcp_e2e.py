"""MCP servers behind the whole stack.

- The executor plans with a tool an MCP server added a moment ago: the five services as
  separate processes; one run asks the test server to grow a tool (it announces it with
  ``notifications/tools/list_changed``), and the next run's explicit plan names that tool.
  It is not refused INVALID_PLAN: the executor checks its copy of the catalog against
  the gateway's catalog version at every run.
- ``${VAR}`` secrets of MCP servers (a stdio server's ``env``, an HTTP server's
  ``headers``) reach the servers and never anything the stack writes: log lines (the
  server's own stderr included), spans, errors a caller gets, metrics; outputs that
  would show them are scrubbed.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, generate_latest

from tests.services.trellis_toolgateway.test_gateway_mcp_http import start_server
from tests.support.json_logs import JsonLogs
from tests.support.mcp_servers import tools_server
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import from_value, to_struct
from trellis_cli.stack import start_stack

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED


def node(node_id: str, tool: str, **args: object) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args))


async def run(stub, plan: list[common_pb2.ToolCall]) -> list[executor_pb2.RunResponse]:
    request = executor_pb2.RunRequest(plan=plan)
    return [event async for event in stub.Run(request, timeout=60)]


def outcomes(events: list[executor_pb2.RunResponse]) -> dict[str, common_pb2.NodeOutcome]:
    return {
        e.node_finished.outcome.node_id: e.node_finished.outcome
        for e in events
        if e.WhichOneof("event") == "node_finished"
    }


async def test_the_executor_plans_with_a_tool_added_a_moment_ago(
    process_stack, channels, tmp_path: Path
) -> None:
    tools = tmp_path / "tools.yaml"
    tools.write_text(
        yaml.safe_dump({"mcp_servers": [{"name": "t", "command": tools_server(), "prefix": "t."}]})
    )
    stack = await process_stack(per_service={"toolgateway": {"TRELLIS_TOOLS_FILE": str(tools)}})
    stub = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
    gateway = ToolGatewayClient(channels.get(stack.target("toolgateway")), timeout=10)

    # The executor has the catalog from this run on.
    first = await run(stub, [node("grow", "t.grow", name="fresh")])
    assert first[-1].finished.status == SUCCEEDED, first[-1].finished
    # The server announced its new tool; once the gateway serves it ...
    async with asyncio.timeout(30):
        for _ in itertools.count():
            if "t.fresh" in {t.name for t in await gateway.list_tools()}:
                break
            await asyncio.sleep(0.05)
    # ... the very next run may use it.
    second = await run(stub, [node("use", "t.fresh", text="just added")])
    finished = second[-1].finished
    assert finished.status == SUCCEEDED, finished
    assert from_value(outcomes(second)["use"].output) == {"result": "fresh: just added"}


async def test_mcp_secrets_reach_the_servers_and_never_what_the_stack_writes(
    tmp_path: Path, channels, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_secret = f"ENVSECRET{uuid.uuid4().hex}"
    header_secret = f"HEADERSECRET{uuid.uuid4().hex}"
    forbidden = (env_secret, header_secret)
    monkeypatch.setenv("TRELLIS_E2E_MCP_ENV_SECRET", env_secret)
    monkeypatch.setenv("TRELLIS_E2E_MCP_TOKEN", header_secret)
    http = await start_server()
    tools = tmp_path / "tools.yaml"
    tools.write_text(
        yaml.safe_dump(
            {
                "mcp_servers": [
                    {
                        "name": "local",
                        "command": [sys.executable, *tools_server()[1:]],
                        "env": {"TRELLIS_MCP_TEST_SECRET": "${TRELLIS_E2E_MCP_ENV_SECRET}"},
                        "prefix": "l.",
                    },
                    {
                        "name": "remote",
                        "url": http.url,
                        "headers": {"Authorization": "Bearer ${TRELLIS_E2E_MCP_TOKEN}"},
                        "prefix": "r.",
                    },
                ]
            }
        )
    )
    exporter = InMemorySpanExporter()
    logs = JsonLogs()
    try:
        stack = await start_stack(
            database_url=f"sqlite:///{tmp_path}/runs.db",
            span_processors=[SimpleSpanProcessor(exporter)],
            tools_file=tools,
            tools_reload_seconds=0,
        )
        try:
            stub = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
            events = await run(
                stub,
                [
                    node("env", "l.env", name="TRELLIS_MCP_TEST_SECRET"),
                    node("auth", "r.header", name="Authorization"),
                    node("fails", "l.fail", reason=f"refused {env_secret}"),
                ],
            )
        finally:
            await stack.stop()
    finally:
        logs.restore()
        await http.stop()
    done = outcomes(events)
    # The servers had them: the stdio server its env, the HTTP server the header ...
    assert from_value(done["env"].output) == {"value": "[redacted]"}
    auth = from_value(done["auth"].output)
    assert auth["value"] == "Bearer [redacted]"
    assert auth["sha256"] == hashlib.sha256(f"Bearer {header_secret}".encode()).hexdigest()
    # ... and no error, log line, span or metric shows them (the plan's own arguments
    # are the caller's data, returned as they are).
    assert "refused [redacted]" in done["fails"].error.message
    errors = [str(o.error) for o in done.values()] + [str(events[-1].finished.error)]
    assert not [text for text in errors if any(s in text for s in forbidden)]
    lines = logs.lines()
    starting = [json.loads(line) for line in lines if "trellis-test-tools starting" in line]
    assert starting and starting[0]["line"] == "trellis-test-tools starting; secret=[redacted]"
    assert starting[0]["server"] == "local" and starting[0]["event"] == "MCP server stderr"
    assert not [line for line in lines if any(s in line for s in forbidden)]
    spans = [span.to_json() for span in exporter.get_finished_spans()]
    assert any("execute_tool r.header" in text for text in spans)
    assert not [text for text in spans if any(s in text for s in forbidden)]
    metrics = generate_latest(REGISTRY).decode()
    assert not any(s in metrics for s in forbidden)
