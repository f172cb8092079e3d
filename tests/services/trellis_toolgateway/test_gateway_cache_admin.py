"""InvalidateCache over real gRPC (gateway and cache service): a tenant drops its own
results, an admin tenant (TRELLIS_CACHE_ADMIN_TENANTS) another's or everyone's, narrowed
by argument values; bad requests get a stable reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import InvalidArgument, NotFound, PermissionDenied
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cache.service import NAME as CACHE_NAME
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_toolgateway.cache_admin import CacheAdmins
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings

TOOLS = [
    {"name": "read_file", "builtin": "read_file", "cache_ttl": 300},
    {"name": "list_dir", "builtin": "list_dir", "cache_ttl": 300},
]
PATHS = ("a.txt", "b.txt")


@pytest.fixture
async def gateway(serve, channels, tmp_path: Path) -> ToolGatewayClient:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    file = tmp_path / "tools.yaml"
    file.write_text(yaml.safe_dump({"version": 1, "tools": TOOLS}))
    cache = await serve(CACHE_NAME, build_cache, CacheSettings(port=0, metrics_port=0))
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        cache_target=cache.target,
        tools_file=file,
        cache_admin_tenants="ops",
        tenant_tools='{"limited": ["list_dir"]}',
    )
    server = await serve(NAME, build, settings)
    return ToolGatewayClient(channels.get(server.target), timeout=10)


async def read(gateway: ToolGatewayClient, path: str) -> bool:
    """Read ``path`` as the current tenant; whether it was a cache hit."""
    call = common_pb2.ToolCall(node_id="n", tool="read_file", args=to_struct({"path": path}))
    outcome = await gateway.invoke(toolgateway_pb2.InvokeToolRequest(call=call))
    assert outcome.status == common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED, outcome.error
    return outcome.cache_hit


async def fill(gateway: ToolGatewayClient, *tenants: str) -> None:
    for tenant in tenants:
        with context.request_scope(tenant_id=tenant):
            for path in PATHS:
                await read(gateway, path)


async def hits(gateway: ToolGatewayClient, tenant: str) -> list[bool]:
    with context.request_scope(tenant_id=tenant):
        return [await read(gateway, path) for path in PATHS]


async def test_a_tenant_drops_its_own_results_only(gateway: ToolGatewayClient) -> None:
    await fill(gateway, "acme", "beta")
    with context.request_scope(tenant_id="acme"):
        assert await gateway.invalidate_cache("read_file") == 2
    assert await hits(gateway, "acme") == [False, False]
    assert await hits(gateway, "beta") == [True, True]


async def test_argument_values_narrow_the_drop(gateway: ToolGatewayClient) -> None:
    await fill(gateway, "acme")
    with context.request_scope(tenant_id="acme"):
        # the path in another spelling is the same value
        assert await gateway.invalidate_cache("read_file", args={"path": "./a.txt"}) == 1
        assert await gateway.invalidate_cache("read_file", args={"path": "missing"}) == 0
    assert await hits(gateway, "acme") == [False, True]


async def test_a_tenant_that_is_not_an_admin_cannot_reach_another(
    gateway: ToolGatewayClient,
) -> None:
    await fill(gateway, "beta")
    with context.request_scope(tenant_id="acme"):
        for scope in ({"tenant_id": "beta"}, {"all_tenants": True}):
            with pytest.raises(PermissionDenied) as raised:
                await gateway.invalidate_cache("read_file", **scope)
            assert raised.value.reason == "CACHE_ADMIN_REQUIRED"
    assert await hits(gateway, "beta") == [True, True]


async def test_an_admin_drops_another_tenants_or_every_tenants_results(
    gateway: ToolGatewayClient,
) -> None:
    await fill(gateway, "acme", "beta", "gamma")
    with context.request_scope(tenant_id="ops"):
        assert await gateway.invalidate_cache("read_file", tenant_id="beta") == 2
        assert await hits(gateway, "acme") == [True, True]
        assert await gateway.invalidate_cache("read_file", all_tenants=True) == 4
    for tenant in ("acme", "gamma"):
        assert await hits(gateway, tenant) == [False, False]


@pytest.mark.parametrize(
    ("request_fields", "error", "reason", "field"),
    [
        ({"tool": ""}, InvalidArgument, "TOOL_REQUIRED", "tool"),
        ({"tool": "bad tool"}, InvalidArgument, "INVALID_ID", "tool"),
        ({"tool": "read_file", "tenant_id": "no such/tenant"}, InvalidArgument, "INVALID_ID",
         "tenant_id"),
        ({"tool": "read_file", "tenant_id": "acme", "all_tenants": True}, InvalidArgument,
         "TENANT_SCOPE_CONFLICT", "all_tenants"),
        ({"tool": "nope"}, NotFound, "UNKNOWN_TOOL", None),
    ],
)  # fmt: skip
async def test_bad_requests_get_a_stable_reason(
    gateway: ToolGatewayClient, request_fields: dict, error: type, reason: str, field: str | None
) -> None:
    with context.request_scope(tenant_id="ops"), pytest.raises(error) as raised:
        await gateway.invalidate_cache(
            request_fields["tool"],
            tenant_id=request_fields.get("tenant_id", ""),
            all_tenants=request_fields.get("all_tenants", False),
        )
    assert raised.value.reason == reason
    if field is not None:
        assert [v.field for v in raised.value.violations] == [field]


async def test_a_tool_the_tenant_may_not_use_is_refused(gateway: ToolGatewayClient) -> None:
    with context.request_scope(tenant_id="limited"), pytest.raises(PermissionDenied) as raised:
        await gateway.invalidate_cache("read_file")
    assert raised.value.reason == "TOOL_NOT_ALLOWED"


def test_scope_is_the_callers_own_unless_an_admin_names_another() -> None:
    admins = CacheAdmins(["ops"])
    assert admins.scope("acme", "", False) == "acme"
    assert admins.scope("acme", "acme", False) == "acme"
    assert admins.scope("ops", "beta", False) == "beta"
    assert admins.scope("ops", "", True) is None
