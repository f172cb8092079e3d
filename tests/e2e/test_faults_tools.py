"""Faults: tools that misbehave are bounded (services as processes, ``process_stack``).

One run holds four bad tools side by side, each against a backend this test serves:

- ``slow``: an HTTP endpoint answering after 3 s, the tool's timeout 1 s;
- ``hang_http``: a TCP server that reads the request and never answers;
- ``hang_command``: a command (``sleep 987.654``) that would run for a quarter hour;
- ``big``: an HTTP endpoint answering 10 MB of JSON (read whole: ``max_response_bytes``
  16 MB), over the gateway's output cap (``TRELLIS_TOOL_MAX_RESULT_BYTES``, 2 MB by
  default); ``big_http``: the same endpoint under the HTTP tool's own read cap (1 MB).

Each node fails with a stable code within about its timeout (TOOL_TIMEOUT,
OUTPUT_TOO_LARGE, HTTP_RESPONSE_TOO_LARGE) and the run finishes. While they hang the
gateway keeps answering other calls at once. Afterwards nothing is left behind: the
never-answering server sees its connection closed by the gateway, no ``sleep 987.654``
process is alive, and the gateway serves the next call normally.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import from_value, to_struct
from trellis.toolgateway.v1 import toolgateway_pb2, toolgateway_pb2_grpc

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
NODE_FAILED = common_pb2.NODE_STATUS_FAILED
SLOW_TIMEOUT, HANG_TIMEOUT = 1.0, 3.0
#: How long ``slow`` takes to answer (its timeout is SLOW_TIMEOUT).
SLOW_ANSWER = 3.0
BIG_BYTES = 10 * 1024 * 1024
#: The command that would hang: its odd argument finds it among processes.
HANG_SECONDS = "987.654"
#: Scheduling and process hops on top of a tool's timeout.
SLACK = 1.5


@dataclass
class Backends:
    http_port: int = 0
    hang_port: int = 0
    #: Connections to the never-answering server: open now, and ever accepted.
    open: int = 0
    accepted: int = 0
    requests: dict[str, int] = field(default_factory=dict)


@pytest.fixture
async def backends(http_app) -> AsyncIterator[Backends]:
    found = Backends()

    async def slow(request: web.Request) -> web.Response:
        found.requests["slow"] = found.requests.get("slow", 0) + 1
        await asyncio.sleep(SLOW_ANSWER)
        return web.json_response({"late": True})

    async def big(request: web.Request) -> web.Response:
        found.requests["big"] = found.requests.get("big", 0) + 1
        body = json.dumps({"blob": "x" * BIG_BYTES})
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    found.http_port = await http_app(app)

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        found.open += 1
        found.accepted += 1
        try:
            while await reader.read(65536):  # the request, then nothing until EOF
                pass
        finally:
            found.open -= 1
            writer.close()

    hang = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    found.hang_port = hang.sockets[0].getsockname()[1]
    yield found
    hang.close()


def tools_file(path: Path, backends: Backends) -> Path:
    http = f"http://127.0.0.1:{backends.http_port}"
    no_args = {"type": "object", "additionalProperties": False}
    common = {"kind": "http", "allowed_hosts": ["127.0.0.1"], "input_schema": no_args,
              "cache_ttl": 0, "retries": 0}  # fmt: skip
    tools = [
        {"name": "slow", "description": "Answers after 3 s.", "url": f"{http}/slow",
         "timeout": SLOW_TIMEOUT, **common},
        {"name": "hang_http", "description": "Never answers.",
         "url": f"http://127.0.0.1:{backends.hang_port}/", "timeout": HANG_TIMEOUT, **common},
        {"name": "big", "description": "Answers 10 MB.", "url": f"{http}/big",
         "max_response_bytes": 16 * 1024 * 1024, "timeout": 10, **common},
        {"name": "big_http", "description": "Answers 10 MB (HTTP cap).", "url": f"{http}/big",
         "timeout": 10, **common},
        {"name": "hang_command", "kind": "command", "description": "Sleeps a quarter hour.",
         "timeout": HANG_TIMEOUT, "retries": 0,
         "commands": [{"command": "sleep forever", "argv": ["sleep", HANG_SECONDS]}]},
        {"name": "echo", "builtin": "echo"},
    ]  # fmt: skip
    path.write_text(yaml.safe_dump({"version": 1, "tools": tools}, sort_keys=False))
    return path


def sleepers() -> list[int]:
    """PIDs of live ``sleep 987.654`` processes."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", HANG_SECONDS.encode()] or (
            len(argv) > 1 and argv[0].endswith(b"/sleep") and argv[1] == HANG_SECONDS.encode()
        ):
            found.append(int(proc.name))
    return found


def node(node_id: str, tool: str, args: dict | None = None) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args or {}))


def seconds(outcome: common_pb2.NodeOutcome) -> float:
    return (outcome.finished_at.ToNanoseconds() - outcome.started_at.ToNanoseconds()) / 1e9


async def test_slow_hung_and_huge_tools_are_bounded_and_leave_nothing_behind(
    process_stack, backends: Backends, tmp_path: Path, channels
) -> None:
    stack = await process_stack(
        per_service={
            "toolgateway": {
                "TRELLIS_TOOLS_FILE": str(tools_file(tmp_path / "tools.yaml", backends)),
                "TRELLIS_TOOLS_RELOAD_SECONDS": "0",
            }
        },
    )
    executor = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
    gateway = toolgateway_pb2_grpc.ToolGatewayServiceStub(channels.get(stack.target("toolgateway")))

    async def echo(value: str) -> float:
        """One direct call to the gateway; how long it took."""
        started = time.monotonic()
        response = await gateway.InvokeTool(
            toolgateway_pb2.InvokeToolRequest(call=node("direct", "echo", {"value": value})),
            timeout=5,
        )
        assert response.outcome.status == NODE_SUCCEEDED, response.outcome
        assert from_value(response.outcome.output) == value
        return time.monotonic() - started

    try:
        assert sleepers() == []
        plan = [
            node("slow", "slow"),
            node("hang_http", "hang_http"),
            node("hang_command", "hang_command", {"command": "sleep forever"}),
            node("big", "big"),
            node("big_http", "big_http"),
        ]
        started = time.monotonic()
        run = asyncio.create_task(
            collect(executor.Run(executor_pb2.RunRequest(run_id=run_id(), plan=plan), timeout=30))
        )
        # While the bad tools hang, the gateway answers other calls at once.
        while backends.open == 0 or not sleepers():
            assert time.monotonic() - started < 15, "the hanging tools never started"
            await asyncio.sleep(0.02)
        during = [await echo(f"during-{i}") for i in range(5)]
        # All five answered while the bad calls still hung, each one fast.
        assert backends.open == 1 and len(sleepers()) == 1
        assert sum(during) < HANG_TIMEOUT, during

        events = await run
        elapsed = time.monotonic() - started
        assert events[-1].HasField("finished")
        finished = events[-1].finished  # an explicit plan whose nodes failed: FAILED
        assert (finished.status, finished.failed_nodes) == (executor_pb2.RUN_STATUS_FAILED, 5)
        outcomes = {
            e.node_finished.outcome.node_id: e.node_finished.outcome
            for e in events
            if e.HasField("node_finished")
        }
        codes = {n: (o.status, o.error.code) for n, o in outcomes.items()}
        assert codes == {
            "slow": (NODE_FAILED, "TOOL_TIMEOUT"),
            "hang_http": (NODE_FAILED, "TOOL_TIMEOUT"),
            "hang_command": (NODE_FAILED, "TOOL_TIMEOUT"),
            "big": (NODE_FAILED, "OUTPUT_TOO_LARGE"),
            "big_http": (NODE_FAILED, "HTTP_RESPONSE_TOO_LARGE"),
        }, {n: (o.error.code, o.error.message) for n, o in outcomes.items()}
        took = {n: round(seconds(o), 2) for n, o in outcomes.items()}
        print(f"run took {elapsed:.2f}s; nodes {took}; direct echo calls {during}")
        assert SLOW_TIMEOUT - 0.1 <= took["slow"] < SLOW_TIMEOUT + SLACK
        assert HANG_TIMEOUT - 0.1 <= took["hang_http"] < HANG_TIMEOUT + SLACK
        assert HANG_TIMEOUT - 0.1 <= took["hang_command"] < HANG_TIMEOUT + SLACK
        assert elapsed < HANG_TIMEOUT + 2 * SLACK  # bounded by the longest timeout
        assert outcomes["big"].error.details["limit_bytes"] == str(2 * 1024 * 1024)
        assert not outcomes["big"].HasField("output")  # the 10 MB went nowhere
        assert backends.requests == {"slow": 1, "big": 2}

        # Nothing left behind: the hung connection is closed, the command killed.
        deadline = time.monotonic() + 5
        while backends.open or sleepers():
            assert time.monotonic() < deadline, (backends.open, sleepers())
            await asyncio.sleep(0.05)
        assert backends.accepted == 1
        assert await echo("after") < HANG_TIMEOUT
        assert stack.processes["toolgateway"].process.poll() is None
    except BaseException:
        for name in ("toolgateway", "executor"):
            print(f"----- {name} -----\n{stack.processes[name].output()}")
        raise


def run_id() -> str:
    return f"tools-{uuid.uuid4().hex[:10]}"


async def collect(stream) -> list[executor_pb2.RunResponse]:
    return [event async for event in stream]
