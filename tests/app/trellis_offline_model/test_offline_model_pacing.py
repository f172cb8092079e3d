"""Plan pacing (``line_delay_ms``, ``on_plan_node``) and repair rounds of the offline model.

Through the real openai client: a plan streams one line per ``line_delay_ms``, the hook
sees each line once it is written, answers and other texts are not line-paced; the rules
answer a repair request with the part of the plan that was not accepted.
"""

from __future__ import annotations

import itertools
import json
import time

from openai import AsyncOpenAI

from tests.support.model_script import script_of
from trellis_offline_model import planning
from trellis_offline_model.conversation import ChatRequest
from trellis_offline_model.rules import MODEL_ID, respond
from trellis_offline_model.server import RunningModel, start_offline_model
from trellis_offline_model.settings import OfflineModelSettings
from trellis_offline_model.tokens import lines

COMMANDS = (
    "Run one read-only system command. The command must be exactly one of these:\n"
    "- `uname -a`: operating system, os, kernel, system, platform\n"
    "- `df -h`: disk, disk usage, disk space, storage, filesystem, free space\n"
    "- `uptime`: uptime, load, load average, running\n"
)
CATALOG = [
    {"name": "run_command", "description": COMMANDS, "input_schema": {}},
    {"name": "echo", "description": "Return the value.", "input_schema": {}},
]
TOOLS = "\n".join(json.dumps(t) for t in CATALOG)
DEMO = "Report this machine's OS, disk usage and uptime"
PLAN_MESSAGES = [
    {"role": "system", "content": f"Plan.\n\n## Tools\n{TOOLS}\n"},
    {"role": "user", "content": DEMO},
]
JOIN_MESSAGES = [
    {"role": "user", "content": "x"},
    {
        "role": "user",
        "content": "Outcomes:\n"
        + "\n".join(
            json.dumps({"node_id": f"n{i}", "tool": "echo", "status": "SUCCEEDED", "output": i})
            for i in range(1, 4)
        ),
    },
]


async def stream_lines(model: RunningModel, messages, clock: list[float] | None = None):
    """(seconds since the request, line) for each complete line the client receives;
    ``clock`` gets the request's ``time.monotonic()``."""
    client = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=0)
    try:
        started = time.monotonic()
        if clock is not None:
            clock.append(started)
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=messages, stream=True
        )
        got, text = [], ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                while "\n" in text:
                    line, text = text.split("\n", 1)
                    got.append((time.monotonic() - started, line))
        if text:
            got.append((time.monotonic() - started, text))
        return got
    finally:
        await client.close()


async def test_line_delay_paces_each_plan_line_and_the_hook_sees_it() -> None:
    model = await start_offline_model(line_delay_ms=100)
    seen: list[tuple[float, str]] = []
    model.state.on_plan_node = lambda index, line: seen.append((time.monotonic(), line))
    try:
        clock: list[float] = []
        got = await stream_lines(model, PLAN_MESSAGES, clock)
    finally:
        await model.stop()
    commands = [json.loads(line)["args"]["command"] for _, line in got]
    assert commands == ["uname -a", "df -h", "uptime"]
    arrivals = [t for t, _ in got]
    assert arrivals[0] >= 0.1  # each line takes line_delay_ms, the first one included
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.08 <= gap <= 0.4 for gap in gaps), gaps
    assert [line for _, line in seen] == [line + "\n" for _, line in got]
    # the hook runs once the line's last piece is written: before the client has it
    assert all(at - clock[0] <= a for (at, _), a in zip(seen, arrivals, strict=True))


async def test_scripted_plans_are_paced_too(model: RunningModel) -> None:
    model.state.line_delay_ms = 60
    node = {"node_id": "x", "tool": "echo", "args": {"value": 1}, "depends_on": []}
    script_of(model).reply(json.dumps(node) + "\n" + json.dumps({**node, "node_id": "y"}) + "\n")
    got = await stream_lines(model, PLAN_MESSAGES)
    assert [json.loads(line)["node_id"] for _, line in got] == ["x", "y"]
    assert got[0][0] >= 0.06 and got[1][0] - got[0][0] >= 0.05


async def test_a_paced_line_still_streams_token_by_token(model: RunningModel) -> None:
    model.state.line_delay_ms = 50
    client = AsyncOpenAI(base_url=model.base_url, api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=PLAN_MESSAGES, stream=True
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    finally:
        await client.close()
    text = "".join(p or "" for p in pieces)
    assert len(text.splitlines()) == 3 and len([p for p in pieces if p]) > 30


async def test_answers_are_not_line_paced(model: RunningModel) -> None:
    model.state.line_delay_ms = 300
    lines_seen: list[str] = []
    model.state.on_plan_node = lambda index, line: lines_seen.append(line)
    started = time.monotonic()
    got = await stream_lines(model, JOIN_MESSAGES)
    assert len(got) == 4 and time.monotonic() - started < 0.3
    assert lines_seen == []


def test_plan_requests_are_told_from_others() -> None:
    assert ChatRequest({"messages": PLAN_MESSAGES}).is_plan()
    assert not ChatRequest({"messages": JOIN_MESSAGES}).is_plan()
    assert not ChatRequest({"messages": [{"role": "user", "content": "hello"}]}).is_plan()
    assert ChatRequest({"messages": JOIN_MESSAGES, "tools": []}).is_plan()


def test_lines_keep_their_newlines() -> None:
    assert lines("a\n\nb\nc") == ["a\n", "\n", "b\n", "c"]
    assert lines("") == []


def test_settings_take_the_line_delay(monkeypatch) -> None:
    monkeypatch.setenv("TRELLIS_OFFLINE_MODEL_LINE_DELAY_MS", "200")
    assert OfflineModelSettings().line_delay_ms == 200


# --- repair rounds ------------------------------------------------------------------------


def repair_request(accepted: list[dict], goal: str = DEMO) -> list[dict]:
    body = "\n".join(json.dumps(node) for node in accepted) or "(none)"
    return [
        *PLAN_MESSAGES[:1],
        {"role": "user", "content": goal},
        {"role": "assistant", "content": "whatever was wrong"},
        {
            "role": "user",
            "content": f"## Rejected lines\nline 2: oops\n\n## Accepted nodes\n{body}\n\nRest.",
        },
    ]


def node(node_id: str, command: str) -> dict:
    return {"node_id": node_id, "tool": "run_command", "args": {"command": command}}


def plan_text(messages: list[dict]) -> str:
    return respond({"messages": messages}).text


def test_a_repair_gets_the_nodes_not_yet_accepted() -> None:
    plan = plan_text(repair_request([node("n1", "uname -a")]))
    assert [json.loads(line) for line in plan.splitlines()] == [
        {"node_id": "n2", "tool": "run_command", "args": {"command": "df -h"}, "depends_on": []},
        {"node_id": "n3", "tool": "run_command", "args": {"command": "uptime"}, "depends_on": []},
    ]


def test_repaired_nodes_get_fresh_ids_after_the_accepted_ones() -> None:
    accepted = [node("a7", "df -h"), {"node_id": "n4", "tool": "echo", "args": {"value": 1}}]
    plan = plan_text(repair_request(accepted))
    assert [(n["node_id"], n["args"]["command"]) for n in map(json.loads, plan.splitlines())] == [
        ("n5", "uname -a"),
        ("n6", "uptime"),
    ]
    everything = [node("n1", "uname -a"), node("n2", "df -h"), node("n3", "uptime")]
    assert plan_text(repair_request(everything)) == ""


def test_references_to_an_accepted_node_follow_it() -> None:
    nodes = [
        {"node_id": "n1", "tool": "run_command", "args": {"command": "uptime"}, "depends_on": []},
        {"node_id": "n2", "tool": "echo", "args": {"value": "$n1"}, "depends_on": ["n1"]},
        {"node_id": "n3", "tool": "echo", "args": {"value": "${n2.x}"}, "depends_on": ["n2"]},
    ]
    rest = planning.remaining(nodes, [{**nodes[0], "node_id": "c9"}], first_id=10)
    assert rest == [
        {"node_id": "n10", "tool": "echo", "args": {"value": "$c9"}, "depends_on": ["c9"]},
        {"node_id": "n11", "tool": "echo", "args": {"value": "${n10.x}"}, "depends_on": ["n10"]},
    ]
