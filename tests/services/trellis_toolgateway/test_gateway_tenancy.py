"""Per-tenant tool allow-lists (TRELLIS_TENANT_TOOLS): the policy, its settings, and the
gateway over real gRPC — ListTools shows a tenant only its tools, and InvokeTool of any
other tool is PERMISSION_DENIED (TOOL_NOT_ALLOWED) before the tool is even looked up,
whoever planned the call."""

import json
from pathlib import Path

import grpc
import pytest

from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import to_struct
from trellis.runtime.errors import NotFound, PermissionDenied
from trellis.runtime.settings import load_settings
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cache.service import NAME as CACHE_NAME
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings
from trellis_toolgateway.tenancy import TenantTools, parse_tenant_tools

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED

#: A side-effecting tool whose every run leaves a file behind, and two harmless ones.
TOOLS_YAML = """\
version: 1
sandbox_root: box
tools:
  - {name: arithmetic, builtin: arithmetic}
  - {name: echo, builtin: echo}
  - name: touch
    kind: command
    side_effects: true
    commands:
      - command: touch {name}
        argv: [touch, --, "{name}"]
        params:
          name: {pattern: '[a-z0-9-]{1,40}', path: true}
"""

POLICY = {"acme": ["arithmetic", "to*"], "beta": ["echo"], "*": ["arithmetic"]}


def tools_file(directory: Path) -> Path:
    (directory / "box").mkdir(exist_ok=True)
    path = directory / "tools.yaml"
    path.write_text(TOOLS_YAML)
    return path


# -- the policy -------------------------------------------------------------------------------


def test_listed_tenants_get_their_tools_and_others_the_star_entry() -> None:
    policy = TenantTools.of(POLICY)
    assert policy.allows("acme", "arithmetic") and policy.allows("acme", "touch")
    assert not policy.allows("acme", "echo")
    assert policy.allows("beta", "echo") and not policy.allows("beta", "arithmetic")
    assert policy.allows("gamma", "arithmetic") and not policy.allows("gamma", "echo")


def test_without_a_star_entry_unlisted_tenants_may_use_everything() -> None:
    policy = TenantTools.of({"acme": ["arithmetic"]})
    assert policy.allows("default", "touch") and not policy.allows("acme", "touch")
    assert TenantTools().allows("anyone", "anything")  # nothing configured
    deny_by_default = TenantTools.of({"acme": ["*"], "*": []})
    assert deny_by_default.allows("acme", "touch") and not deny_by_default.allows("x", "echo")


def test_patterns_match_whole_names_case_sensitively() -> None:
    policy = TenantTools.of({"t": ["files_*", "calc?", "[ab]x"]})
    assert policy.allows("t", "files_read") and policy.allows("t", "calc1")
    assert policy.allows("t", "bx")
    for tool in ("xfiles_read", "Files_read", "calc", "calc12", "cx"):
        assert not policy.allows("t", tool), tool


def test_check_raises_permission_denied_tool_not_allowed() -> None:
    with pytest.raises(PermissionDenied) as raised:
        TenantTools.of(POLICY).check("beta", "touch")
    assert raised.value.reason == "TOOL_NOT_ALLOWED"
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.metadata == {"tenant": "beta", "tool": "touch"}
    TenantTools.of(POLICY).check("beta", "echo")  # allowed: no error


def test_configuration_is_parsed_from_json() -> None:
    assert parse_tenant_tools(json.dumps(POLICY)) == POLICY
    assert parse_tenant_tools("") == parse_tenant_tools({}) == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{oops", "not JSON"),
        ('["acme"]', "JSON object"),
        ('{"acme": "arithmetic"}', "list of tool names"),
        ('{"acme": [""]}', "list of tool names"),
        ('{"bad tenant": ["echo"]}', "tenant 'bad tenant'"),
    ],
)
def test_bad_configuration_is_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tenant_tools(value)


def test_bad_variable_stops_the_gateway_naming_it(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRELLIS_TENANT_TOOLS", '{"acme": "echo"}')
    with pytest.raises(SystemExit) as exited:
        load_settings(GatewaySettings, "trellis-toolgateway")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TRELLIS_TENANT_TOOLS: " in err


def test_variable_is_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TRELLIS_TENANT_TOOLS", json.dumps(POLICY))
    assert load_settings(GatewaySettings, "test").tenant_tools == POLICY


# -- the gateway over gRPC --------------------------------------------------------------------


@pytest.fixture
async def cache_target(serve) -> str:
    return (await serve(CACHE_NAME, build_cache, CacheSettings(port=0, metrics_port=0))).target


async def start_gateway(serve, channels, cache_target: str, tmp_path: Path, **kw):
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        cache_target=cache_target,
        tools_file=tools_file(tmp_path),
        tools_reload_seconds=0,
        **kw,
    )
    server = await serve(NAME, build, settings)
    return ToolGatewayClient(channels.get(server.target), timeout=10)


@pytest.fixture
async def gateway(serve, channels, cache_target: str, tmp_path: Path) -> ToolGatewayClient:
    return await start_gateway(serve, channels, cache_target, tmp_path, tenant_tools=POLICY)


def touch(name: str, node_id: str = "n1") -> toolgateway_pb2.InvokeToolRequest:
    call = common_pb2.ToolCall(node_id=node_id, tool="touch", args=to_struct({"command": name}))
    return toolgateway_pb2.InvokeToolRequest(
        call=call, run_id="run-1", idempotency_key=f"run-1/{node_id}"
    )


async def tools_of(gateway: ToolGatewayClient, tenant: str) -> set[str]:
    with context.request_scope(tenant_id=tenant):
        return {spec.name for spec in await gateway.list_tools()}


async def test_list_tools_shows_each_tenant_only_its_tools(gateway: ToolGatewayClient) -> None:
    assert await tools_of(gateway, "acme") == {"arithmetic", "touch"}
    assert await tools_of(gateway, "beta") == {"echo"}
    assert await tools_of(gateway, "gamma") == {"arithmetic"}  # the "*" entry


async def test_a_denied_tool_never_runs(gateway: ToolGatewayClient, tmp_path: Path) -> None:
    """The caller (here: this test, as the executor would) is not trusted to have checked."""
    with context.request_scope(tenant_id="beta"), pytest.raises(PermissionDenied) as raised:
        await gateway.invoke(touch("touch beta-was-here"))
    assert raised.value.reason == "TOOL_NOT_ALLOWED"
    assert raised.value.metadata == {"tenant": "beta", "tool": "touch"}
    assert not (tmp_path / "box" / "beta-was-here").exists()

    with context.request_scope(tenant_id="acme"):
        outcome = await gateway.invoke(touch("touch acme-was-here"))
    assert outcome.status == SUCCEEDED, outcome.error
    assert (tmp_path / "box" / "acme-was-here").exists()


async def test_denial_comes_before_lookup_so_nothing_leaks(gateway: ToolGatewayClient) -> None:
    """A denied tenant gets PERMISSION_DENIED for a tool that does not exist too; a tenant
    allowed everything matching the name gets NOT_FOUND as before."""
    nowhere = toolgateway_pb2.InvokeToolRequest(call=common_pb2.ToolCall(tool="no_such_tool"))
    with context.request_scope(tenant_id="beta"), pytest.raises(PermissionDenied):
        await gateway.invoke(nowhere)
    nowhere.call.tool = "to_nowhere"  # acme may use "to*"
    with context.request_scope(tenant_id="acme"), pytest.raises(NotFound) as raised:
        await gateway.invoke(nowhere)
    assert raised.value.reason == "UNKNOWN_TOOL"


async def test_without_a_policy_every_tenant_has_every_tool(
    serve, channels, cache_target: str, tmp_path: Path
) -> None:
    gateway = await start_gateway(serve, channels, cache_target, tmp_path)
    assert await tools_of(gateway, "beta") == {"arithmetic", "echo", "touch"}
    with context.request_scope(tenant_id="beta"):
        outcome = await gateway.invoke(touch("touch anyone"))
    assert outcome.status == SUCCEEDED and (tmp_path / "box" / "anyone").exists()
