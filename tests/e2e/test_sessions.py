"""Sessions over real gRPC (the embedded stack, offline model): the model sees a turn's
earlier turns and no other session's, follow-ups work, one turn at a time, tenants are
isolated for every RPC, deletion erases the content, and a long session stays within
its context budget with its summary reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trellis.clients.costs import CostsClient
from trellis.clients.executor import ExecutorClient
from trellis.contract.session_context import lines_tokens
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from trellis_cli.stack import start_stack

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED


async def turn(
    executor: ExecutorClient, goal: str, session_id: str, run_id: str = ""
) -> executor_pb2.RunFinished:
    request = executor_pb2.RunRequest(goal=goal, session_id=session_id, run_id=run_id)
    events = [event async for event in executor.run(request)]
    return events[-1].finished


def system_texts(bodies: Any) -> list[str]:
    return [
        m["content"]
        for body in bodies
        for m in body.get("messages", [])
        if m.get("role") == "system" and isinstance(m.get("content"), str)
    ]


def turn_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line) if line.startswith("{") else None
        except ValueError:
            continue
        if isinstance(value, dict) and ("turn" in value or "summary" in value):
            out.append(value)
    return out


async def test_follow_up_sees_the_previous_turn_and_no_other_session(stack, executor) -> None:
    model = stack.model
    assert model is not None
    first = await turn(executor, "what is 2+2", "chat-a")
    assert first.status == SUCCEEDED and "4" in first.answer
    await turn(executor, "what is 7*6", "chat-b")  # another session: must not leak
    model.requests.clear()
    second = await turn(executor, "and multiply that by 3", "chat-a")
    assert second.status == SUCCEEDED
    assert "12" in second.answer, second.answer
    texts = system_texts(model.requests)
    assert texts, "the model received no request"
    for text in texts:  # plan and join alike carry the conversation so far
        lines = turn_lines(text)
        assert [line["goal"] for line in lines] == ["what is 2+2"]
        assert "7*6" not in text
    session = await executor.get_session("chat-a")
    assert [t.goal for t in session.turns] == ["what is 2+2", "and multiply that by 3"]
    assert [t.number for t in session.turns] == [1, 2]
    assert "12" in session.turns[1].answer
    assert session.cost_nano_usd >= 0 and session.usage.input_tokens > 0


async def test_tenants_are_isolated_for_every_rpc(stack, executor) -> None:
    with context.request_scope(tenant_id="acme"):
        await turn(executor, "what is 1+1", "shared-name")
    with context.request_scope(tenant_id="umbrella"):
        with pytest.raises(NotFound) as caught:
            await executor.get_session("shared-name")
        assert caught.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(NotFound):
            await executor.delete_session("shared-name")
        assert (await executor.list_sessions()).sessions == []
        stack.model.requests.clear()
        # the same session id in another tenant is another session: nothing leaks
        await turn(executor, "and multiply that by 3", "shared-name")
        assert all("1+1" not in text for text in system_texts(stack.model.requests))
        assert [t.goal for t in (await executor.get_session("shared-name")).turns] == [
            "and multiply that by 3"
        ]
    with context.request_scope(tenant_id="acme"):
        session = await executor.get_session("shared-name")
        assert [t.goal for t in session.turns] == ["what is 1+1"]
        [listed] = (await executor.list_sessions()).sessions
        assert (listed.session_id, listed.turn_count) == ("shared-name", 1)


async def test_one_turn_at_a_time(tmp_path: Path, channels) -> None:
    stack = await start_stack(database_url=f"sqlite:///{tmp_path}/trellis.db", model_delay_ms=0)
    try:
        executor = ExecutorClient(channels.get(stack.executor_target))
        request = executor_pb2.RunRequest(goal="sleep 1500 ms", session_id="busy", run_id="busy-1")
        events = executor.run(request)
        first = await anext(events)  # started: the turn is stored and running
        assert first.HasField("started")
        with pytest.raises(FailedPrecondition) as caught:
            await turn(executor, "what is 1+1", "busy")
        assert caught.value.reason == "SESSION_BUSY"
        with pytest.raises(FailedPrecondition) as deleting:
            await executor.delete_session("busy")
        assert deleting.value.reason == "SESSION_BUSY"
        # the running turn's own run id attaches instead
        attached = [e async for e in executor.run(request)]
        assert attached[-1].finished.status == SUCCEEDED
        rest = [e async for e in events]
        assert rest[-1].finished.status == SUCCEEDED
        assert (await turn(executor, "what is 1+1", "busy")).status == SUCCEEDED
    finally:
        await stack.stop()


async def test_full_session_and_bad_ids(tmp_path: Path, channels) -> None:
    stack = await start_stack(database_url=f"sqlite:///{tmp_path}/trellis.db", session_max_turns=2)
    try:
        executor = ExecutorClient(channels.get(stack.executor_target))
        await turn(executor, "what is 1+1", "small")
        await turn(executor, "what is 2+2", "small")
        with pytest.raises(FailedPrecondition) as caught:
            await turn(executor, "what is 3+3", "small")
        assert caught.value.reason == "SESSION_FULL"
        with pytest.raises(InvalidArgument) as bad:
            await turn(executor, "what is 3+3", "not ok/slash")
        assert bad.value.reason == "INVALID_ID"
        with pytest.raises(InvalidArgument) as missing:
            await executor.get_session("")
        assert missing.value.reason == "SESSION_ID_REQUIRED"
    finally:
        await stack.stop()


async def test_delete_erases_content_everywhere(stack, executor, channels) -> None:
    await turn(executor, "what is 2+2", "secret", run_id="secret-1")
    await turn(executor, "and multiply that by 3", "secret", run_id="secret-2")
    assert await executor.delete_session("secret") == 2
    session = await executor.get_session("secret")
    assert session.deleted and not session.summary
    assert [(t.goal, t.answer) for t in session.turns] == [("", ""), ("", "")]
    for run_id in ("secret-1", "secret-2"):
        run = await executor.get_run(run_id)
        assert (run.goal, run.answer) == ("", "")
        assert all(not call.args.fields for call in run.plan)
        assert all(not o.HasField("output") for o in run.outcomes)
        assert run.outcomes and run.outcomes[0].status  # status kept
    listed = await executor.list_runs(executor_pb2.ListRunsRequest(session_id="secret"))
    assert [r.goal for r in listed.runs] == ["", ""]
    # the ledger keeps its cost rows (no content there)
    costs = CostsClient(channels.get(stack.target("costs")))
    usage = await costs.get_usage(session_id="secret")
    assert usage.total_input_tokens > 0
    other = await costs.get_usage(session_id="nobody")
    assert other.rows == [] and other.total_input_tokens == 0
    # the next turn starts the session afresh: nothing of the old turns reaches the model
    stack.model.requests.clear()
    await turn(executor, "what is 5+5", "secret")
    assert all("2+2" not in text for text in system_texts(stack.model.requests))
    fresh = await executor.get_session("secret")
    assert not fresh.deleted and [t.goal for t in fresh.turns] == ["what is 5+5"]


async def test_fifty_turns_stay_within_the_budget_and_reuse_the_summary(
    tmp_path: Path, channels
) -> None:
    budget = 400
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/trellis.db", session_context_tokens=budget
    )
    try:
        executor = ExecutorClient(channels.get(stack.executor_target))
        model = stack.model
        folds = 0
        summaries: list[str] = []
        for i in range(50):
            model.requests.clear()
            finished = await turn(executor, f"what is {i}+1", "long")
            assert finished.status == SUCCEEDED
            bodies = list(model.requests)
            fold_calls = [b for b in bodies if "memory of Trellis" in b["messages"][0]["content"]]
            folds += len(fold_calls)
            for text in system_texts(b for b in bodies if b not in fold_calls):
                section = text.split("## Conversation so far", 1)
                if i > 0:
                    assert len(section) == 2, "a turn's prompt lacks the conversation"
                    lines = [x for x in section[1].splitlines() if x.startswith("{")]
                    # what the prompt carries of the session is within the budget
                    assert lines_tokens(lines) <= budget
            session = await executor.get_session("long")
            summaries.append(session.summary)
        # folded only when the context outgrew the budget: most turns reuse the summary
        assert 1 <= folds <= 20, folds
        assert len({s for s in summaries if s}) == folds  # each summary reused until the next
        assert summaries[-1] and "Turn" in summaries[-1]
        assert session.summary_through_turn > 0 and len(session.turns) == 50
    finally:
        await stack.stop()


async def test_each_turn_is_its_own_trace_with_the_session_on_the_run_span(
    tmp_path: Path, channels
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    stack = await start_stack(
        database_url=f"sqlite:///{tmp_path}/t.db", span_processors=[SimpleSpanProcessor(exporter)]
    )
    try:
        executor = ExecutorClient(channels.get(stack.executor_target))
        await turn(executor, "what is 2+2", "traced", run_id="traced-1")
        await turn(executor, "and multiply that by 3", "traced", run_id="traced-2")
        await turn(executor, "what is 1+1", "", run_id="alone")
    finally:
        await stack.stop()
    runs = {
        s.attributes["trellis.run_id"]: s
        for s in exporter.get_finished_spans()
        if s.name == "trellis.run"
    }
    assert runs["traced-1"].attributes["session.id"] == "traced"
    assert runs["traced-2"].attributes["session.id"] == "traced"
    assert "session.id" not in runs["alone"].attributes
    assert runs["traced-1"].context.trace_id != runs["traced-2"].context.trace_id


async def test_list_sessions_pages_with_signed_tokens(stack, executor) -> None:
    for name in ("p1", "p2", "p3"):
        await turn(executor, "what is 1+1", name)
    first = await executor.list_sessions(page_size=2)
    assert [s.session_id for s in first.sessions] == ["p3", "p2"]
    assert first.sessions[0].turn_count == 1 and first.sessions[0].last_goal == "what is 1+1"
    rest = await executor.list_sessions(page_size=2, page_token=first.next_page_token)
    assert [s.session_id for s in rest.sessions] == ["p1"] and not rest.next_page_token
    with pytest.raises(InvalidArgument) as tampered:
        await executor.list_sessions(page_token=first.next_page_token[:-2] + "xx")
    assert tampered.value.reason == "INVALID_PAGE_TOKEN"
    with context.request_scope(tenant_id="someone-else"):
        with pytest.raises(InvalidArgument) as foreign:
            await executor.list_sessions(page_token=first.next_page_token)
        assert foreign.value.reason == "INVALID_PAGE_TOKEN"
