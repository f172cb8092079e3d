"""Authentication and tenancy end to end: the executor (auth on) refuses calls without a
valid API key, runs each call as its key's tenant whatever x-tenant-id the client sends,
keeps tenants' runs apart, and passes the tenant downstream, where the gateway's
per-tenant tool allow-list applies to it. Health and reflection stay open."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the fixture's types (tests/conftest.py)
    from conftest import StartProcess

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime import auth, context
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import InvalidArgument, NotFound, TrellisError, Unauthenticated
from trellis_cli.stack import Stack, start_stack

EXECUTOR_SERVICE = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name
SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
KEY_ACME, KEY_BETA = auth.new_key(), auth.new_key()
API_KEYS = {auth.hash_key(KEY_ACME): "acme", auth.hash_key(KEY_BETA): "beta"}
#: acme may touch files, beta may not; both may compute.
TENANT_TOOLS = {"acme": ["arithmetic", "touch"], "beta": ["arithmetic"]}

TOOLS_YAML = """\
version: 1
sandbox_root: box
tools:
  - {name: arithmetic, builtin: arithmetic}
  - name: touch
    kind: command
    side_effects: true
    commands:
      - command: touch {name}
        argv: [touch, --, "{name}"]
        params:
          name: {pattern: '[a-z0-9-]{1,40}', path: true}
"""


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    (tmp_path / "box").mkdir()
    (tmp_path / "tools.yaml").write_text(TOOLS_YAML)
    running = await start_stack(
        database_url=f"sqlite:///{tmp_path}/trellis.db",
        auth=True,
        api_keys=API_KEYS,
        tenant_tools=TENANT_TOOLS,
        tools_file=tmp_path / "tools.yaml",
        tools_reload_seconds=0,
    )
    yield running
    await running.stop()


def client(stack: Stack, channels, key: str | None) -> ExecutorClient:
    return ExecutorClient(channels.get(stack.executor_target), timeout=60, api_key=key)


async def run(client: ExecutorClient, request: executor_pb2.RunRequest) -> executor_pb2.RunFinished:
    events = [event async for event in client.run(request)]
    assert events[-1].HasField("finished"), events
    return events[-1].finished


def touch_plan(name: str) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest()
    request.plan.append(
        common_pb2.ToolCall(node_id="n1", tool="touch", args=to_struct({"command": name}))
    )
    return request


async def every_call(client: ExecutorClient) -> list[TrellisError]:
    """The error of each ExecutorService method called with ``client``'s key."""
    errors: list[TrellisError] = []
    calls = [
        lambda: run(client, executor_pb2.RunRequest(goal="What is 1+1?")),
        lambda: client.get_run("some-run"),
        lambda: client.cancel_run("some-run"),
        lambda: anext(client.resume_run("some-run")),
        lambda: client.list_runs(executor_pb2.ListRunsRequest()),
        lambda: client.list_tools(),
    ]
    for call in calls:
        with pytest.raises(TrellisError) as raised:
            await call()
        errors.append(raised.value)
    return errors


async def test_calls_without_a_key_are_unauthenticated_missing(stack: Stack, channels) -> None:
    with context.request_scope(tenant_id="acme"):  # a tenant header is no credential
        errors = await every_call(client(stack, channels, None))
    for error in errors:
        assert isinstance(error, Unauthenticated) and error.reason == "API_KEY_MISSING", error


async def test_calls_with_a_wrong_key_are_unauthenticated_invalid(stack: Stack, channels) -> None:
    for error in await every_call(client(stack, channels, auth.new_key())):
        assert isinstance(error, Unauthenticated) and error.reason == "API_KEY_INVALID", error


async def test_a_run_belongs_to_its_keys_tenant_not_to_a_header(stack: Stack, channels) -> None:
    acme, beta = client(stack, channels, KEY_ACME), client(stack, channels, KEY_BETA)
    request = executor_pb2.RunRequest(goal="What is (17*23)+4?", run_id="run-of-acme")
    # acme's key, but the client claims to be beta: the key wins.
    with context.request_scope(tenant_id="beta"):
        finished = await run(acme, request)
    assert finished.status == SUCCEEDED and "395" in finished.answer
    stored = await acme.get_run("run-of-acme")
    assert stored.tenant_id == "acme" and stored.status == SUCCEEDED

    with pytest.raises(NotFound) as raised:
        await beta.get_run("run-of-acme")
    assert raised.value.reason == "RUN_NOT_FOUND"
    with pytest.raises(NotFound):
        await beta.cancel_run("run-of-acme")
    with pytest.raises(NotFound):
        await anext(beta.resume_run("run-of-acme"))


async def test_the_tenant_reaches_the_gateways_allow_list(
    stack: Stack, channels, tmp_path: Path
) -> None:
    """beta may not use ``touch``: its catalog lacks it, so the executor refuses the explicit
    plan before anything runs (the gateway would refuse the call itself: see
    test_gateway_tenancy); acme's identical plan runs."""
    with pytest.raises(InvalidArgument) as raised:
        await run(client(stack, channels, KEY_BETA), touch_plan("touch beta-was-here"))
    assert raised.value.reason == "INVALID_PLAN"
    assert not (tmp_path / "box" / "beta-was-here").exists()

    finished = await run(client(stack, channels, KEY_ACME), touch_plan("touch acme-was-here"))
    assert finished.status == SUCCEEDED, finished.error
    assert (tmp_path / "box" / "acme-was-here").exists()


async def test_health_and_reflection_need_no_key(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.executor_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE)
        reply = await health.Check(request, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for response in reflection.ServerReflectionInfo(iter([listing]), timeout=5):
            names |= {s.name for s in response.list_services_response.service}
        assert EXECUTOR_SERVICE in names


async def test_standalone_executor_process_checks_keys(
    service_process: StartProcess, tmp_path: Path
) -> None:
    """``python -m trellis_executor`` with a keys file: a call without a key is refused
    before it reaches the run (no other service is even running), health answers."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# test keys\n{auth.key_line(auth.hash_key(KEY_ACME), 'acme')}\n")
    executor = service_process(
        "trellis_executor",
        "executor",
        EXECUTOR_SERVICE,
        {
            "TRELLIS_AUTH": "true",
            "TRELLIS_API_KEYS_FILE": str(keys_file),
            "TRELLIS_API_KEYS": json.dumps({auth.hash_key(KEY_BETA): "beta"}),
            "TRELLIS_DATABASE_URL": f"sqlite:///{tmp_path}/runs.db",
        },
    )
    await executor.wait_serving()
    async with grpc.aio.insecure_channel(executor.target) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        request = executor_pb2.GetRunRequest(run_id="nope")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetRun(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in (KEY_ACME, KEY_BETA):  # from the file and from the variable
            metadata = (("authorization", auth.bearer(key)),)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetRun(request, timeout=10, metadata=metadata)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # authenticated


async def test_runs_and_tools_are_listed_for_the_keys_tenant(stack: Stack, channels) -> None:
    acme, beta = client(stack, channels, KEY_ACME), client(stack, channels, KEY_BETA)
    request = executor_pb2.RunRequest(goal="What is 6*7?", run_id="listed-for-acme")
    with context.request_scope(tenant_id="beta"):  # the header claims beta: the key wins
        await run(acme, request)
        listed = await acme.list_runs(executor_pb2.ListRunsRequest())
        assert [r.run_id for r in listed.runs] == ["listed-for-acme"]
        assert (await beta.list_runs(executor_pb2.ListRunsRequest())).runs == []
        assert sorted(t.name for t in await acme.list_tools()) == ["arithmetic", "touch"]
        assert [t.name for t in await beta.list_tools()] == ["arithmetic"]
