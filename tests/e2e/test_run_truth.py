"""Whatever way a run ends, what Trellis reports about it is true (five processes).

- Statuses: SUCCEEDED only when the run answered and no node failed unrecovered; an
  explicit plan with a failed node is FAILED naming it; a goal run that answered
  although a node failed is PARTIAL; a failure a later round recovered is not.
- Costs: every ending's ``finished`` (and GetRun) holds exactly the tokens and nano-USD
  the ledger holds for the run, estimated rows flagged — walked through in one test,
  model-tool nodes (their own model calls, batched or not) included.
- Deadlines: whoever's deadline passes, the run ends FAILED DEADLINE_EXCEEDED with its
  nodes in flight CANCELLED; a client that cancels gets CANCELLED.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from tests.support.model_script import script_of
from tests.support.tools_files import with_model_tools
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.convert import to_struct

RunStatus = executor_pb2.RunStatus
SUCCEEDED = RunStatus.RUN_STATUS_SUCCEEDED
FAILED = RunStatus.RUN_STATUS_FAILED
PARTIAL = RunStatus.RUN_STATUS_PARTIAL
CANCELLED = RunStatus.RUN_STATUS_CANCELLED
RUNNING = RunStatus.RUN_STATUS_RUNNING
NODE_CANCELLED = common_pb2.NODE_STATUS_CANCELLED


def node(node_id: str, tool: str, deps: tuple[str, ...] = (), **args) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(node_id=node_id, tool=tool, args=to_struct(args), depends_on=deps)


def line(node_id: str, tool: str, **args) -> str:
    """One plan line as a model writes it."""
    return json.dumps({"node_id": node_id, "tool": tool, "args": args, "depends_on": []}) + "\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def run(
    stub: executor_pb2_grpc.ExecutorServiceStub, request: executor_pb2.RunRequest, **kw
) -> tuple[list[executor_pb2.RunResponse], grpc.StatusCode]:
    """The run's events and the call's final status code."""
    events = []
    call = stub.Run(request, timeout=kw.pop("timeout", 60), **kw)
    try:
        async for event in call:
            events.append(event)
    except aio.AioRpcError as error:
        return events, error.code()
    return events, grpc.StatusCode.OK


async def stored(stub, run_id: str, *, settled: bool = True) -> executor_pb2.Run:
    """GetRun, once the run is no longer RUNNING (when ``settled``)."""
    for _ in range(200):
        reply = await stub.GetRun(executor_pb2.GetRunRequest(run_id=run_id), timeout=10)
        if not settled or reply.run.status != RUNNING:
            return reply.run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} still RUNNING")


@pytest.fixture
async def stack(process_stack, tmp_path: Path):
    tools = with_model_tools(tmp_path)
    return await process_stack(
        per_service={
            "executor": {"TRELLIS_GATEWAY_RETRY_SECONDS": "1"},
            "toolgateway": {"TRELLIS_TOOLS_FILE": str(tools)},
        }
    )


@pytest.fixture
async def stub(stack):
    async with aio.insecure_channel(stack.executor_target) as channel:
        yield executor_pb2_grpc.ExecutorServiceStub(channel)


# -- statuses ----------------------------------------------------------------------------


async def test_an_explicit_plan_with_a_failed_node_fails_naming_it(stub) -> None:
    plan = [
        node("ok", "echo", value=1),
        node("zero", "arithmetic", expression="1/0"),
        node("after", "echo", ("zero",), value="$zero"),
    ]
    events, code = await run(stub, executor_pb2.RunRequest(run_id=new_id("x"), plan=plan))
    finished = events[-1].finished
    assert (code, finished.status, finished.failed_nodes) == (grpc.StatusCode.OK, FAILED, 1)
    assert (finished.error.code, finished.error.details["node_id"]) == ("ARITHMETIC_ERROR", "zero")
    assert finished.error.message.startswith("node zero (arithmetic) failed: division by zero")
    run_ = await stored(stub, events[0].run_id)
    assert (run_.status, run_.failed_nodes, run_.error.code) == (FAILED, 1, "ARITHMETIC_ERROR")
    # ... and one whose nodes all succeeded still succeeds
    events, _ = await run(stub, executor_pb2.RunRequest(plan=[node("a", "echo", value=1)]))
    assert (events[-1].finished.status, events[-1].finished.failed_nodes) == (SUCCEEDED, 0)


async def test_a_goal_run_that_answered_although_a_node_failed_is_partial(stub, model) -> None:
    script_of(model).reply(line("n1", "arithmetic", expression="1/0"))
    script_of(model).reply("I could not compute it: division by zero.")
    events, _ = await run(stub, executor_pb2.RunRequest(goal="What is 1/0?"))
    finished = events[-1].finished
    assert (finished.status, finished.failed_nodes) == (PARTIAL, 1)
    assert finished.answer == "I could not compute it: division by zero."
    assert (finished.error.code, finished.error.details["node_id"]) == ("ARITHMETIC_ERROR", "n1")
    assert "1 node failed: n1 (arithmetic: ARITHMETIC_ERROR)" in finished.error.message
    run_ = await stored(stub, events[0].run_id)
    assert (run_.status, run_.failed_nodes, run_.answer) == (PARTIAL, 1, finished.answer)


async def test_a_failure_a_later_round_recovered_does_not_make_a_run_partial(stub, model) -> None:
    script_of(model).reply(line("n1", "arithmetic", expression="1/0"))
    script_of(model).reply("REPLAN: n1 divided by zero; compute 2+2 instead")
    script_of(model).reply(line("n2", "arithmetic", expression="2+2"))
    script_of(model).reply("It is 4.")
    options = executor_pb2.RunOptions(max_replans=1)
    events, _ = await run(stub, executor_pb2.RunRequest(goal="What is 2+2?", options=options))
    finished = events[-1].finished
    assert (finished.status, finished.failed_nodes, finished.answer) == (SUCCEEDED, 0, "It is 4.")
    assert not finished.HasField("error")


async def test_with_the_gateway_down_runs_are_not_succeeded(stack, stub) -> None:
    """The catalog is cached; the gateway then dies: a goal run answers PARTIAL (its
    node failed UNAVAILABLE after the re-dispatch window), an explicit plan FAILS."""
    events, _ = await run(stub, executor_pb2.RunRequest(goal="What is 2+2?"))
    assert events[-1].finished.status == SUCCEEDED
    stack.processes["toolgateway"].kill()
    events, _ = await run(stub, executor_pb2.RunRequest(goal="What is 3+3?"))
    finished = events[-1].finished
    assert (finished.status, finished.error.code, finished.failed_nodes) == (
        PARTIAL,
        "UNAVAILABLE",
        1,
    ), finished
    events, _ = await run(stub, executor_pb2.RunRequest(plan=[node("a", "echo", value=1)]))
    finished = events[-1].finished
    assert (finished.status, finished.error.code) == (FAILED, "UNAVAILABLE"), finished


# -- the deadline rule -------------------------------------------------------------------


async def test_every_deadline_ends_the_run_failed_deadline_exceeded(stub, model) -> None:
    """40 runs at once, cut by the caller's deadline or their own timeout, in a tool or
    while the model plans: all FAILED DEADLINE_EXCEEDED, none SUCCEEDED, none RUNNING,
    every node that was in flight CANCELLED. A client that cancels gets CANCELLED."""
    model.state.delay_ms = 40  # a goal's plan takes seconds to stream
    sleepy = [node("nap", "sleep", ms=5000), node("after", "echo", ("nap",), value="$nap")]

    async def one(i: int) -> str:
        run_id = new_id(f"late{i}")
        request = executor_pb2.RunRequest(run_id=run_id)
        if i % 2:
            request.plan.extend(sleepy)
        else:
            request.goal = "Report this machine's OS, disk usage and uptime"
        deadline = 0.4 + (i % 5) * 0.2
        if i % 4 < 2:  # the caller's deadline
            _, code = await run(stub, request, timeout=deadline)
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
        else:  # the run's own timeout; the caller waits
            request.options.timeout.FromMilliseconds(int(deadline * 1000))
            events, code = await run(stub, request)
            assert code == grpc.StatusCode.OK and events[-1].finished.status == FAILED
        return run_id

    run_ids = await asyncio.gather(*(one(i) for i in range(40)))
    runs = [await stored(stub, run_id) for run_id in run_ids]
    assert {(r.status, r.error.code) for r in runs} == {(FAILED, "DEADLINE_EXCEEDED")}, [
        (r.run_id, r.status, r.error.code) for r in runs if r.error.code != "DEADLINE_EXCEEDED"
    ]
    for r in runs:
        for outcome in r.outcomes:  # nothing ran to its end; what was running: CANCELLED
            assert (outcome.status, outcome.error.code) == (NODE_CANCELLED, "CANCELLED"), r

    request = executor_pb2.RunRequest(run_id=new_id("gone"), plan=sleepy)
    call = stub.Run(request, timeout=30)
    async for event in call:
        if event.HasField("node_started"):
            call.cancel()
            break
    assert (await stored(stub, request.run_id)).status == CANCELLED


# -- usage and cost of every ending ------------------------------------------------------


def ledger_of(db: Path) -> Callable[[str], tuple[int, int, int, bool]]:
    """(input tokens, output tokens, nano-USD, estimated) the ledger holds for a run."""

    def read(run_id: str) -> tuple[int, int, int, bool]:
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),"
                " COALESCE(SUM(cost_nano_usd), 0), COALESCE(MAX(estimated), 0)"
                " FROM usage WHERE run_id = ?",
                (run_id,),
            ).fetchone()
        return row[0], row[1], row[2], bool(row[3])

    return read


async def test_every_ending_reports_what_the_ledger_holds(stub, model, tmp_path: Path) -> None:
    ledger = ledger_of(tmp_path / "costs.db")
    endings: dict[str, executor_pb2.Run] = {}

    async def ending(name: str, request: executor_pb2.RunRequest, **kw) -> None:
        request.run_id = new_id(name)
        events, _ = await run(stub, request, **kw)
        run_ = await stored(stub, request.run_id)
        if events and events[-1].HasField("finished"):  # the stream and the store agree
            finished = events[-1].finished
            assert (finished.usage, finished.cost_nano_usd) == (run_.usage, run_.cost_nano_usd)
        endings[name] = run_

    await ending("succeeded", executor_pb2.RunRequest(goal="What is 2+2?"))
    script_of(model).reply(line("n1", "arithmetic", expression="1/0"))
    await ending("partial", executor_pb2.RunRequest(goal="What is 1/0?"))
    script_of(model).reply(line("n1", "echo", value=1) + "not a plan\n")
    await ending("repaired", executor_pb2.RunRequest(goal="What is 5+5?"))
    script_of(model).reply("not a plan\n", times=2)
    await ending("invalid_plan", executor_pb2.RunRequest(goal="What is 6+6?"))
    capped = executor_pb2.RunOptions(max_cost_nano_usd=1)
    await ending("cost_cap", executor_pb2.RunRequest(goal="What is 7+7?", options=capped))
    zero = node("z", "arithmetic", expression="1/0")
    await ending("explicit_failed", executor_pb2.RunRequest(plan=[zero]))
    model.state.delay_ms = 40
    timeout = executor_pb2.RunOptions()
    timeout.timeout.FromMilliseconds(700)
    await ending("timed_out", executor_pb2.RunRequest(goal=DEMO, options=timeout))
    await ending("caller_deadline", executor_pb2.RunRequest(goal=DEMO), timeout=0.8)

    request = executor_pb2.RunRequest(goal=DEMO, run_id=new_id("cancelled"))
    call = stub.Run(request, timeout=30)
    async for event in call:
        if event.HasField("node_planned"):
            call.cancel()  # mid-plan: the model call is cut, its tokens estimated
            break
    endings["cancelled"] = await stored(stub, request.run_id)

    # Model tools' nodes: their model calls are the run's too (batched or not) ...
    model.state.delay_ms = 0
    texts = [f"Report {i} says {'much ' * i}about disks. It ends here." for i in range(4)]
    plan = [node(f"s{i}", "summarize", text=t) for i, t in enumerate(texts[:2])]
    plan += [node(f"b{i}", "summarize_many", text=t) for i, t in enumerate(texts[2:])]
    plan.append(node("after", "echo", ("s0", "b1"), value="${s0.summary} ${b1.summary}"))
    await ending("model_tools", executor_pb2.RunRequest(plan=plan))
    # ... also when the run's deadline cuts one short, or its client leaves mid-call.
    slow = [node("slow", "summarize", text="The disk is full of logs and old images.")]
    script_of(model).stall(3)
    await ending("model_tool_timed_out", executor_pb2.RunRequest(plan=slow, options=timeout))
    script_of(model).stall(3)
    request = executor_pb2.RunRequest(plan=slow, run_id=new_id("model_tool_cancelled"))
    call = stub.Run(request, timeout=30)
    async for event in call:
        if event.HasField("node_started"):
            await asyncio.sleep(0.4)  # the model is working on its answer
            call.cancel()
            break
    endings["model_tool_cancelled"] = await stored(stub, request.run_id)

    expected = {
        "succeeded": (SUCCEEDED, ""),
        "partial": (PARTIAL, "ARITHMETIC_ERROR"),
        "repaired": (SUCCEEDED, ""),
        "invalid_plan": (FAILED, "INVALID_PLAN"),
        "cost_cap": (FAILED, "RUN_COST_EXCEEDED"),
        "explicit_failed": (FAILED, "ARITHMETIC_ERROR"),
        "timed_out": (FAILED, "DEADLINE_EXCEEDED"),
        "caller_deadline": (FAILED, "DEADLINE_EXCEEDED"),
        "cancelled": (CANCELLED, "CANCELLED"),
        "model_tools": (SUCCEEDED, ""),
        "model_tool_timed_out": (FAILED, "DEADLINE_EXCEEDED"),
        "model_tool_cancelled": (CANCELLED, "CANCELLED"),
    }
    assert {k: (r.status, r.error.code) for k, r in endings.items()} == expected
    for name, run_ in endings.items():
        usage = run_.usage
        reported = (usage.input_tokens, usage.output_tokens, run_.cost_nano_usd, usage.estimated)
        assert reported == ledger(run_.run_id), name
    # the endings that spent something spent it on the model, and some of it estimated
    spent = ("invalid_plan", "cost_cap", "timed_out", "caller_deadline", "cancelled")
    for name in (*spent, "model_tools", "model_tool_timed_out", "model_tool_cancelled"):
        assert endings[name].usage.input_tokens > 0 and endings[name].cost_nano_usd > 0, name
    cut = ("timed_out", "caller_deadline", "cancelled", "model_tool_timed_out")
    for name in (*cut, "model_tool_cancelled"):
        assert endings[name].usage.estimated, name
    assert endings["explicit_failed"].cost_nano_usd == 0
    # the explicit plans made no planner call: every token is a model tool's
    model_nodes = {
        o.node_id: o.usage for o in endings["model_tools"].outcomes if o.usage.input_tokens
    }
    assert set(model_nodes) == {"s0", "s1", "b0", "b1"}
    assert (
        sum(u.input_tokens for u in model_nodes.values())
        == endings["model_tools"].usage.input_tokens
    )


DEMO = "Report this machine's OS, disk usage and uptime"
