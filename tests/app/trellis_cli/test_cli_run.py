"""`trellis run` as a person uses it: a subprocess against a stack over real gRPC.

Each exit code with real inputs (0 succeeded, 1 failed / a service's error, 2 bad plan
file, 3 partial, 4 cancelled, 5 executor unreachable, 6 API key refused), the one line
each error prints, and no gRPC diagnostics or internal addresses in any of them; the
mapping and the status line are also checked directly (``exits.for_run``,
``RunView.summary``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.cli import trellis_run
from tests.support.model_script import script_of
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import auth
from trellis.runtime.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    translated_rpc_errors,
)
from trellis.runtime.ports import free_port
from trellis.runtime.server import Service
from trellis_cli import exits
from trellis_cli.exits import ExitCode
from trellis_cli.plan_file import PlanFileError, read_plan
from trellis_cli.stack import Stack, start_stack
from trellis_cli.view import RunView


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = await start_stack(database_url=f"sqlite:///{tmp_path}/t.db")
    yield running
    await running.stop()


def plan_file(tmp_path: Path, content: object, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# --- the table, and what each run status and error maps to --------------------------------


def test_exit_codes_are_the_documented_table() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "SUCCEEDED": 0,
        "FAILED": 1,
        "USAGE": 2,
        "PARTIAL": 3,
        "CANCELLED": 4,
        "UNREACHABLE": 5,
        "REFUSED": 6,
    }
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, code


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (executor_pb2.RUN_STATUS_SUCCEEDED, ExitCode.SUCCEEDED),
        (executor_pb2.RUN_STATUS_FAILED, ExitCode.FAILED),
        (executor_pb2.RUN_STATUS_PARTIAL, ExitCode.PARTIAL),
        (executor_pb2.RUN_STATUS_CANCELLED, ExitCode.CANCELLED),
        (executor_pb2.RUN_STATUS_RUNNING, ExitCode.FAILED),  # not an end: not a success
        (executor_pb2.RUN_STATUS_UNSPECIFIED, ExitCode.FAILED),
    ],
)
def test_run_status_decides_the_exit_code(status: int, code: ExitCode) -> None:
    assert exits.for_run(executor_pb2.RunFinished(status=status)) == code


def test_a_stream_without_finished_is_a_failure() -> None:
    assert exits.for_run(None) == ExitCode.FAILED


def test_partial_run_prints_how_many_nodes_failed_and_the_error() -> None:
    view = RunView()
    finished = executor_pb2.RunFinished(
        status=executor_pb2.RUN_STATUS_PARTIAL,
        failed_nodes=2,
        error=common_pb2.Error(code="NODES_FAILED", message="n2, n3 failed"),
    )
    view.apply(executor_pb2.RunResponse(run_id="r1", finished=finished))
    lines = view.summary()
    assert lines[:2] == ["status: partial (2 nodes failed)", "error: NODES_FAILED: n2, n3 failed"]
    assert view.finished is not None
    view.finished.failed_nodes = 1
    assert view.summary()[0] == "status: partial (1 node failed)"


async def test_errors_map_to_refused_unreachable_or_failed(serve, channels) -> None:
    from trellis.runtime.settings import ServiceSettings
    from trellis.tools.v1 import tools_pb2, tools_pb2_grpc

    name = tools_pb2.DESCRIPTOR.services_by_name["ToolServerService"].full_name

    class Down(tools_pb2_grpc.ToolServerServiceServicer):
        async def CallTool(self, request, context):
            raise Unavailable("the run store is unreachable", reason="RUN_STORE_UNAVAILABLE")

    async def build(settings, telemetry, chans) -> Service:
        return Service(
            "down",
            [name],
            lambda s: tools_pb2_grpc.add_ToolServerServiceServicer_to_server(Down(), s),
        )

    server = await serve("down", build, ServiceSettings(port=0, metrics_port=0))

    async def call(target: str) -> Unavailable:
        stub = tools_pb2_grpc.ToolServerServiceStub(channels.get(target))
        with pytest.raises(Unavailable) as raised, translated_rpc_errors():
            await stub.CallTool(tools_pb2.CallToolRequest(tool="x"), timeout=10)
        return raised.value

    answered = await call(server.target)  # UNAVAILABLE sent by a server: its error
    assert not exits.is_unreachable(answered)
    assert exits.for_error(answered) == ExitCode.FAILED
    nobody = await call(f"127.0.0.1:{free_port()}")  # the channel's own UNAVAILABLE
    assert exits.is_unreachable(nobody) and exits.for_error(nobody) == ExitCode.UNREACHABLE

    assert exits.for_error(Unauthenticated("no key", reason="API_KEY_MISSING")) == 6
    assert exits.for_error(PermissionDenied("no", reason="TOOL_NOT_ALLOWED")) == 6
    assert exits.for_error(InvalidArgument("bad", reason="INVALID_PLAN")) == 1


@pytest.mark.parametrize(
    "message",
    [
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50052: "
        "Failed to connect to remote host: Connection refused",
        "connections to all backends failing; last error: UNAVAILABLE: ipv6:[::1]:50053: "
        "Socket closed",
    ],
)
def test_relayed_grpc_diagnostics_become_plain_words(message: str) -> None:
    said = exits.plain(message)
    assert "ipv" not in said and "last error" not in said and "could not be reached" in said


def test_ordinary_messages_stay_as_they_are_on_one_line() -> None:
    assert exits.plain("division by zero") == "division by zero"
    assert exits.plain("two\nlines") == "two lines"


# --- plan files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('[{"node_id": "a"', "not JSON (Expecting"),
        ({"node_id": "a", "tool": "echo"}, "expected a JSON list of ToolCall objects"),
        ([{"node_id": "a"}], "plan[0].tool: Field required"),
        ([{"node_id": 1, "tool": "echo"}], "plan[0].node_id: Input should be a valid string"),
        ([{"node_id": "a", "tool": "echo", "depends_on": "b"}], "plan[0].depends_on:"),
        ([{"node_id": "a", "tool": "echo", "args": [1]}], "plan[0].args:"),
        ([{"node_id": "a", "tool": "echo", "tol": "x"}], "plan[0].tol: Extra inputs"),
        (["a"], "plan[0]: Input should be"),
    ],
)
def test_a_bad_plan_file_is_one_line_naming_it(tmp_path: Path, content, problem: str) -> None:
    path = plan_file(tmp_path, content)
    with pytest.raises(PlanFileError) as raised:
        read_plan(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_a_missing_plan_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match=r"nope\.json: cannot read it \(No such file"):
        read_plan(tmp_path / "nope.json")


def test_a_good_plan_file_becomes_tool_calls(tmp_path: Path) -> None:
    path = plan_file(
        tmp_path,
        [
            {"node_id": "a", "tool": "arithmetic", "args": {"expression": "6*7"}},
            {"node_id": "b", "tool": "echo", "args": {"value": "$a"}, "depends_on": ["a"]},
        ],
    )
    calls = read_plan(path)
    assert [(c.node_id, c.tool, list(c.depends_on)) for c in calls] == [
        ("a", "arithmetic", []),
        ("b", "echo", ["a"]),
    ]
    assert calls[0].args["expression"] == "6*7"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read it (No such file or directory)"),
        ("not json at all", "not JSON"),
        ({"plan": []}, "expected a JSON list of ToolCall objects"),
        ([{"node_id": "a", "tool": 5}], "plan[0].tool: Input should be a valid string"),
    ],
)
async def test_run_with_a_bad_plan_file_exits_2_with_one_line(
    tmp_path: Path, content, problem: str
) -> None:
    path = tmp_path / "missing.json" if content is None else plan_file(tmp_path, content)
    # No stack is needed: the file is refused before any call (the target is never dialled).
    result = await trellis_run("--plan-file", str(path), "--target", f"127.0.0.1:{free_port()}")
    assert result.code == ExitCode.USAGE, result
    assert result.stdout == ""
    [line] = result.error_lines
    assert line.startswith(f"error {path}: ") and problem in line
    result.assert_no_diagnostics()


# --- against a stack -------------------------------------------------------------------------


async def test_unreachable_executor_exits_5_naming_the_target_and_how_to_start(tmp_path) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = await trellis_run("--target", target, "What is 2+2?")
    assert result.code == ExitCode.UNREACHABLE, result
    assert result.error_lines == [
        f"error cannot reach the executor at {target}; is the stack running? Start it with"
        " `trellis up` (or `make up`), or set --target/TRELLIS_EXECUTOR_TARGET"
    ]
    assert result.stdout == ""
    result.assert_no_diagnostics()


async def test_succeeded_run_exits_0(stack: Stack, tmp_path: Path) -> None:
    path = plan_file(
        tmp_path, [{"node_id": "a", "tool": "arithmetic", "args": {"expression": "2**53+1"}}]
    )
    result = await trellis_run("--target", stack.executor_target, "--plan-file", str(path))
    assert result.code == ExitCode.SUCCEEDED, result
    assert "status: succeeded" in result.stdout and "9007199254740993" in result.stdout
    assert result.stderr == ""


async def test_a_service_error_exits_1_with_its_reason_and_fields(
    stack: Stack, tmp_path: Path
) -> None:
    path = plan_file(tmp_path, [{"node_id": "n1", "tool": "no_such_tool", "args": {}}])
    result = await trellis_run("--target", stack.executor_target, "--plan-file", str(path))
    assert result.code == ExitCode.FAILED, result
    assert result.error_lines == [
        "error INVALID_PLAN: invalid plan node plan[0]: plan[0].tool: unknown tool 'no_such_tool'",
        "  plan[0].tool: unknown tool 'no_such_tool'",
    ]
    assert result.stdout == ""  # refused before the run started: no table


async def test_a_failed_run_exits_1_and_prints_its_error(tmp_path: Path) -> None:
    capped = await start_stack(
        database_url=f"sqlite:///{tmp_path}/c.db", max_run_cost_usd="0.000000001"
    )
    try:
        result = await trellis_run("--target", capped.executor_target, "What is 17*23?")
    finally:
        await capped.stop()
    assert result.code == ExitCode.FAILED, result
    assert "status: failed" in result.stdout
    assert "error: RUN_COST_EXCEEDED: " in result.stdout


async def test_an_explicit_plan_with_a_failed_node_exits_1_naming_it(
    stack: Stack, tmp_path: Path
) -> None:
    path = plan_file(
        tmp_path, [{"node_id": "zero", "tool": "arithmetic", "args": {"expression": "1/0"}}]
    )
    result = await trellis_run("--target", stack.executor_target, "--plan-file", str(path))
    assert result.code == ExitCode.FAILED, result
    assert "status: failed (1 node failed)" in result.stdout
    assert "error: ARITHMETIC_ERROR: node zero (arithmetic) failed" in result.stdout


async def test_a_goal_run_that_answered_with_a_failed_node_exits_3(
    stack: Stack, tmp_path: Path
) -> None:
    assert stack.model is not None
    script_of(stack.model).reply(
        '{"node_id": "n1", "tool": "arithmetic", "args": {"expression": "1/0"}}\n'
    )
    script_of(stack.model).reply("It cannot be computed: division by zero.")
    result = await trellis_run("--target", stack.executor_target, "What is 1/0?")
    assert result.code == ExitCode.PARTIAL, result
    assert "status: partial (1 node failed)" in result.stdout
    assert "It cannot be computed" in result.stdout


async def test_a_cancelled_run_exits_4(stack: Stack, channels, tmp_path: Path) -> None:
    path = plan_file(tmp_path, [{"node_id": "s", "tool": "sleep", "args": {"ms": 20000}}])
    args = ("--target", stack.executor_target, "--run-id", "cancel-me", "--plan-file", str(path))
    running = asyncio.ensure_future(trellis_run(*args))
    client = ExecutorClient(channels.get(stack.executor_target), timeout=10)
    async with asyncio.timeout(30):
        while True:
            try:
                run = await client.get_run("cancel-me")
                if run.outcomes or run.status == executor_pb2.RUN_STATUS_RUNNING:
                    break
            except NotFound:
                pass
            await asyncio.sleep(0.1)
    await client.cancel_run("cancel-me")
    result = await running
    assert result.code == ExitCode.CANCELLED, result
    assert "status: cancelled" in result.stdout


async def test_a_refused_api_key_exits_6_and_says_how_to_give_one(tmp_path: Path) -> None:
    key = auth.new_key()
    secured = await start_stack(
        database_url=f"sqlite:///{tmp_path}/a.db", auth=True, api_keys={auth.hash_key(key): "acme"}
    )
    try:
        missing = await trellis_run("--target", secured.executor_target, "What is 2+2?")
        wrong = await trellis_run(
            "--target", secured.executor_target, "--api-key", "trk_not-a-key", "What is 2+2?"
        )
        right = await trellis_run(
            "--target", secured.executor_target, "What is 2+2?", TRELLIS_API_KEY=key
        )
    finally:
        await secured.stop()
    for refused, reason in ((missing, "API_KEY_MISSING"), (wrong, "API_KEY_INVALID")):
        assert refused.code == ExitCode.REFUSED, refused
        [line] = refused.error_lines
        assert line.startswith(f"error {reason}: ")
        assert "--api-key" in line and "TRELLIS_API_KEY" in line
    assert right.code == ExitCode.SUCCEEDED, right


async def test_a_run_whose_planner_is_down_shows_no_grpc_diagnostics(stack: Stack) -> None:
    await stack.servers["planner"].stop(0)
    result = await trellis_run("--target", stack.executor_target, "What is 2+2?")
    assert result.code == ExitCode.FAILED, result
    assert "status: failed" in result.stdout
    assert "a service it depends on could not be reached" in result.stdout
    result.assert_no_diagnostics()
