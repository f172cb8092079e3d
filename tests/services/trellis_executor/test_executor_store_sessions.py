"""Sessions in the run store, against each backend: turn admission (busy, full, the same
run id), isolation by tenant, listing, the summary, and deletion erasing content."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime.convert import to_struct, to_value
from trellis.runtime.errors import AlreadyExists, FailedPrecondition, NotFound
from trellis_executor.store import RunStore, open_store
from trellis_executor.store.sessions import SessionRules

RULES = SessionRules(ttl_seconds=3600, max_turns=3)
TTL = 3600
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[RunStore]:
    opened = await open_store(store_url)
    yield opened
    await opened.close()


async def turn(
    store: RunStore, run_id: str, goal: str, *, session: str = "s", tenant: str = "acme"
) -> None:
    request = executor_pb2.RunRequest(goal=goal, session_id=session)
    await store.create(run_id, tenant, request, "0" * 32, session_id=session, rules=RULES)


async def finish(store: RunStore, run_id: str, answer: str) -> None:
    call = common_pb2.ToolCall(
        node_id="n1", tool="arithmetic", args=to_struct({"expression": "2+2"})
    )
    await store.add_nodes(run_id, 0, [call])
    outcome = common_pb2.NodeOutcome(
        node_id="n1", status=common_pb2.NODE_STATUS_SUCCEEDED, output=to_value(4)
    )
    await store.set_outcome(run_id, outcome)
    finished = executor_pb2.RunFinished(status=SUCCEEDED, answer=answer, cost_nano_usd=5)
    finished.usage.input_tokens = 10
    await store.finish(run_id, finished)


async def test_one_running_turn_then_full(store: RunStore) -> None:
    await turn(store, "t1", "what is 2+2")
    with pytest.raises(FailedPrecondition) as busy:
        await turn(store, "t2", "and times 3")
    assert busy.value.reason == "SESSION_BUSY"
    await finish(store, "t1", "4")
    with pytest.raises(AlreadyExists):  # a run id is never a second turn
        await turn(store, "t1", "again")
    await turn(store, "t2", "and times 3")
    await finish(store, "t2", "12")
    await turn(store, "t3", "and plus 1")
    await finish(store, "t3", "13")
    with pytest.raises(FailedPrecondition) as full:
        await turn(store, "t4", "more")
    assert full.value.reason == "SESSION_FULL"
    record, runs = await store.get_session("acme", "s", TTL)
    assert [r.run_id for r in runs] == ["t1", "t2", "t3"]
    assert [r.answer for r in runs] == ["4", "12", "13"]
    assert runs[0].outcomes[0].output.number_value == 4  # turns come with their nodes
    assert runs[0].session_id == "s"
    assert not record.deleted and record.summary == ""


async def test_sessions_are_per_tenant(store: RunStore) -> None:
    await turn(store, "a1", "mine", tenant="acme")
    await turn(store, "b1", "theirs", tenant="umbrella")  # same session id, not busy
    assert await store.get_session("other", "s", TTL) is None
    [(acme, _)] = await store.list_sessions("acme", TTL, None, 10)
    assert (acme.session_id, acme.turn_count, acme.last_goal) == ("s", 1, "mine")
    assert await store.list_sessions("nobody", TTL, None, 10) == []
    with pytest.raises(NotFound) as missing:
        await store.delete_session("other", "s", TTL)
    assert missing.value.reason == "SESSION_NOT_FOUND"


async def test_list_pages_most_recent_first(store: RunStore) -> None:
    for name in ("a", "b", "c"):
        await turn(store, f"{name}1", f"goal {name}", session=name)
        await finish(store, f"{name}1", "ok")
    first = await store.list_sessions("acme", TTL, None, 2)
    assert [s.session_id for s, _ in first] == ["c", "b"]
    rest = await store.list_sessions("acme", TTL, first[-1][1], 2)
    assert [s.session_id for s, _ in rest] == ["a"]
    assert rest[0][0].cost_nano_usd == 5 and rest[0][0].usage.input_tokens == 10


async def test_summary_only_moves_forward(store: RunStore) -> None:
    await turn(store, "t1", "g")
    await store.save_summary("acme", "s", "through two", 2)
    await store.save_summary("acme", "s", "through one", 1)  # a stale fold: ignored
    record, _ = await store.get_session("acme", "s", TTL)
    assert (record.summary, record.summary_through_turn) == ("through two", 2)


async def test_delete_erases_content_and_keeps_the_rows(store: RunStore) -> None:
    await turn(store, "t1", "what is 2+2")
    with pytest.raises(FailedPrecondition) as busy:
        await store.delete_session("acme", "s", TTL)
    assert busy.value.reason == "SESSION_BUSY"
    await finish(store, "t1", "4")
    await store.save_summary("acme", "s", "secret summary", 1)
    assert await store.delete_session("acme", "s", TTL) == 1
    run = await store.get("t1")
    assert run is not None
    assert (run.goal, run.answer, run.status, run.cost_nano_usd) == ("", "", SUCCEEDED, 5)
    assert not run.plan[0].args.fields and run.plan[0].tool == "arithmetic"
    assert not run.outcomes[0].HasField("output")
    assert run.outcomes[0].status == common_pb2.NODE_STATUS_SUCCEEDED
    saved = await store.load("t1")
    assert saved is not None and saved.request.goal == ""
    record, runs = await store.get_session("acme", "s", TTL)
    assert record.deleted and record.summary == "" and [r.goal for r in runs] == [""]
    # the next turn starts the session afresh
    await turn(store, "t2", "new start")
    record, runs = await store.get_session("acme", "s", TTL)
    assert not record.deleted and [r.run_id for r in runs] == ["t2"]
