"""Sessions are durable: with the run store on PostgreSQL, the services as processes,
a session survives a restart of the executor (its turns, and the context the model
gets); and admission is race-free: of turns started at once in one session on two
stores (replicas), exactly one is admitted, the others are SESSION_BUSY."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.model_script import script_of
from trellis.clients.executor import ExecutorClient
from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import FailedPrecondition, TrellisError
from trellis_executor.store import PostgresRunStore
from trellis_executor.store.sessions import SessionRules


async def test_session_survives_an_executor_restart_on_postgres(
    process_stack, postgres_url, model, channels
) -> None:
    stack = await process_stack(per_service={"executor": {"TRELLIS_DATABASE_URL": postgres_url}})
    executor = ExecutorClient(channels.get(stack.executor_target))
    request = executor_pb2.RunRequest(goal="what is 2+2", session_id="durable")
    first = [e async for e in executor.run(request)][-1].finished
    assert "4" in first.answer

    await stack.restart("executor")
    model.requests.clear()
    follow = executor_pb2.RunRequest(goal="and multiply that by 3", session_id="durable")
    second = [e async for e in executor.run(follow)][-1].finished
    assert "12" in second.answer, second.answer
    systems = [
        m["content"] for body in model.requests for m in body["messages"] if m["role"] == "system"
    ]
    assert systems and all('"goal": "what is 2+2"' in text for text in systems)
    session = await executor.get_session("durable")
    assert [t.goal for t in session.turns] == ["what is 2+2", "and multiply that by 3"]


async def test_a_turn_resumed_after_a_crash_still_sees_its_context(
    process_stack, postgres_url, model, channels
) -> None:
    stack = await process_stack(per_service={"executor": {"TRELLIS_DATABASE_URL": postgres_url}})
    executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)
    first = executor_pb2.RunRequest(goal="what is 2+2", session_id="crashy")
    assert "4" in [e async for e in executor.run(first)][-1].finished.answer

    script_of(model).stall(30)  # the next turn's plan call hangs: the executor dies under it
    model.requests.clear()
    follow = executor_pb2.RunRequest(
        goal="and multiply that by 3", session_id="crashy", run_id="crashy-2"
    )
    running = asyncio.ensure_future(collect(executor.run(follow)))
    for _ in range(400):  # until the stalled plan call reached the model
        if model.requests:
            break
        await asyncio.sleep(0.05)
    assert model.requests, "the turn's plan call never reached the model"
    stack.processes["executor"].kill()
    with pytest.raises(TrellisError):  # the stream broke with the executor
        await running
    model.requests.clear()
    await stack.restart("executor")  # resumes its own unfinished runs at start-up
    executor = ExecutorClient(channels.get(stack.executor_target), timeout=60)
    events = await asyncio.wait_for(collect(executor.resume_run("crashy-2")), 60)
    assert "12" in events[-1].finished.answer, events[-1]
    systems = [
        m["content"] for body in model.requests for m in body["messages"] if m["role"] == "system"
    ]
    assert systems and all('"goal": "what is 2+2"' in text for text in systems)


async def collect(stream) -> list[executor_pb2.RunResponse]:
    return [event async for event in stream]


async def test_concurrent_turns_on_two_replicas_admit_one(postgres_url) -> None:
    stores = [await PostgresRunStore.open(postgres_url, owner=f"replica-{i}") for i in range(2)]
    rules = SessionRules(ttl_seconds=3600, max_turns=10)
    try:

        async def start(i: int) -> str:
            store = stores[i % 2]
            try:
                await store.create(
                    f"run-{i}",
                    "acme",
                    executor_pb2.RunRequest(goal=f"turn {i}", session_id="race"),
                    "0" * 32,
                    session_id="race",
                    rules=rules,
                )
            except FailedPrecondition as error:
                return error.reason
            return "admitted"

        results = await asyncio.gather(*(start(i) for i in range(8)))
        assert sorted(results) == ["SESSION_BUSY"] * 7 + ["admitted"]
        found = await stores[0].get_session("acme", "race", 3600)
        assert found is not None and len(found[1]) == 1
        assert await stores[1].get_session("other", "race", 3600) is None
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_expired_session_starts_afresh(backend, tmp_path, postgres_url) -> None:
    from trellis_executor.store import open_store

    url = postgres_url if backend == "postgres" else f"sqlite:///{tmp_path}/runs.db"
    store = await open_store(url)
    try:
        rules = SessionRules(ttl_seconds=3600, max_turns=10)
        request = executor_pb2.RunRequest(goal="old turn", session_id="s")
        await store.create("old", "acme", request, "0" * 32, session_id="s", rules=rules)
        await store.finish("old", executor_pb2.RunFinished(status=2, answer="old answer"))
        await store.save_summary("acme", "s", "a summary", 1)
        assert (await store.get_session("acme", "s", 3600))[0].summary == "a summary"
        await asyncio.sleep(0.05)
        # a TTL shorter than the pause: the session has expired
        assert await store.get_session("acme", "s", 0.01) is None
        short = SessionRules(ttl_seconds=0.01, max_turns=10)
        request = executor_pb2.RunRequest(goal="new turn", session_id="s")
        await store.create("new", "acme", request, "0" * 32, session_id="s", rules=short)
        record, turns = await store.get_session("acme", "s", 3600)
        assert [t.goal for t in turns] == ["new turn"] and record.summary == ""
    finally:
        await store.close()
