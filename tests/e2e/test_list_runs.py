"""ListRuns and ListTools over real gRPC (the embedded stack): pages a client walks with
its tokens, filters, summaries of real runs, and every way a request can be refused."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from trellis.clients.executor import ExecutorClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import InvalidArgument
from trellis_executor.run_list import DEFAULT_PAGE_SIZE

SUCCEEDED = executor_pb2.RUN_STATUS_SUCCEEDED
FAILED = executor_pb2.RUN_STATUS_FAILED


def plan(expression: str) -> executor_pb2.RunRequest:
    request = executor_pb2.RunRequest()
    request.plan.append(
        common_pb2.ToolCall(
            node_id="n1", tool="arithmetic", args=to_struct({"expression": expression})
        )
    )
    return request


async def run(executor: ExecutorClient, request: executor_pb2.RunRequest, run_id: str) -> None:
    request.run_id = run_id
    events = [event async for event in executor.run(request)]
    assert events[-1].HasField("finished")


async def walk(executor: ExecutorClient, **filters) -> list[list[str]]:
    """Every page, following next_page_token."""
    pages, token = [], ""
    while True:
        response = await executor.list_runs(
            executor_pb2.ListRunsRequest(page_token=token, **filters)
        )
        pages.append([r.run_id for r in response.runs])
        token = response.next_page_token
        if not token:
            return pages


async def test_pages_filters_and_summaries(executor: ExecutorClient) -> None:
    with context.request_scope(tenant_id="acme"):
        for i in range(5):
            await run(executor, plan(f"{i}+1"), f"ok-{i}")
        await run(executor, plan("1/0"), "bad")
        assert await walk(executor, page_size=2) == [
            ["bad", "ok-4"],
            ["ok-3", "ok-2"],
            ["ok-1", "ok-0"],
        ]
        assert await walk(executor, page_size=4, status=SUCCEEDED) == [
            ["ok-4", "ok-3", "ok-2", "ok-1"],
            ["ok-0"],
        ]
        [bad] = (await executor.list_runs(executor_pb2.ListRunsRequest(status=FAILED))).runs
        assert bad.nodes == executor_pb2.NodeCounts(total=1, failed=1)
        assert (bad.error.code, bad.failed_nodes) == ("ARITHMETIC_ERROR", 1)
        assert len(bad.trace_id) == 32 and bad.HasField("finished_at")
        assert bad.duration.seconds or bad.duration.nanos

        everything = (await executor.list_runs(executor_pb2.ListRunsRequest())).runs
        created = {r.run_id: r.created_at for r in everything}
        window = executor_pb2.ListRunsRequest(
            created_after=created["ok-1"], created_before=created["ok-3"]
        )
        assert [r.run_id for r in (await executor.list_runs(window)).runs] == ["ok-2", "ok-1"]

    with context.request_scope(tenant_id="other"):
        assert (await executor.list_runs(executor_pb2.ListRunsRequest())).runs == []


async def test_page_size_zero_is_the_default_and_large_ones_are_capped(
    executor: ExecutorClient,
) -> None:
    with context.request_scope(tenant_id="acme"):
        for i in range(3):
            await run(executor, plan("1+1"), f"r{i}")
        default = await executor.list_runs(executor_pb2.ListRunsRequest())
        huge = await executor.list_runs(executor_pb2.ListRunsRequest(page_size=10**6))
    assert len(default.runs) == 3 <= DEFAULT_PAGE_SIZE and not default.next_page_token
    assert len(huge.runs) == 3


async def refused(
    executor: ExecutorClient, request: executor_pb2.ListRunsRequest
) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        await executor.list_runs(request)
    return raised.value


async def test_a_page_token_is_bound_to_its_tenant_and_filters(executor: ExecutorClient) -> None:
    with context.request_scope(tenant_id="acme"):
        for i in range(3):
            await run(executor, plan("1+1"), f"r{i}")
        token = (
            await executor.list_runs(executor_pb2.ListRunsRequest(page_size=1))
        ).next_page_token
        assert token
        tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
        for bad in (tampered, "not-a-token", token + "x", "x" * 2000):
            error = await refused(executor, executor_pb2.ListRunsRequest(page_token=bad))
            assert (
                error.reason == "INVALID_PAGE_TOKEN" and error.violations[0].field == "page_token"
            )
        other_filters = executor_pb2.ListRunsRequest(page_token=token, status=SUCCEEDED)
        error = await refused(executor, other_filters)
        assert error.reason == "INVALID_PAGE_TOKEN" and "other filters" in error.message
        # the same token with the same filters and another page size is fine (AIP-158)
        await executor.list_runs(executor_pb2.ListRunsRequest(page_token=token, page_size=5))
    with context.request_scope(tenant_id="intruder"):
        error = await refused(executor, executor_pb2.ListRunsRequest(page_token=token))
        assert error.reason == "INVALID_PAGE_TOKEN" and "another tenant" in error.message


@pytest.mark.parametrize(
    ("request_fields", "reason", "field"),
    [
        ({"page_size": -1}, "INVALID_PAGE_SIZE", "page_size"),
        ({"session_id": "no spaces allowed"}, "INVALID_ID", "session_id"),
        ({"status": 42}, "INVALID_FILTER", "status"),
        (
            {"created_after": timestamp_pb2.Timestamp(seconds=10**12)},
            "INVALID_FILTER",
            "created_after",
        ),
        (
            {"created_before": timestamp_pb2.Timestamp(seconds=1, nanos=-5)},
            "INVALID_FILTER",
            "created_before",
        ),
        (
            {
                "created_after": timestamp_pb2.Timestamp(seconds=100),
                "created_before": timestamp_pb2.Timestamp(seconds=100),
            },
            "INVALID_FILTER",
            "created_before",
        ),
    ],
)
async def test_a_bad_list_request_names_its_field(
    executor: ExecutorClient, request_fields, reason: str, field: str
) -> None:
    error = await refused(executor, executor_pb2.ListRunsRequest(**request_fields))
    assert error.reason == reason and [v.field for v in error.violations] == [field]


async def test_list_tools_is_the_gateways_catalog(executor: ExecutorClient) -> None:
    tools = {tool.name: tool for tool in await executor.list_tools()}
    assert {"arithmetic", "run_command", "read_file", "echo"} <= set(tools)
    schema = tools["arithmetic"].input_schema
    assert "expression" in schema["properties"]
