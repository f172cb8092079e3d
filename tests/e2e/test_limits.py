"""Every limit of a run, end to end over real gRPC, with the code and reason a caller sees:
message size (gRPC's RESOURCE_EXHAUSTED, and the executor keeps serving), plan nodes
(TOO_MANY_NODES), replanning rounds (no error: the last round must answer), run duration
(DEADLINE_EXCEEDED), cost per run (RUN_COST_EXCEEDED: nothing new starts, nodes in flight
are cancelled, no further model call) and output size per tool (OUTPUT_TOO_LARGE)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.support.model_script import script_of
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import InvalidArgument, NotFound
from trellis_cli.app import DEMO_GOAL
from trellis_cli.stack import Stack, start_stack
from trellis_offline_model.behaviour import Behaviour

FAILED = executor_pb2.RUN_STATUS_FAILED
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
NODE_CANCELLED = common_pb2.NODE_STATUS_CANCELLED
#: What one call of the ``echo`` tool costs in these stacks (nano-USD): $0.001.
ECHO_COST = 1_000_000
#: The ``capped`` stack's TRELLIS_MAX_RUN_COST_USD in nano-USD: two and a half echoes,
#: and room for a few model calls of the offline model (about 0.0002 USD each).
CAP = 2_500_000

TOOLS = f"""
version: 1
sandbox_root: .
tools:
  - name: echo
    builtin: echo
    cost_nano_usd: {ECHO_COST}
  - name: small_echo
    builtin: echo
    max_result_bytes: 1000
  - name: sleep
    builtin: sleep
  - name: arithmetic
    builtin: arithmetic
  - name: run_command
    kind: command
    commands:
      - {{command: uname -a, argv: [uname, -a], keywords: [operating system, os]}}
      - {{command: df -h, argv: [df, -h], keywords: [disk, disk usage]}}
      - {{command: uptime, argv: [uptime], keywords: [uptime]}}
"""


def node(node_id: str, tool: str, deps=(), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def chain_plan() -> list[common_pb2.ToolCall]:
    """Four paid echoes one after another, beside a long free sleep."""
    return [
        node("a", "echo", value=1),
        node("b", "echo", ["a"], value="$a"),
        node("c", "echo", ["b"], value="$b"),
        node("d", "echo", ["c"], value="$c"),
        node("long", "sleep", ms=30_000),
    ]


def options(**fields: object) -> executor_pb2.RunOptions:
    return executor_pb2.RunOptions(**fields)  # type: ignore[arg-type]


async def collect(client: ExecutorClient, request: executor_pb2.RunRequest):
    return [event async for event in client.run(request)]


def of_kind(events, kind: str):
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


async def _stack(tmp_path: Path, **overrides: object) -> Stack:
    tools = tmp_path / "tools.yaml"
    tools.write_text(TOOLS)
    return await start_stack(
        database_url=f"sqlite:///{tmp_path}/trellis.db",
        tools_file=tools,
        tools_reload_seconds=0,
        **overrides,
    )


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Server defaults: no cost limit, 50 nodes, one replan, a 300 s run."""
    running = await _stack(tmp_path)
    yield running
    await running.stop()


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Stack]:
    """Server ceilings: $0.0025 per run, 5 nodes, no replanning, 3 s per run."""
    running = await _stack(
        tmp_path,
        max_run_cost_usd="0.0025",
        max_nodes=5,
        max_replans=0,
        run_timeout_seconds=3,
    )
    yield running
    await running.stop()


def client(stack: Stack, channels) -> ExecutorClient:
    return ExecutorClient(channels.get(stack.executor_target), timeout=60)


# -- max cost per run ------------------------------------------------------------------------


def assert_stopped_by_cost(events, *, limit: int, spent: int, started: set[str]) -> None:
    finished = events[-1].finished
    assert finished.status == FAILED, finished
    assert finished.error.code == "RUN_COST_EXCEEDED"
    assert finished.error.retryable is False
    assert dict(finished.error.details) == {
        "limit_nano_usd": str(limit),
        "cost_nano_usd": str(spent),
    }
    assert finished.cost_nano_usd == spent  # a failed run still says what it cost
    assert {s.node_id for s in of_kind(events, "node_started")} == started  # nothing after
    outcomes = {f.outcome.node_id: f.outcome for f in of_kind(events, "node_finished")}
    assert outcomes["long"].status == NODE_CANCELLED  # in flight when the limit was crossed
    paid = {n for n in outcomes if n != "long"}
    assert paid == started - {"long"} and all(outcomes[n].status == NODE_SUCCEEDED for n in paid)


async def test_run_option_stops_the_run_when_its_cost_goes_over(stack, channels) -> None:
    executor = client(stack, channels)
    begun = time.monotonic()
    request = executor_pb2.RunRequest(
        run_id="costly", plan=chain_plan(), options=options(max_cost_nano_usd=CAP)
    )
    events = await collect(executor, request)
    assert time.monotonic() - begun < 15  # the 30 s sleep was cancelled, not waited for
    # a, b, c: three echoes are over two and a half: the run stops; d never starts.
    assert_stopped_by_cost(events, limit=CAP, spent=3 * ECHO_COST, started={"a", "b", "c", "long"})
    stored = await executor.get_run("costly")
    assert stored.status == FAILED and stored.error.code == "RUN_COST_EXCEEDED"
    assert stored.cost_nano_usd == 3 * ECHO_COST


async def test_a_run_within_its_cost_limit_succeeds(stack, channels) -> None:
    plan = [n for n in chain_plan() if n.node_id != "long"]
    request = executor_pb2.RunRequest(plan=plan, options=options(max_cost_nano_usd=4 * ECHO_COST))
    finished = (await collect(client(stack, channels), request))[-1].finished
    assert finished.status == SUCCEEDED, finished.error
    assert finished.cost_nano_usd == 4 * ECHO_COST


async def test_server_default_and_ceiling_of_the_cost_limit(capped, channels) -> None:
    executor = client(capped, channels)
    lower = ECHO_COST + ECHO_COST // 2
    cases = [
        (options(), CAP, {"a", "b", "c", "long"}),  # TRELLIS_MAX_RUN_COST_USD applies
        (options(max_cost_nano_usd=10 * CAP), CAP, {"a", "b", "c", "long"}),  # capped by it
        (options(max_cost_nano_usd=lower), lower, {"a", "b", "long"}),  # a lower one is kept
    ]
    for run_options, limit, started in cases:
        request = executor_pb2.RunRequest(plan=chain_plan(), options=run_options)
        events = await collect(executor, request)
        spent = len(started - {"long"}) * ECHO_COST
        assert_stopped_by_cost(events, limit=limit, spent=spent, started=started)


async def test_model_usage_counts_and_no_model_call_follows(stack, channels) -> None:
    assert stack.model is not None
    before = len(stack.model.requests)
    request = executor_pb2.RunRequest(goal=DEMO_GOAL, options=options(max_cost_nano_usd=1))
    events = await collect(client(stack, channels), request)
    finished = events[-1].finished
    assert finished.status == FAILED and finished.error.code == "RUN_COST_EXCEEDED"
    assert "planning round 0" in finished.error.message
    assert finished.usage.input_tokens > 0 and finished.cost_nano_usd > 1
    assert len(stack.model.requests) - before == 1  # the plan; no join
    assert not of_kind(events, "answer_delta")


# -- max plan nodes ----------------------------------------------------------------------------


async def test_explicit_plan_over_max_nodes_is_refused_before_anything_runs(
    stack, capped, channels
) -> None:
    three = [node(f"n{i}", "echo", value=i) for i in range(3)]
    request = executor_pb2.RunRequest(run_id="big", plan=three, options=options(max_nodes=2))
    with pytest.raises(InvalidArgument) as raised:
        await collect(client(stack, channels), request)
    assert raised.value.reason == "TOO_MANY_NODES"
    assert [v.field for v in raised.value.violations] == ["plan[2]"]
    with pytest.raises(NotFound):
        await client(stack, channels).get_run("big")
    # TRELLIS_MAX_NODES is also the ceiling of what a run may ask for.
    six = [node(f"n{i}", "echo", value=i) for i in range(6)]
    request = executor_pb2.RunRequest(plan=six, options=options(max_nodes=100))
    with pytest.raises(InvalidArgument) as raised:
        await collect(client(capped, channels), request)
    assert raised.value.reason == "TOO_MANY_NODES" and "more than 5 nodes" in raised.value.message


async def test_streamed_plan_over_max_nodes_fails_the_run(stack, channels) -> None:
    events = []
    request = executor_pb2.RunRequest(goal=DEMO_GOAL, options=options(max_nodes=2))
    with pytest.raises(InvalidArgument) as raised:
        async for event in client(stack, channels).run(request):
            events.append(event)
    # The planner stops the plan at the limit, with the executor's reason for it; the
    # nodes before it ran; the stream ends with ``finished`` and then the status.
    assert raised.value.reason == "TOO_MANY_NODES" and "more than 2 nodes" in raised.value.message
    finished = events[-1].finished
    assert finished.status == FAILED and finished.error.code == "TOO_MANY_NODES"
    assert len(of_kind(events, "node_planned")) == 2


# -- max replans -------------------------------------------------------------------------------


async def test_no_replan_beyond_max_replans_the_join_must_answer(capped, channels) -> None:
    # TRELLIS_MAX_REPLANS=0 is the ceiling: a run asking for 3 rounds gets none.
    # (tests/services/trellis_planner/test_planner_replan.py runs max_replans=1 to its end.)
    assert capped.model is not None
    script_of(capped.model).push(Behaviour(), Behaviour(text="REPLAN: need more"))
    before = len(capped.model.requests)
    request = executor_pb2.RunRequest(goal="What is 2+3?", options=options(max_replans=3))
    finished = (await collect(client(capped, channels), request))[-1].finished
    assert finished.status == SUCCEEDED  # not an error: the last round answers
    assert finished.answer == "REPLAN: need more"  # as the model wrote it
    assert len(capped.model.requests) - before == 2  # one plan, one join, no second round
    assert "REPLAN" not in capped.model.requests[-1]["messages"][0]["content"]


# -- run duration ------------------------------------------------------------------------------


async def test_server_run_timeout_fails_the_run_with_deadline_exceeded(capped, channels) -> None:
    begun = time.monotonic()
    request = executor_pb2.RunRequest(plan=[node("slow", "sleep", ms=30_000)])
    events = await collect(client(capped, channels), request)
    assert time.monotonic() - begun < 15
    finished = events[-1].finished
    assert finished.status == FAILED
    assert finished.error.code == "DEADLINE_EXCEEDED"
    assert finished.error.message == "run exceeded its deadline of 3s"
    assert of_kind(events, "node_finished")[0].outcome.status == NODE_CANCELLED


# -- max message size --------------------------------------------------------------------------


async def test_a_request_over_the_message_size_is_refused_and_the_executor_serves_on(
    stack,
) -> None:
    # A client that sends anything: the server's TRELLIS_MAX_MESSAGE_BYTES (4 MiB) decides.
    unlimited = [("grpc.max_send_message_length", -1)]
    async with aio.insecure_channel(stack.executor_target, options=unlimited) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        huge = executor_pb2.RunRequest(goal="x" * (5 * 1024 * 1024))
        with pytest.raises(aio.AioRpcError) as raised:
            async for _ in stub.Run(huge, timeout=30):
                pass
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (raised.value.details() or "")
        small = executor_pb2.RunRequest(plan=[node("a", "echo", value=1)])
        events = [event async for event in stub.Run(small, timeout=30)]
        assert events[-1].finished.status == SUCCEEDED


# -- max output size per tool ------------------------------------------------------------------


async def test_an_output_over_its_tools_cap_fails_the_node_the_rest_runs(stack, channels) -> None:
    plan = [
        node("big", "small_echo", value="z" * 5000),
        node("after", "echo", ["big"], value="$big"),
        node("other", "small_echo", value="fits"),
    ]
    events = await collect(client(stack, channels), executor_pb2.RunRequest(plan=plan))
    outcomes = {f.outcome.node_id: f.outcome for f in of_kind(events, "node_finished")}
    assert outcomes["big"].error.code == "OUTPUT_TOO_LARGE"
    assert outcomes["big"].error.details["limit_bytes"] == "1000"
    assert outcomes["after"].error.code == "DEPENDENCY_FAILED"
    assert outcomes["other"].status == NODE_SUCCEEDED
    finished = events[-1].finished  # an explicit plan with a failed node fails, naming it
    assert (finished.status, finished.error.code, finished.error.details["node_id"]) == (
        executor_pb2.RUN_STATUS_FAILED,
        "OUTPUT_TOO_LARGE",
        "big",
    )
