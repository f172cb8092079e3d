"""Every plan format end to end: the five services as processes (``process_stack``), the
offline model (rules, or a scripted stream) answering the planner's real openai client.

One stack serves the three formats: ``TRELLIS_MODEL_PLAN_FORMATS`` gives each of three
model names its format, and each run names its model (RunOptions.model). Then: model
misbehaviour seen by the whole run, the answer a run gives when no model can write one,
and the model breaker across runs. What every run reports costing is what the ledger
holds (GetRunUsage).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.model_script import script_of
from trellis.clients.costs import CostsClient
from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import from_struct
from trellis_offline_model.behaviour import Behaviour

RunStatus = executor_pb2.RunStatus
DEMO = "Report this machine's OS, disk usage and uptime"
CHAINED = "compute 6*7 then echo the result"
FORMATS = {
    "fmt-jsonl": "jsonl",
    "fmt-json": "json_schema",
    "fmt-tools": "tool_calls",
}
PROTO_FORMAT = {
    "jsonl": common_pb2.PLAN_FORMAT_JSONL,
    "json_schema": common_pb2.PLAN_FORMAT_JSON_SCHEMA,
    "tool_calls": common_pb2.PLAN_FORMAT_TOOL_CALLS,
}


class Runs:
    def __init__(self, executor: ExecutorClient, costs: CostsClient) -> None:
        self.executor = executor
        self.costs = costs

    async def run(self, goal: str, model: str = "", **options) -> list[executor_pb2.RunResponse]:
        request = executor_pb2.RunRequest(
            goal=goal, options=executor_pb2.RunOptions(model=model, **options)
        )
        return [event async for event in self.executor.run(request)]

    async def ledger(self, run_id: str):
        return await self.costs.get_run_usage(run_id)


@pytest.fixture
async def stack(process_stack, channels):
    stack = await process_stack(
        per_service={
            "planner": {
                "TRELLIS_MODEL_PLAN_FORMATS": json.dumps(FORMATS),
                "TRELLIS_MODEL_MAX_RETRIES": "0",
            }
        }
    )
    executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)
    return stack, Runs(executor, CostsClient(channels.get(stack.target("costs"))))


def planned(events) -> list[tuple[str, str, dict]]:
    return [
        (
            e.node_planned.call.node_id,
            e.node_planned.call.tool,
            from_struct(e.node_planned.call.args),
        )
        for e in events
        if e.HasField("node_planned")
    ]


def answer_of(events) -> str:
    return "".join(e.answer_delta.text for e in events if e.HasField("answer_delta"))


def model_calls(held) -> list[str]:
    """The steps of the run's model calls in the ledger (``plan/0``, ``join/0``...)."""
    return sorted(u.split("/", 1)[1] for u in held.usage_ids if "/tool/" not in u)


def assert_true_cost(finished: executor_pb2.RunFinished, held) -> None:
    assert finished.usage.input_tokens == held.model_usage.input_tokens
    assert finished.usage.output_tokens == held.model_usage.output_tokens
    assert finished.usage.cost_nano_usd == held.model_usage.cost_nano_usd


@pytest.mark.parametrize("name", list(FORMATS))
async def test_each_format_runs_the_demo_goal(stack, name: str) -> None:
    _, runs = stack
    events = await runs.run(DEMO, name)
    finished = events[-1].finished
    assert finished.status == RunStatus.RUN_STATUS_SUCCEEDED, finished.error
    assert [(tool, args) for _, tool, args in planned(events)] == [
        ("run_command", {"command": "uname -a"}),
        ("run_command", {"command": "df -h"}),
        ("run_command", {"command": "uptime"}),
    ]
    assert finished.answer.startswith(f"Results for: {DEMO}")
    assert finished.answer == answer_of(events)
    run = await runs.executor.get_run(events[0].run_id)
    assert run.plan_format == PROTO_FORMAT[FORMATS[name]]
    held = await runs.ledger(events[0].run_id)
    assert model_calls(held) == ["join/0", "plan/0"]
    assert_true_cost(finished, held)


async def test_tool_calls_rounds_come_from_the_join_without_another_plan(stack) -> None:
    _, runs = stack
    events = await runs.run(CHAINED, "fmt-tools")
    finished = events[-1].finished
    assert finished.status == RunStatus.RUN_STATUS_SUCCEEDED, finished.error
    assert planned(events) == [
        ("n1", "arithmetic", {"expression": "6*7"}),
        ("n2", "echo", {"value": {"result": 42}}),  # the result itself: the conversation
    ]
    kinds = [e.WhichOneof("event") for e in events]
    first_done = kinds.index("node_finished")
    assert kinds.index("node_planned", first_done) > first_done  # round 2 after round 1
    assert finished.answer.splitlines()[1:] == [
        "- 6*7 = 42",
        '- echo {"value": {"result": 42}}: 42',
    ]
    run_id = events[0].run_id
    held = await runs.ledger(run_id)
    # the join that called echo was the only model call of round 1: no plan/1
    assert model_calls(held) == ["join/0", "join/1", "plan/0"]
    assert_true_cost(finished, held)
    # the same goal in JSON Lines is one round: the plan references n1
    events = await runs.run(CHAINED, "fmt-jsonl")
    assert planned(events)[1] == ("n2", "echo", {"value": "$n1"})


async def test_a_goal_no_tool_matches_says_what_is_available(stack) -> None:
    _, runs = stack
    for name in FORMATS:
        events = await runs.run("Écris-moi un poème sur la mer", name)
        finished = events[-1].finished
        assert finished.status == RunStatus.RUN_STATUS_SUCCEEDED
        assert "No available tool matches this goal" in finished.answer
        assert "- run_command: Run one read-only system command" in finished.answer
    held = await runs.ledger(events[0].run_id)
    assert model_calls(held) == ["plan/0"]  # tool_calls: answered at once


async def test_misbehaving_models_are_repaired_or_named(stack, model) -> None:
    _, runs = stack
    script_of(model).tool_calls(
        ("run_command", '{"command": "uname -a"}'),
        ("run_command", '{"command": df -h}'),  # not JSON
    )
    events = await runs.run(DEMO, "fmt-tools")
    finished = events[-1].finished
    assert finished.status == RunStatus.RUN_STATUS_SUCCEEDED, finished.error
    assert [a["command"] for _, _, a in planned(events)] == ["uname -a", "df -h", "uptime"]
    held = await runs.ledger(events[0].run_id)
    assert model_calls(held) == ["join/0", "plan-repair/0", "plan/0"]
    assert_true_cost(finished, held)

    script_of(model).deltas({"refusal": "I won't run commands."})
    events = await runs.run(DEMO, "fmt-json")
    finished = events[-1].finished
    assert finished.status == RunStatus.RUN_STATUS_FAILED
    assert finished.error.code == "MODEL_REFUSED"
    assert "I won't run commands." in finished.error.message
    held = await runs.ledger(events[0].run_id)
    assert model_calls(held) == ["plan/0"]
    assert_true_cost(finished, held)


async def test_no_model_to_join_the_run_answers_with_its_tool_results(stack, model) -> None:
    _, runs = stack
    # the plan by the rules, then the join fails (no retries, no fallback model)
    script_of(model).push(Behaviour(), Behaviour(status=503, message="overloaded"))
    events = await runs.run("What is (17*23)+4? And the uptime?", "fmt-jsonl")
    finished = events[-1].finished
    assert finished.status == RunStatus.RUN_STATUS_PARTIAL
    assert finished.error.code == "MODEL_UNAVAILABLE"
    assert finished.error.details["cause"] == "MODEL_UNAVAILABLE"
    assert "no model could answer" in finished.error.message
    lines = finished.answer.splitlines()
    assert lines[0].startswith("No model could answer (MODEL_UNAVAILABLE: ")
    assert lines[0].endswith("so here is what each tool returned:")
    assert lines[1].startswith('- n1 run_command {"command": "uptime"}: {')
    assert lines[2] == '- n2 arithmetic {"expression": "(17*23)+4"}: {"result": 395}'
    assert finished.answer == answer_of(events) and finished.failed_nodes == 0
    held = await runs.ledger(events[0].run_id)
    assert model_calls(held) == ["join/0", "plan/0"]
    assert_true_cost(finished, held)


async def test_a_dead_model_is_skipped_across_runs(process_stack, channels, model, redis_server):
    stack = await process_stack(
        per_service={
            "planner": {
                "TRELLIS_MODEL_MAX_RETRIES": "0",
                "TRELLIS_FALLBACK_MODELS": "backup-model",
                "TRELLIS_MODEL_BREAKER_FAILURES": "2",
                "TRELLIS_REDIS_URL": redis_server.url,
            }
        }
    )
    script = script_of(model)
    script.fail_model("dead-model")
    executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)
    runs = Runs(executor, CostsClient(channels.get(stack.target("costs"))))
    for _ in range(2):
        events = await runs.run("What is 2+3?", "dead-model")
        assert events[-1].finished.status == RunStatus.RUN_STATUS_SUCCEEDED
    # run 1: plan and join each failed on the dead model, then the backup answered;
    # the breaker opened after those two failures, so run 2 never asked the dead model
    assert script.models == ["dead-model", "backup-model"] * 2 + ["backup-model"] * 2
    port = stack.metrics_ports["planner"]
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    assert 'trellis_model_breaker_state{model="dead-model"} 2.0' in metrics


def write_tools_file(path: Path, weather_port: int, mcp_server: Path) -> Path:
    path.write_text(
        f"""\
version: 1
tools:
  - name: weather
    kind: http
    description: Current weather of a city, from the weather service.
    url: http://127.0.0.1:{weather_port}/weather/{{city}}
    allowed_hosts: ["127.0.0.1"]
mcp_servers:
  - name: calculator
    command: [{json.dumps(sys.executable)}, {json.dumps(str(mcp_server))}]
    prefix: calc_
"""
    )
    return path


async def test_the_offline_model_plans_for_tools_it_has_never_seen(
    process_stack, channels, tmp_path: Path
) -> None:
    from aiohttp import web

    seen: list[str] = []

    async def weather(request: web.Request) -> web.Response:
        seen.append(request.match_info["city"])
        return web.json_response({"city": request.match_info["city"], "sky": "clear"})

    app = web.Application()
    app.router.add_get("/weather/{city}", weather)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server = Path(__file__).parents[1] / "services/trellis_toolgateway/servers/mcp_tools_server.py"
    tools = write_tools_file(tmp_path / "my-tools.yaml", port, server)
    try:
        stack = await process_stack(per_service={"toolgateway": {"TRELLIS_TOOLS_FILE": str(tools)}})
        executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)
        runs = Runs(executor, CostsClient(channels.get(stack.target("costs"))))
        # the built-in table: the offline model gets JSON Lines, a Hugging Face name
        # JSON Schema, an OpenAI name tool calls
        for model in ("", "org/some-model"):
            events = await runs.run("What is the weather in Paris?", model)
            finished = events[-1].finished
            assert finished.status == RunStatus.RUN_STATUS_SUCCEEDED, finished.error
            assert planned(events) == [("n1", "weather", {"city": "Paris"})]
            assert '"sky": "clear"' in finished.answer
        assert seen == ["Paris"] * 2

        events = await runs.run("Add 2 and 3 with the calculator", "gpt-4o")  # tool_calls
        finished = events[-1].finished
        assert finished.status == RunStatus.RUN_STATUS_SUCCEEDED, finished.error
        assert planned(events) == [("n1", "calc_add", {"a": 2, "b": 3})]
        assert '{"sum": 5}' in finished.answer

        events = await runs.run("天気はどうですか")  # nothing matches: the tools are listed
        answer = events[-1].finished.answer
        assert "- weather: Current weather of a city, from the weather service." in answer
        assert "- calc_add: Add two integers." in answer
    finally:
        await runner.cleanup()


async def test_a_run_answers_with_its_results_when_the_planner_dies_in_the_join(
    stack, model
) -> None:
    """The executor builds the fallback answer: it needs no planner for it."""
    processes, runs = stack
    script_of(model).push(Behaviour(), Behaviour(stall_seconds=60))  # the join hangs
    request = executor_pb2.RunRequest(goal="What is (17*23)+4?")
    events: list[executor_pb2.RunResponse] = []

    async def follow() -> None:
        async for event in runs.executor.run(request):
            events.append(event)

    task = asyncio.create_task(follow())
    for _ in range(300):  # until the join's request reached the model
        if len(model.requests) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(model.requests) == 2
    processes.processes["planner"].kill()
    await asyncio.wait_for(task, 30)
    finished = events[-1].finished
    assert finished.status == RunStatus.RUN_STATUS_PARTIAL
    assert finished.error.code == "MODEL_UNAVAILABLE"
    assert finished.error.details["cause"] == "UNAVAILABLE"
    assert finished.answer.splitlines()[1] == (
        '- n1 arithmetic {"expression": "(17*23)+4"}: {"result": 395}'
    )
    held = await runs.ledger(events[0].run_id)
    assert model_calls(held) == ["plan/0"]  # the join died with the planner, unrecorded
    assert_true_cost(finished, held)
