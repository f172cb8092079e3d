"""`trellis cache invalidate` against a real gateway and cache service, as processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime.channels import Channels
from trellis.runtime.context import request_scope
from trellis.runtime.convert import to_struct
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cli.app import app

GATEWAY = "trellis.toolgateway.v1.ToolGatewayService"
CACHE = "trellis.cache.v1.CacheService"
PATHS = ("a.txt", "b.txt")


@pytest.fixture
async def gateway_target(service_process, tmp_path: Path) -> str:
    for path in PATHS:
        (tmp_path / path).write_text(path)
    tools = [{"name": "read_file", "builtin": "read_file", "cache_ttl": 300}]
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump({"version": 1, "tools": tools}))
    cache = service_process("trellis_cache", "cache", CACHE, {})
    await cache.wait_serving()
    gateway = service_process(
        "trellis_toolgateway",
        "toolgateway",
        GATEWAY,
        {
            "TRELLIS_CACHE_TARGET": cache.target,
            "TRELLIS_COSTS_TARGET": "127.0.0.1:1",  # usage waits in the outbox
            "TRELLIS_OUTBOX_PATH": str(tmp_path / "outbox.db"),
            "TRELLIS_TOOLS_FILE": str(tmp_path / "tools.yaml"),
            "TRELLIS_CACHE_ADMIN_TENANTS": "ops",
        },
    )
    await gateway.wait_serving()
    return gateway.target


@pytest.fixture
async def gateway(gateway_target: str):
    channels = Channels()
    yield ToolGatewayClient(channels.get(gateway_target), timeout=10)
    await channels.close()


async def reads(gateway: ToolGatewayClient, tenant: str) -> list[bool]:
    """Read both files as ``tenant``; which were cache hits."""
    hits = []
    with request_scope(tenant_id=tenant):
        for path in PATHS:
            call = common_pb2.ToolCall(
                node_id="n", tool="read_file", args=to_struct({"path": path})
            )
            outcome = await gateway.invoke(toolgateway_pb2.InvokeToolRequest(call=call))
            hits.append(outcome.cache_hit)
    return hits


async def trellis(*args: str, **env: str) -> Result:
    """Run the CLI in a worker thread: it runs its own event loop, as from a shell."""
    runner = CliRunner(env={"COLUMNS": "200", "TRELLIS_TENANT": None, **env})
    return await asyncio.to_thread(runner.invoke, app, ["cache", "invalidate", *args])


async def test_invalidate_drops_the_calling_tenants_results(
    gateway: ToolGatewayClient, gateway_target: str
) -> None:
    for tenant in ("acme", "beta"):
        await reads(gateway, tenant)
    result = await trellis("--tool", "read_file", "--as", "acme", "--target", gateway_target)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "2 cached result(s) of read_file dropped for tenant acme"
    assert await reads(gateway, "acme") == [False, False]
    assert await reads(gateway, "beta") == [True, True]


async def test_an_argument_narrows_and_json_reports(
    gateway: ToolGatewayClient, gateway_target: str
) -> None:
    await reads(gateway, "acme")
    result = await trellis(
        "--tool", "read_file", "--arg", "path=a.txt", "--json", "--target", gateway_target,
        TRELLIS_TENANT="acme",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "tool": "read_file", "tenant": "acme", "args": {"path": "a.txt"}, "invalidated": 1,
    }  # fmt: skip
    assert await reads(gateway, "acme") == [False, True]


async def test_another_tenant_needs_an_admin(
    gateway: ToolGatewayClient, gateway_target: str
) -> None:
    await reads(gateway, "beta")
    denied = await trellis("--tool", "read_file", "--tenant", "beta", "--as", "acme",
                           "--target", gateway_target)  # fmt: skip
    assert denied.exit_code == 6, denied.output
    assert "CACHE_ADMIN_REQUIRED" in denied.output
    assert await reads(gateway, "beta") == [True, True]
    admin = await trellis("--tool", "read_file", "--all-tenants", "--as", "ops",
                          "--target", gateway_target)  # fmt: skip
    assert admin.exit_code == 0, admin.output
    assert admin.output.strip() == "2 cached result(s) of read_file dropped for every tenant"
    assert await reads(gateway, "beta") == [False, False]


async def test_bad_arguments_exit_2_and_unknown_tools_1(gateway_target: str) -> None:
    bad = await trellis("--tool", "read_file", "--arg", "no-equals", "--target", gateway_target)
    assert bad.exit_code == 2
    unknown = await trellis("--tool", "nope", "--target", gateway_target)
    assert unknown.exit_code == 1
    assert "UNKNOWN_TOOL" in unknown.output
