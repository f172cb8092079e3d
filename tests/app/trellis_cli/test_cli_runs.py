"""Every executor command of ``trellis`` as a person uses it: a process against the five
services as processes (auth on, so every command shows ``--api-key`` at work):
``run --json``, ``runs list|show|cancel|watch``, ``tools``; their exit codes, refused and
unreachable calls; Ctrl-C in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import pytest
from google.protobuf import json_format

from tests.support import pty_session
from tests.support.cli import TRELLIS, clean_env, trellis
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import auth
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import NotFound
from trellis_cli.exits import EXIT_INTERRUPTED, ExitCode

KEY = auth.new_key()
RUNNING = executor_pb2.RUN_STATUS_RUNNING
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED


@pytest.fixture
async def stack(process_stack):
    return await process_stack(
        per_service={
            "executor": {
                "TRELLIS_AUTH": "true",
                "TRELLIS_API_KEYS": json.dumps({auth.hash_key(KEY): "acme"}),
            }
        }
    )


@pytest.fixture
def client(stack, channels) -> ExecutorClient:
    return ExecutorClient(channels.get(stack.executor_target), timeout=30, api_key=KEY)


def plan_file(tmp_path: Path, nodes: list[dict], name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(nodes))
    return path


def sleep_plan(tmp_path: Path) -> Path:
    return plan_file(
        tmp_path, [{"node_id": "nap", "tool": "sleep", "args": {"ms": 30000}}], "s.json"
    )


async def cli(stack, *args: str, **env: str):
    """``trellis ARGS --target <the stack's executor>`` with the key in TRELLIS_API_KEY."""
    return await trellis(*args, "--target", stack.executor_target, TRELLIS_API_KEY=KEY, **env)


async def start_sleeping_run(client: ExecutorClient, run_id: str) -> asyncio.Task:
    """A run whose one node sleeps 30 s, held open by this test; returns once it runs."""
    request = executor_pb2.RunRequest(run_id=run_id)
    request.plan.append(
        common_pb2.ToolCall(node_id="nap", tool="sleep", args=to_struct({"ms": 30000}))
    )

    task = asyncio.ensure_future(events_of(client, request))
    await wait_for_node(client, run_id)
    return task


async def events_of(
    client: ExecutorClient, request: executor_pb2.RunRequest
) -> list[executor_pb2.RunResponse]:
    return [event async for event in client.run(request)]


async def wait_for_node(client: ExecutorClient, run_id: str) -> executor_pb2.Run:
    async with asyncio.timeout(30):
        while True:
            try:
                run = await client.get_run(run_id)
                if run.plan:
                    return run
            except NotFound:
                pass
            await asyncio.sleep(0.05)


async def test_run_json_prints_one_run_response_per_line(stack, tmp_path: Path) -> None:
    path = plan_file(
        tmp_path, [{"node_id": "n1", "tool": "arithmetic", "args": {"expression": "6*7"}}]
    )
    result = await cli(stack, "run", "--json", "--plan-file", str(path))
    assert result.code == ExitCode.SUCCEEDED, result
    events = [
        json_format.Parse(line, executor_pb2.RunResponse()) for line in result.stdout.splitlines()
    ]
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "node_finished" in kinds
    assert '"run_id"' in result.stdout.splitlines()[0]  # the .proto field names
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED
    assert result.stderr == ""


async def test_runs_list_show_and_their_json(stack, client, tmp_path: Path) -> None:
    ok = plan_file(
        tmp_path, [{"node_id": "n1", "tool": "arithmetic", "args": {"expression": "6*7"}}]
    )
    df = plan_file(
        tmp_path,
        [
            {"node_id": "disk", "tool": "run_command", "args": {"command": "df -h"}},
            {"node_id": "zero", "tool": "arithmetic", "args": {"expression": "1/0"}},
        ],
        "df.json",
    )
    for path, run_id in ((ok, "run-ok"), (df, "run-df")):
        await cli(stack, "run", "--run-id", run_id, "--plan-file", str(path))

    listed = await cli(stack, "runs", "list")
    assert listed.code == 0, listed
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "created", "status", "nodes"]
    assert re.search(r"^run-df .* failed +1/2 ✗1 ", lines[1]), lines
    assert re.search(r"^run-ok .* succeeded +1/1 ", lines[2]), lines

    failed = await cli(stack, "runs", "list", "--status", "failed", "--json", "--since", "1h")
    [summary] = [
        json_format.Parse(line, executor_pb2.RunSummary()) for line in failed.stdout.splitlines()
    ]
    assert summary.run_id == "run-df" and summary.nodes.failed == 1
    one = await cli(stack, "runs", "list", "--limit", "1")
    assert "run-df" in one.stdout and "run-ok" not in one.stdout and "--limit N" in one.stdout
    nothing = await cli(stack, "runs", "list", "--since", "2999-01-01")
    assert nothing.stdout.strip() == "no runs"

    shown = await cli(
        stack,
        "runs",
        "show",
        "run-df",
        TRELLIS_TRACE_URL_TEMPLATE="https://traces.example/t/{trace_id}",
    )
    assert shown.code == 0, shown
    out = shown.stdout
    assert "run run-df — failed" in out and "run_command" in out and "df -h" in out
    assert "Filesystem" in out and "ARITHMETIC_ERROR" in out  # output head and error
    run = await client.get_run("run-df")
    assert f"trace: https://traces.example/t/{run.trace_id}" in out
    assert "status: failed (1 node failed)" in out and "cost: $" in out
    as_json = await cli(stack, "runs", "show", "run-ok", "--json")
    assert json_format.Parse(as_json.stdout, executor_pb2.Run()).run_id == "run-ok"

    missing = await cli(stack, "runs", "show", "no-such-run")
    assert missing.code == ExitCode.FAILED
    assert missing.error_lines == ["error RUN_NOT_FOUND: no run no-such-run"]
    bad = await cli(stack, "runs", "list", "--status", "sleepy")
    assert bad.code == ExitCode.USAGE and "running, succeeded" in bad.stderr


async def test_runs_cancel_and_what_it_says_after(stack, client) -> None:
    follower = await start_sleeping_run(client, "to-cancel")
    cancelled = await cli(stack, "runs", "cancel", "to-cancel")
    assert cancelled.code == ExitCode.SUCCEEDED, cancelled
    assert cancelled.stderr.strip() == "run to-cancel cancelled"
    events = await follower
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_CANCELLED
    again = await cli(stack, "runs", "cancel", "to-cancel")  # idempotent
    assert (again.code, again.stderr.strip()) == (0, "run to-cancel cancelled"), again
    done = executor_pb2.RunRequest(run_id="already-done")
    done.plan.append(common_pb2.ToolCall(node_id="n", tool="echo", args=to_struct({"value": 1})))
    assert (await events_of(client, done))[-1].finished.status == SUCCEEDED
    late = await cli(stack, "runs", "cancel", "already-done")
    assert late.code == ExitCode.FAILED
    assert late.error_lines == ["error run already-done had already ended: succeeded"]
    unknown = await cli(stack, "runs", "cancel", "nope")
    assert unknown.code == ExitCode.FAILED and "RUN_NOT_FOUND" in unknown.stderr


async def test_runs_watch_follows_a_run_to_its_end(stack, client, tmp_path: Path) -> None:
    request = executor_pb2.RunRequest(run_id="watched")
    request.plan.append(
        common_pb2.ToolCall(node_id="a", tool="sleep", args=to_struct({"ms": 1500}))
    )
    request.plan.append(
        common_pb2.ToolCall(
            node_id="b", tool="echo", args=to_struct({"value": "done"}), depends_on=["a"]
        )
    )
    runner = asyncio.ensure_future(events_of(client, request))
    await wait_for_node(client, "watched")
    watched = await cli(stack, "runs", "watch", "watched")
    assert watched.code == ExitCode.SUCCEEDED, watched
    assert "status: succeeded" in watched.stdout and "done" in watched.stdout
    await runner
    replay = await cli(stack, "runs", "watch", "watched", "--json")
    lines = [json.loads(line) for line in replay.stdout.splitlines()]
    assert lines[-1]["finished"]["status"] == "RUN_STATUS_SUCCEEDED"


async def test_tools_lists_the_tenants_catalog_with_schemas(stack) -> None:
    table = await cli(stack, "tools")
    assert table.code == 0, table
    assert re.search(r"arithmetic +│ expression: string", table.stdout), table.stdout
    specs = [
        json_format.Parse(line, common_pb2.ToolSpec())
        for line in (await cli(stack, "tools", "--json")).stdout.splitlines()
    ]
    arithmetic = next(spec for spec in specs if spec.name == "arithmetic")
    assert "expression" in arithmetic.input_schema["properties"]


COMMANDS = [
    ("run", "What is 2+2?"),
    ("runs", "list"),
    ("runs", "show", "some-run"),
    ("runs", "cancel", "some-run"),
    ("runs", "watch", "some-run"),
    ("tools",),
]


async def test_every_command_is_refused_without_a_key_and_says_how(stack) -> None:
    for command in COMMANDS:
        result = await trellis(*command, "--target", stack.executor_target)
        assert result.code == ExitCode.REFUSED, (command, result)
        [line] = result.error_lines
        assert line.startswith("error API_KEY_MISSING: ") and "--api-key" in line, command
        wrong = await trellis(*command, "--target", stack.executor_target, "--api-key", "trk_x")
        assert wrong.code == ExitCode.REFUSED and "API_KEY_INVALID" in wrong.stderr, command


async def test_every_command_names_an_unreachable_executor() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    for command in COMMANDS:
        result = await trellis(*command, "--target", target)
        assert result.code == ExitCode.UNREACHABLE, (command, result)
        assert result.error_lines[0].startswith(f"error cannot reach the executor at {target}")
        result.assert_no_diagnostics()


# --- Ctrl-C in a pseudo-terminal --------------------------------------------------------------


def interrupt(args: list[str], wait_for: str) -> tuple[int, str]:
    """``trellis ARGS`` in a pseudo-terminal: Ctrl-C once ``wait_for`` shows; its exit
    status and everything it wrote."""
    env = clean_env(COLUMNS="100", LINES="30")
    result = pty_session.interrupt([str(TRELLIS), *args], wait_for, env)
    assert result["shown"], f"trellis {args} ended ({result['code']}) first: {result['output']!r}"
    return result["code"], result["output"]


async def test_ctrl_c_cancels_the_run_and_says_so(stack, client, tmp_path: Path) -> None:
    path = sleep_plan(tmp_path)
    args = ["run", "--target", stack.executor_target, "--api-key", KEY, "--plan-file", str(path)]
    code, output = await asyncio.to_thread(interrupt, args, "running")
    assert code == EXIT_INTERRUPTED, output
    [run_id] = re.findall(r"run ([0-9a-f]{32}) cancelled", output)
    run = await client.get_run(run_id)
    assert run.status == executor_pb2.RUN_STATUS_CANCELLED
    assert run.outcomes[0].status == common_pb2.NODE_STATUS_CANCELLED


async def test_ctrl_c_stops_watching_but_not_the_run(stack, client) -> None:
    follower = await start_sleeping_run(client, "left-alone")
    args = ["runs", "watch", "left-alone", "--target", stack.executor_target, "--api-key", KEY]
    code, output = await asyncio.to_thread(interrupt, args, "nap")
    assert code == EXIT_INTERRUPTED, output
    assert "stopped watching run left-alone; it goes on" in output
    assert (await client.get_run("left-alone")).status == RUNNING
    await client.cancel_run("left-alone")
    await follower
