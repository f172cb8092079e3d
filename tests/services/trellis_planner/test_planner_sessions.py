"""A session's context in the planner: every prompt of a turn carries the earlier turns
(plan in each format, join), and Summarize folds the oldest turns only when the context
is over its budget - one costed model call, recorded under the session."""

from __future__ import annotations

import json

import pytest

from tests.support.model_script import script_of
from trellis.contract.session_context import context_lines, context_tokens, lines_tokens
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.errors import InvalidArgument
from trellis_planner.formats import PlanFormat
from trellis_planner.prompts import join_messages, plan_messages, tool_join_messages
from trellis_planner.summarize import Summarizer

MODEL = "trellis-offline-rules-v1"


def session(turns: int, answer: str = "the answer") -> planner_pb2.SessionContext:
    ctx = planner_pb2.SessionContext(session_id="s1")
    for n in range(1, turns + 1):
        ctx.turns.add(
            number=n,
            goal=f"goal number {n}",
            answer=f"{answer} {n}",
            results=[planner_pb2.TurnResult(tool="arithmetic", status="SUCCEEDED", output="4")],
        )
    return ctx


def lines_of(messages) -> list[dict]:
    out = []
    for line in messages[0]["content"].splitlines():
        if line.startswith('{"turn"') or line.startswith('{"summary"'):
            out.append(json.loads(line))
    return out


@pytest.mark.parametrize("fmt", list(PlanFormat))
def test_every_plan_format_carries_the_earlier_turns(tools, fmt) -> None:
    request = planner_pb2.PlanRequest(run_id="r", goal="and the same for Oslo", tools=tools)
    assert "Conversation so far" not in plan_messages(request, 10, fmt)[0]["content"]
    request.session.CopyFrom(session(2))
    request.session.summary = "earlier: Paris"
    request.session.summary_through_turn = 3
    messages = plan_messages(request, 10, fmt)
    assert messages[0]["role"] == "system"
    assert lines_of(messages) == [
        {"summary": "earlier: Paris", "through_turn": 3},
        *[
            {
                "turn": n,
                "goal": f"goal number {n}",
                "answer": f"the answer {n}",
                "results": [{"tool": "arithmetic", "status": "SUCCEEDED", "output": "4"}],
            }
            for n in (1, 2)
        ],
    ]
    users = [m for m in messages if m["role"] == "user"]
    assert users[0]["content"] == "and the same for Oslo"  # the goal stays the user's


def test_joins_carry_the_earlier_turns(tools) -> None:
    request = planner_pb2.JoinRequest(run_id="r", goal="and multiply that by 3", tools=tools)
    request.session.CopyFrom(session(1))
    for messages in (join_messages(request), tool_join_messages(request, 10)):
        assert [line["goal"] for line in lines_of(messages)] == ["goal number 1"]


async def test_summarize_calls_no_model_while_the_context_fits(
    chat_model, make_outbox, recorder, model
):
    summarizer = Summarizer(
        chat_model, await make_outbox(recorder.record_usage), default_model=MODEL
    )
    ctx = session(3)
    folded = await summarizer.summarize(
        planner_pb2.SummarizeRequest(run_id="r1", session=ctx, max_tokens=context_tokens(ctx))
    )
    assert not folded.folded and folded.usage is None
    assert list(model.requests) == [] and recorder.requests == []


async def test_summarize_folds_the_oldest_turns_in_one_recorded_call(
    chat_model, make_outbox, recorder, model
) -> None:
    outbox = await make_outbox(recorder.record_usage)
    summarizer = Summarizer(chat_model, outbox, default_model=MODEL)
    ctx = session(20, answer="x" * 200)
    budget = 600
    assert context_tokens(ctx) > budget
    with context.request_scope(session_id="s1"):
        folded = await summarizer.summarize(
            planner_pb2.SummarizeRequest(run_id="r1", session=ctx, max_tokens=budget)
        )
    assert folded.folded and folded.usage is not None
    kept = [line for line in context_lines(ctx)[folded.through_turn :]]
    assert (
        lines_tokens(kept)
        <= budget // 2
        < lines_tokens(context_lines(ctx)[folded.through_turn - 1 :])
    )
    assert len(folded.summary) <= budget  # a quarter of the budget, in characters
    assert folded.summary.splitlines()[-1].startswith(f"Turn {folded.through_turn}:")
    [body] = model.requests
    assert "memory of Trellis" in body["messages"][0]["content"]
    assert body["max_completion_tokens"] == budget // 4
    [row] = recorder.requests
    assert (row.usage_id, row.run_id, row.session_id) == ("r1/summarize/0", "r1", "s1")
    assert row.usage.input_tokens > 0


async def test_summarize_keeps_the_models_words_within_its_share(
    chat_model, make_outbox, recorder, model
) -> None:
    script_of(model).reply("y" * 5000)
    summarizer = Summarizer(
        chat_model, await make_outbox(recorder.record_usage), default_model=MODEL
    )
    folded = await summarizer.summarize(
        planner_pb2.SummarizeRequest(run_id="r1", session=session(20, "x" * 200), max_tokens=400)
    )
    assert folded.summary == "y" * 400


async def test_summarize_refuses_a_bad_request(chat_model, make_outbox, recorder) -> None:
    summarizer = Summarizer(
        chat_model, await make_outbox(recorder.record_usage), default_model=MODEL
    )
    with pytest.raises(InvalidArgument):
        await summarizer.summarize(planner_pb2.SummarizeRequest(run_id="", max_tokens=10))
    with pytest.raises(InvalidArgument):
        await summarizer.summarize(planner_pb2.SummarizeRequest(run_id="r", max_tokens=0))
