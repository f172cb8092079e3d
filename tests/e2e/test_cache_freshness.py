"""A cache that stays fresh, with the services as processes.

- A run whose read node depends on a write node of the same path gets the written value,
  not the one cached by an earlier run.
- Two gateway replicas, each with its own cache replica over one Redis: a write through
  one drops the result the other cached, for the writer's tenant only; an admin's
  explicit invalidation through one reaches the other's results too.
- A gateway process starts warm: the first call of a warmed call is a hit.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime import context
from trellis.runtime.convert import from_value, to_struct
from trellis.toolgateway.v1 import toolgateway_pb2

GATEWAY = "trellis.toolgateway.v1.ToolGatewayService"
CACHE = "trellis.cache.v1.CacheService"
NODE_SUCCEEDED = common_pb2.NODE_STATUS_SUCCEEDED
PATH = {"pattern": r"[\w./-]{1,200}", "path": True}

TOOLS = [
    {"name": "read_file", "builtin": "read_file", "cache_ttl": 300},
    {"name": "list_dir", "builtin": "list_dir", "cache_ttl": 300, "shared_cache": True},
    {
        "name": "copy_file",
        "kind": "command",
        "description": "Copy a file inside the sandbox.",
        "side_effects": True,
        "commands": [
            {
                "command": "cp {src} {path}",
                "argv": ["cp", "--", "{src}", "{path}"],
                "params": {"src": PATH, "path": PATH},
            }
        ],
        "invalidates": [{"tools": ["read_file", "list_dir"], "same_path": {"path": "path"}}],
    },
]


def tools_file(tmp_path: Path, warm: list[dict] | None = None) -> str:
    sandbox = tmp_path / "sandbox"
    (sandbox / "notes").mkdir(parents=True, exist_ok=True)
    (sandbox / "notes" / "a.txt").write_text("old")
    (sandbox / "new.txt").write_text("new")
    file = tmp_path / "tools.yaml"
    data = {"version": 1, "sandbox_root": "sandbox", "tools": TOOLS, "warm": warm or []}
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(file)


def node(node_id: str, tool: str, args: dict, after: tuple[str, ...] = ()) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(
        node_id=node_id, tool=tool, args=to_struct(args), depends_on=list(after)
    )


async def run_plan(executor, plan: list[common_pb2.ToolCall]) -> dict[str, common_pb2.NodeOutcome]:
    request = executor_pb2.RunRequest(run_id=f"fresh-{uuid.uuid4().hex[:10]}", plan=plan)
    events = [event async for event in executor.Run(request, timeout=30)]
    assert events[-1].finished.status == executor_pb2.RUN_STATUS_SUCCEEDED, events[-1]
    return {
        e.node_finished.outcome.node_id: e.node_finished.outcome
        for e in events
        if e.HasField("node_finished")
    }


async def test_a_read_that_depends_on_a_write_of_its_path_gets_the_written_value(
    process_stack, tmp_path: Path, channels
) -> None:
    stack = await process_stack(
        per_service={
            "toolgateway": {
                "TRELLIS_TOOLS_FILE": tools_file(tmp_path),
                "TRELLIS_TOOLS_RELOAD_SECONDS": "0",
            }
        }
    )
    executor = executor_pb2_grpc.ExecutorServiceStub(channels.get(stack.executor_target))
    read = node("r", "read_file", {"path": "notes/a.txt"})

    first = (await run_plan(executor, [read]))["r"]
    again = (await run_plan(executor, [read]))["r"]
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert from_value(again.output)["content"] == "old"

    plan = [
        node("w", "copy_file", {"command": "cp new.txt notes/a.txt"}),
        node("r", "read_file", {"path": "notes/a.txt"}, after=("w",)),
        node("l", "list_dir", {"path": "notes"}, after=("w",)),
    ]
    outcomes = await run_plan(executor, plan)
    assert outcomes["w"].status == NODE_SUCCEEDED
    assert from_value(outcomes["r"].output)["content"] == "new"
    assert outcomes["r"].cache_hit is False
    # and what the read stored is what the next run reads
    assert from_value((await run_plan(executor, [read]))["r"].output)["content"] == "new"


@pytest.fixture
async def replicas(service_process, redis_server, tmp_path: Path):
    """Two gateways, each with its own cache replica, the caches over one Redis."""
    file = tools_file(tmp_path)
    gateways = []
    for name in ("a", "b"):
        cache = service_process(
            "trellis_cache", f"cache-{name}", CACHE, {"TRELLIS_REDIS_URL": redis_server.url}
        )
        await cache.wait_serving()
        gateway = service_process(
            "trellis_toolgateway",
            f"toolgateway-{name}",
            GATEWAY,
            {
                "TRELLIS_CACHE_TARGET": cache.target,
                "TRELLIS_COSTS_TARGET": "127.0.0.1:1",  # usage waits in the outbox
                "TRELLIS_OUTBOX_PATH": str(tmp_path / f"outbox-{name}.db"),
                "TRELLIS_TOOLS_FILE": file,
                "TRELLIS_TOOLS_RELOAD_SECONDS": "0",
                "TRELLIS_CACHE_ADMIN_TENANTS": "ops",
            },
        )
        gateways.append(gateway)
    for gateway in gateways:
        await gateway.wait_serving()
    return [g.target for g in gateways]


async def invoke(
    gateway: ToolGatewayClient, tenant: str, tool: str, args: dict, key: str = ""
) -> common_pb2.NodeOutcome:
    call = common_pb2.ToolCall(node_id="n", tool=tool, args=to_struct(args))
    with context.request_scope(tenant_id=tenant):
        outcome = await gateway.invoke(
            toolgateway_pb2.InvokeToolRequest(call=call, run_id="r", idempotency_key=key)
        )
    assert outcome.status == NODE_SUCCEEDED, outcome.error
    return outcome


async def read(gateway: ToolGatewayClient, tenant: str) -> tuple[str, bool]:
    outcome = await invoke(gateway, tenant, "read_file", {"path": "notes/a.txt"})
    return from_value(outcome.output)["content"], outcome.cache_hit


async def test_a_write_through_one_replica_drops_what_the_other_cached(
    replicas: list[str], channels
) -> None:
    a, b = (ToolGatewayClient(channels.get(target), timeout=10) for target in replicas)
    for tenant in ("acme", "beta"):
        assert await read(b, tenant) == ("old", False)
        assert await read(a, tenant) == ("old", True)  # one cache: Redis
    await invoke(a, "acme", "copy_file", {"command": "cp new.txt notes/a.txt"}, key="r/w")
    assert await read(b, "acme") == ("new", False)  # the writer's tenant: fresh everywhere
    assert await read(b, "beta") == ("old", True)  # another tenant's result is its own


async def test_an_admin_invalidation_through_one_replica_reaches_the_other(
    replicas: list[str], channels
) -> None:
    a, b = (ToolGatewayClient(channels.get(target), timeout=10) for target in replicas)
    for tenant in ("acme", "beta"):
        await read(b, tenant)
    with context.request_scope(tenant_id="ops"):
        assert await a.invalidate_cache("read_file", all_tenants=True) == 2
    assert [(await read(b, tenant))[1] for tenant in ("acme", "beta")] == [False, False]


async def test_a_gateway_process_starts_warm(service_process, tmp_path: Path, channels) -> None:
    warm = [
        {"tool": "read_file", "args": {"path": "notes/a.txt"}, "tenants": ["acme"]},
        {"tool": "list_dir", "args": {"path": "notes"}},
    ]
    cache = service_process("trellis_cache", "cache", CACHE, {})
    await cache.wait_serving()
    gateway = service_process(
        "trellis_toolgateway",
        "toolgateway",
        GATEWAY,
        {
            "TRELLIS_CACHE_TARGET": cache.target,
            "TRELLIS_COSTS_TARGET": "127.0.0.1:1",
            "TRELLIS_OUTBOX_PATH": str(tmp_path / "outbox.db"),
            "TRELLIS_TOOLS_FILE": tools_file(tmp_path, warm),
        },
    )
    await gateway.wait_serving()
    client = ToolGatewayClient(channels.get(gateway.target), timeout=10)
    assert await read(client, "acme") == ("old", True)  # call 1 is a hit
    listing = await invoke(client, "beta", "list_dir", {"path": "notes"})
    assert listing.cache_hit  # a shared_cache result serves every tenant
