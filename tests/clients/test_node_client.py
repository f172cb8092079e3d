"""The Node.js client (clients/node/run-goal.js) against the embedded stack over real gRPC.

The stack runs in this test's event loop; the client is a real ``node`` process started
with asyncio's subprocess API so the stack keeps serving while the test waits for it.
Its ``--json`` lines are parsed back into ``RunResponse`` with protobuf's own proto3 JSON
parser, so the test also checks that the client's output is genuine proto3 JSON.

Needs node and clients/node/node_modules (``make install`` installs them).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import auth, context
from trellis.runtime.errors import NotFound
from trellis_cli.app import DEMO_GOAL
from trellis_cli.exits import ExitCode
from trellis_cli.stack import Stack, start_stack

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "node"
RUN_GOAL = CLIENT_DIR / "run-goal.js"
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
#: run-goal.js exit statuses (its header): the table of `trellis run`, mirrored.
EXIT = ExitCode
#: stdout closed by its reader: the status of a process ended by SIGPIPE.
EXIT_STDOUT_CLOSED = 141


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the Node client test needs Node.js (v18+)")
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            "clients/node/node_modules is missing: run `make install` "
            "(or `npm install --prefix clients/node`)"
        )
    return node


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def events(self) -> list[executor_pb2.RunResponse]:
        """The --json lines, each parsed as a RunResponse by protobuf's proto3 JSON parser."""
        return [
            json_format.Parse(line, executor_pb2.RunResponse()) for line in self.stdout.splitlines()
        ]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = await start_stack(database_url=f"sqlite:///{tmp_path}/t.db")
    yield running
    await running.stop()


@pytest.fixture
def executor(stack: Stack, channels) -> ExecutorClient:
    return ExecutorClient(channels.get(stack.executor_target), timeout=30.0)


def _env() -> dict[str, str]:
    """This environment without the variables run-goal.js reads as defaults."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRELLIS_EXECUTOR_TARGET", "TRELLIS_TENANT", "TRELLIS_API_KEY")
    }


async def start_client(stack: Stack, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        require_node(),
        str(RUN_GOAL),
        "--target",
        stack.executor_target,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )


async def finish(process: asyncio.subprocess.Process, within: float = 60.0) -> Result:
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()  # our own child, by its PID
        await process.wait()
        pytest.fail(f"run-goal.js did not finish within {within:g}s")
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def run_client(stack: Stack, *args: str) -> Result:
    return await finish(await start_client(stack, *args))


def write_plan(tmp_path: Path, *nodes: dict) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(list(nodes)))
    return str(path)


def kind(event: executor_pb2.RunResponse) -> str:
    return event.WhichOneof("event") or ""


def node_id(event: executor_pb2.RunResponse) -> str:
    if kind(event) == "node_planned":
        return event.node_planned.call.node_id
    if kind(event) == "node_started":
        return event.node_started.node_id
    if kind(event) == "node_finished":
        return event.node_finished.outcome.node_id
    return ""


async def test_demo_goal_streams_every_event_in_order_and_get_run_agrees(
    stack: Stack, executor: ExecutorClient
) -> None:
    result = await run_client(stack, "--json", DEMO_GOAL)
    assert result.returncode == 0, result.stderr
    events = result.events()
    kinds = [kind(e) for e in events]
    run_id = events[0].run_id
    assert run_id and all(e.run_id == run_id for e in events)
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert kinds.count("started") == kinds.count("finished") == 1
    assert re.fullmatch(r"[0-9a-f]{32}", events[0].started.trace_id)

    planned = [e.node_planned.call for e in events if kind(e) == "node_planned"]
    assert sorted(c.args["command"] for c in planned) == ["df -h", "uname -a", "uptime"]
    for call in planned:  # each node: planned, then started, then finished, once each
        index = {
            k: [i for i, e in enumerate(events) if kind(e) == k and node_id(e) == call.node_id]
            for k in ("node_planned", "node_started", "node_finished")
        }
        assert all(len(at) == 1 for at in index.values()), index
        assert index["node_planned"][0] < index["node_started"][0] < index["node_finished"][0]
    outcomes = {
        e.node_finished.outcome.node_id: e.node_finished.outcome
        for e in events
        if kind(e) == "node_finished"
    }
    assert all(o.status == NODE_SUCCEEDED for o in outcomes.values()), outcomes

    finished = events[-1].finished
    assert finished.status == SUCCEEDED, finished.error
    answer = "".join(e.answer_delta.text for e in events if kind(e) == "answer_delta")
    assert answer and answer == finished.answer
    assert finished.usage.input_tokens > 0 and finished.usage.output_tokens > 0
    assert finished.cost_nano_usd > 0 and finished.duration.ToNanoseconds() > 0
    # The raw JSON keeps the .proto field names and proto3 JSON forms (int64 as strings).
    raw = json.loads(result.stdout.splitlines()[-1])["finished"]
    assert raw["status"] == "RUN_STATUS_SUCCEEDED" and isinstance(raw["cost_nano_usd"], str)

    stored = await executor.get_run(run_id)  # default tenant: the client sent none
    assert stored.status == SUCCEEDED and stored.tenant_id == context.DEFAULT_TENANT
    assert stored.answer == answer and stored.trace_id == events[0].started.trace_id
    assert {o.node_id: o for o in stored.outcomes} == outcomes
    assert stored.usage == finished.usage and stored.cost_nano_usd == finished.cost_nano_usd


async def test_human_output_shows_the_run_as_it_streams(stack: Stack, tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path,
        {"node_id": "a", "tool": "arithmetic", "args": {"expression": "17*23"}},
        {"node_id": "b", "tool": "echo", "args": {"value": "${a.result}"}, "depends_on": ["a"]},
    )
    result = await run_client(stack, "--plan-file", plan)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"run [0-9a-f]+ started, trace_id [0-9a-f]{32}", lines[0]), lines
    assert "planned  a arithmetic" in result.stdout and "after a" in result.stdout
    assert re.search(r"^finished a SUCCEEDED .*391", result.stdout, re.M), result.stdout
    assert "status: SUCCEEDED" in lines


@pytest.mark.parametrize(
    ("args", "reason", "violation"),
    [
        pytest.param(("",), "GOAL_REQUIRED", "goal", id="empty-goal"),
        pytest.param(
            ("--plan-file", "UNKNOWN_TOOL_PLAN"), "INVALID_PLAN", "plan[0].tool", id="unknown-tool"
        ),
    ],
)
async def test_invalid_request_exits_non_zero_naming_code_and_reason(
    stack: Stack,
    executor: ExecutorClient,
    tmp_path: Path,
    args: tuple[str, ...],
    reason: str,
    violation: str,
) -> None:
    plan = write_plan(tmp_path, {"node_id": "n1", "tool": "no_such_tool", "args": {}})
    args = tuple(plan if a == "UNKNOWN_TOOL_PLAN" else a for a in args)

    human = await run_client(stack, "--run-id", "rejected-1", *args)
    assert human.returncode == EXIT.FAILED, human
    assert human.stdout == ""
    assert "error: INVALID_ARGUMENT: " in human.stderr
    assert f"reason: {reason} (trellis.dev)" in human.stderr
    assert f"  {violation}: " in human.stderr

    machine = await run_client(stack, "--json", "--run-id", "rejected-2", *args)
    assert machine.returncode == EXIT.FAILED, machine
    error = json.loads(machine.stderr)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["details_decoded"] is True
    assert error["reason"] == reason and error["domain"] == "trellis.dev"
    assert [v["field"] for v in error["field_violations"]] == [violation]

    for run_id in ("rejected-1", "rejected-2"):  # refused before any run was stored
        with pytest.raises(NotFound):
            await executor.get_run(run_id)


async def test_tenant_metadata_reaches_the_stack(
    stack: Stack, executor: ExecutorClient, tmp_path: Path
) -> None:
    plan = write_plan(
        tmp_path, {"node_id": "a", "tool": "arithmetic", "args": {"expression": "2+2"}}
    )
    result = await run_client(stack, "--json", "--tenant", "acme", "--plan-file", plan)
    assert result.returncode == 0, result.stderr
    run_id = result.events()[0].run_id

    with context.request_scope(tenant_id="acme"):
        stored = await executor.get_run(run_id)
    assert stored.tenant_id == "acme" and stored.status == SUCCEEDED
    for other in ("default", "globex"):  # another tenant's run is not theirs to see
        with context.request_scope(tenant_id=other), pytest.raises(NotFound):
            await executor.get_run(run_id)


async def test_the_callers_deadline_ends_the_run_failed_deadline_exceeded(
    stack: Stack, executor: ExecutorClient, tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, {"node_id": "s", "tool": "sleep", "args": {"ms": 5000}})
    result = await run_client(
        stack, "--json", "--timeout-ms", "1500", "--run-id", "late-1", "--plan-file", plan
    )
    # The run's deadline is the caller's, a little earlier, so its ending normally reaches
    # the client first; on a starved machine the caller's own deadline can still win the
    # race, and the client then says so itself. Either way the exit code is FAILED.
    assert result.returncode == EXIT.FAILED, result
    last = result.events()[-1]
    if last.HasField("finished"):
        assert (last.finished.status, last.finished.error.code) == (
            executor_pb2.RUN_STATUS_FAILED,
            "DEADLINE_EXCEEDED",
        )
    else:
        assert "DEADLINE_EXCEEDED" in result.stderr, result
    stored = await executor.get_run("late-1")
    assert (stored.status, stored.error.code) == (
        executor_pb2.RUN_STATUS_FAILED,
        "DEADLINE_EXCEEDED",
    ), stored
    # The 5 s sleep never completed: it was in flight, so it is CANCELLED.
    [outcome] = stored.outcomes
    assert (outcome.status, outcome.error.code) == (common_pb2.NODE_STATUS_CANCELLED, "CANCELLED")


async def test_a_run_that_does_not_succeed_exits_non_zero(
    stack: Stack, executor: ExecutorClient, tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, {"node_id": "s", "tool": "sleep", "args": {"ms": 10000}})
    process = await start_client(stack, "--json", "--run-id", "cancel-1", "--plan-file", plan)
    assert process.stdout is not None
    seen = []
    async with asyncio.timeout(30):
        while "node_started" not in seen:
            line = await process.stdout.readline()
            assert line, f"the client exited early: {seen}"
            seen.append(kind(json_format.Parse(line, executor_pb2.RunResponse())))
    await executor.cancel_run("cancel-1")
    result = await finish(process)
    assert result.returncode == EXIT.CANCELLED, result
    finished = result.events()[-1].finished
    assert finished.status == executor_pb2.RUN_STATUS_CANCELLED


async def test_api_key_is_sent_and_decides_the_tenant(tmp_path: Path, channels) -> None:
    key = auth.new_key()
    keys = {auth.hash_key(key): "acme"}
    secured = await start_stack(database_url=f"sqlite:///{tmp_path}/a.db", auth=True, api_keys=keys)
    try:
        refused = await run_client(secured, "--json", DEMO_GOAL)
        assert refused.returncode == EXIT.REFUSED, refused
        error = json.loads(refused.stderr)["error"]
        assert (error["code"], error["reason"]) == ("UNAUTHENTICATED", "API_KEY_MISSING")

        # The key's tenant wins over a tenant the client names.
        args = ("--json", "--api-key", key, "--tenant", "globex", "--run-id", "keyed")
        ran = await run_client(secured, *args, DEMO_GOAL)
        assert ran.returncode == 0, ran
        client = ExecutorClient(channels.get(secured.executor_target), timeout=30.0, api_key=key)
        run = await client.get_run("keyed")  # found: the run belongs to the key's tenant
        assert run.status == executor_pb2.RUN_STATUS_SUCCEEDED
        assert run.tenant_id == "acme"
    finally:
        await secured.stop()


# -- google.rpc details, decoded from the vendored third_party/protos ----------------------

DESCRIBE_JS = """
const trellis = require(process.argv[1]);
const raw = Buffer.from(process.argv[2], 'base64');
const error = {code: 8, details: 'shed', metadata: {get: () => [raw]}};
console.log(JSON.stringify(trellis.describeRpcError(error)));
"""


def node_describe(details: bytes, env: dict[str, str] | None = None):
    """describeRpcError of an error whose grpc-status-details-bin is ``details``."""
    module, encoded = str(CLIENT_DIR / "trellis-client.js"), base64.b64encode(details).decode()
    return subprocess.run(
        [require_node(), "-e", DESCRIBE_JS, module, encoded],
        capture_output=True,
        text=True,
        timeout=30,
        env={**_env(), **(env or {})},
    )


def rich_status() -> bytes:
    details = [
        error_details_pb2.ErrorInfo(
            reason="RUN_CAPACITY", domain="trellis.dev", metadata={"limit": "64"}
        ),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="goal", description="empty")
            ]
        ),
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000)
        ),
        error_details_pb2.DebugInfo(detail="ignored: not a detail the client reads"),
    ]
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=8, message="shed", details=packed).SerializeToString()


def test_error_details_are_decoded_with_the_vendored_google_rpc_protos() -> None:
    result = node_describe(rich_status())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "code": "RESOURCE_EXHAUSTED",
        "message": "shed",
        "details_decoded": True,
        "reason": "RUN_CAPACITY",
        "domain": "trellis.dev",
        "metadata": {"limit": "64"},
        "field_violations": [{"field": "goal", "description": "empty"}],
        "retry_delay_ms": 1500,
    }


def test_the_client_reads_google_rpc_from_third_party_protos(tmp_path: Path) -> None:
    # Pointed at a directory without them, the client cannot load: the files are its source.
    result = node_describe(rich_status(), {"TRELLIS_THIRD_PARTY_PROTOS_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "google/rpc/status.proto" in result.stderr
    # A copy of the vendored directory elsewhere works the same.
    shutil.copytree(ROOT / "third_party" / "protos", tmp_path / "copy")
    result = node_describe(
        rich_status(), {"TRELLIS_THIRD_PARTY_PROTOS_DIR": str(tmp_path / "copy")}
    )
    assert result.returncode == 0 and json.loads(result.stdout)["reason"] == "RUN_CAPACITY"


def test_exit_statuses_mirror_the_python_cli() -> None:
    script = "process.stdout.write(JSON.stringify(require(process.argv[1]).EXIT))"
    out = subprocess.run(
        [require_node(), "-e", script, str(RUN_GOAL)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert json.loads(out) == {code.name: int(code) for code in ExitCode}


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("RUN_STATUS_SUCCEEDED", EXIT.SUCCEEDED),
        ("RUN_STATUS_FAILED", EXIT.FAILED),
        ("RUN_STATUS_PARTIAL", EXIT.PARTIAL),
        ("RUN_STATUS_CANCELLED", EXIT.CANCELLED),
        ("RUN_STATUS_RUNNING", EXIT.FAILED),
        (None, EXIT.FAILED),  # no `finished` event
    ],
)
def test_run_status_decides_the_exit_status(status: str | None, code: ExitCode) -> None:
    finished = "null" if status is None else json.dumps({"status": status})
    script = (
        f"const m = require(process.argv[1]);process.stdout.write(String(m.exitForRun({finished})))"
    )
    out = subprocess.run(
        [require_node(), "-e", script, str(RUN_GOAL)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert int(out) == code


async def test_unreachable_executor_exits_5_and_names_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once it is closed
    args = ("--target", target, "--timeout-ms", "10000", "What is 2+2?")
    human = await finish(await _start(*args))
    assert human.returncode == EXIT.UNREACHABLE, human
    assert human.stderr.splitlines() == [
        f"error: UNAVAILABLE: cannot reach the executor at {target}; is the stack running?"
        " Start it with `trellis up` (or `make up`), or set --target/TRELLIS_EXECUTOR_TARGET"
    ]
    machine = await finish(await _start("--json", *args))
    assert machine.returncode == EXIT.UNREACHABLE, machine
    error = json.loads(machine.stderr)["error"]
    assert error["code"] == "UNAVAILABLE" and target in error["message"]
    for text in ("ECONNREFUSED", "ipv4", "Last error"):
        assert text not in human.stderr + machine.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read it (no such file)"),
        ("[{", "not JSON ("),
        ('{"node_id": "a"}', "expected a JSON list of ToolCall objects"),
        (
            '[{"node_id": 1, "tool": "echo", "depends_on": "a"}]',
            "plan[0].node_id: must be a string",
        ),
        ('[{"node_id": "a", "tool": "echo", "tol": 1}]', "plan[0].tol: not a ToolCall field"),
    ],
)
async def test_a_bad_plan_file_exits_2_with_one_line_naming_it(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    result = await finish(await _start("--target", "127.0.0.1:1", "--plan-file", str(path)))
    assert result.returncode == EXIT.USAGE, result
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: ") and problem in line, line
    assert result.stdout == ""


async def test_stdout_closed_by_head_stops_quietly_and_cancels_the_run(
    stack: Stack, executor: ExecutorClient, tmp_path: Path
) -> None:
    # A chain of short naps: an event every 100 ms, so the client writes again soon
    # after `head` has gone (the first writes may all fit in the pipe before it exits).
    naps = [
        {"node_id": f"s{i}", "tool": "sleep", "args": {"ms": 100}}
        | ({"depends_on": [f"s{i - 1}"]} if i else {})
        for i in range(40)
    ]
    plan = write_plan(tmp_path, *naps)
    command = (
        f"{shlex.quote(require_node())} {shlex.quote(str(RUN_GOAL))}"
        f" --target {stack.executor_target} --json --run-id piped --plan-file {shlex.quote(plan)}"
        " | head -1; exit ${PIPESTATUS[0]}"
    )
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    result = await finish(process)
    assert result.returncode == EXIT_STDOUT_CLOSED, result
    assert result.stderr == ""  # no EPIPE stack trace, nothing at all
    [line] = result.stdout.splitlines()
    assert kind(json_format.Parse(line, executor_pb2.RunResponse())) == "started"
    for _ in range(100):  # the client went away: the executor cancels the run
        stored = await executor.get_run("piped")
        if stored.status != executor_pb2.RUN_STATUS_RUNNING:
            break
        await asyncio.sleep(0.05)
    assert stored.status == executor_pb2.RUN_STATUS_CANCELLED, stored


async def _start(*args: str) -> asyncio.subprocess.Process:
    """run-goal.js with exactly ``args`` (no --target added)."""
    return await asyncio.create_subprocess_exec(
        require_node(),
        str(RUN_GOAL),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
