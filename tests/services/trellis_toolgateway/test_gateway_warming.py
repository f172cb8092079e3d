"""Warming: the tools file's ``warm`` calls fill the cache before the gateway serves and
again after each reload (which first drops the results of tools that changed), so the
first call is a hit; calls that cannot warm anything are skipped, never run.

The first tests run ``warming.warm`` over the cache service's ``MemoryStore`` in process;
the last ones a real gateway and cache service over gRPC, as ``service.build`` wires them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from opentelemetry import trace
from prometheus_client import REGISTRY

from tests.support.gateway_registries import load_registry
from tests.support.store_cache import StoreCache
from trellis.clients.cache import CacheClient
from trellis.clients.toolgateway import ToolGatewayClient
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value, to_struct
from trellis.toolgateway.v1 import toolgateway_pb2
from trellis_cache.service import NAME as CACHE_NAME
from trellis_cache.service import build as build_cache
from trellis_cache.settings import CacheSettings
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.loader import LoadOptions
from trellis_toolgateway.service import NAME, build
from trellis_toolgateway.settings import GatewaySettings
from trellis_toolgateway.tenancy import TenantTools
from trellis_toolgateway.warming import warm

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED

TOOLS = [
    {"name": "read_file", "builtin": "read_file", "cache_ttl": 300},
    {"name": "list_dir", "builtin": "list_dir", "cache_ttl": 300, "shared_cache": True},
    {"name": "echo", "builtin": "echo"},  # not cached
    {
        "name": "touch",
        "kind": "command",
        "side_effects": True,
        "commands": [{"command": "touch warmed", "argv": ["touch", "warmed"]}],
    },
]


def tools_file(tmp_path: Path, warm_calls: list[dict], tools: list[dict] = TOOLS) -> Path:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir(exist_ok=True)
    (sandbox / "motd.txt").write_text("hello")
    file = tmp_path / "tools.yaml"
    text = yaml.safe_dump(
        {"version": 1, "sandbox_root": "sandbox", "tools": tools, "warm": warm_calls}
    )
    file.write_text(text)
    return file


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_warmed_calls_hit_on_the_first_call(tmp_path: Path) -> None:
    warm_calls = [
        {"tool": "read_file", "args": {"path": "motd.txt"}, "tenants": ["acme", "beta"]},
        {"tool": "list_dir", "args": {"path": "."}},  # shared: one result for everyone
    ]
    registry = await load_registry(tools_file(tmp_path, warm_calls), LoadOptions())
    cache = StoreCache()
    invoker = Invoker(registry, cache, trace.get_tracer("test"))
    filled_before = sample("trellis_cache_warm_calls_total", tool="read_file", outcome="filled")
    counts = await warm(invoker, registry, registry.warm)
    assert counts == {"filled": 3, "hit": 0, "failed": 0, "skipped": 0}
    assert sample("trellis_cache_warm_calls_total", tool="read_file", outcome="filled") == (
        filled_before + 2
    )
    for tenant in ("acme", "beta", "gamma"):
        with context.request_scope(tenant_id=tenant):
            listing = await invoker.invoke(Call("list_dir", {"path": "."}))
            assert listing.cache_hit, tenant
            if tenant != "gamma":  # not listed: its own results are not warmed
                motd = await invoker.invoke(Call("read_file", {"path": "motd.txt"}))
                assert motd.cache_hit and from_value(motd.output)["content"] == "hello"
    # warming again runs nothing: everything is still cached
    assert await warm(invoker, registry, registry.warm) == {
        "filled": 0, "hit": 3, "failed": 0, "skipped": 0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "warm_call",
    [
        {"tool": "nope", "tenants": ["acme"]},  # unknown
        {"tool": "touch", "args": {"command": "touch warmed"}, "tenants": ["acme"]},  # effects
        {"tool": "echo", "args": {"value": 1}, "tenants": ["acme"]},  # not cached
        {"tool": "read_file", "args": {"path": "motd.txt"}},  # per tenant, none listed
        {"tool": "read_file", "args": {"path": "motd.txt"}, "tenants": ["denied"]},
    ],
)
async def test_calls_that_cannot_warm_are_skipped_and_never_run(
    tmp_path: Path, warm_call: dict
) -> None:
    registry = await load_registry(tools_file(tmp_path, [warm_call]), LoadOptions())
    cache = StoreCache()
    invoker = Invoker(registry, cache, trace.get_tracer("test"))
    allowed = TenantTools.of({"denied": ["echo"]}).allows
    counts = await warm(invoker, registry, registry.warm, allowed=allowed)
    assert counts["skipped"] == 1
    assert cache.sets == 0
    assert not (tmp_path / "sandbox" / "warmed").exists()  # the side effect never ran


async def test_a_warm_call_that_fails_is_counted_and_stops_nothing(tmp_path: Path) -> None:
    warm_calls = [
        {"tool": "read_file", "args": {"path": "missing.txt"}, "tenants": ["acme"]},
        {"tool": "read_file", "args": {"wrong": 1}, "tenants": ["acme"]},  # the contract
        {"tool": "read_file", "args": {"path": "motd.txt"}, "tenants": ["acme"]},
    ]
    registry = await load_registry(tools_file(tmp_path, warm_calls), LoadOptions())
    invoker = Invoker(registry, StoreCache(), trace.get_tracer("test"))
    counts = await warm(invoker, registry, registry.warm)
    assert counts == {"filled": 1, "hit": 0, "failed": 2, "skipped": 0}


# -- a real gateway -----------------------------------------------------------------------


async def eventually(predicate: Callable[[], object], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():  # type: ignore[misc]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def invoke_request(tool: str, args: dict) -> toolgateway_pb2.InvokeToolRequest:
    call = common_pb2.ToolCall(node_id="n1", tool=tool, args=to_struct(args))
    return toolgateway_pb2.InvokeToolRequest(call=call, run_id="r1")


async def test_the_gateway_serves_warm_and_warms_again_after_a_reload(
    serve, channels, tmp_path: Path
) -> None:
    cache_server = await serve(CACHE_NAME, build_cache, CacheSettings(port=0, metrics_port=0))
    file = tools_file(
        tmp_path, [{"tool": "read_file", "args": {"path": "motd.txt"}, "tenants": ["default"]}]
    )
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        cache_target=cache_server.target,
        tools_file=file,
        tools_reload_seconds=0.05,
    )
    gateway = ToolGatewayClient(channels.get((await serve(NAME, build, settings)).target))
    cache = CacheClient(channels.get(cache_server.target))

    first = await gateway.invoke(invoke_request("read_file", {"path": "motd.txt"}))
    assert (first.status, first.cache_hit) == (SUCCEEDED, True)  # call 1 is a hit
    await gateway.invoke(invoke_request("list_dir", {"path": "."}))  # cached by a caller

    # A reload that changes read_file (its output cap) and warms list_dir: the old
    # read_file results go, the warm calls run again.
    changed = [{**TOOLS[0], "max_bytes": 4}, *TOOLS[1:]]
    warm_calls = [
        {"tool": "read_file", "args": {"path": "motd.txt"}, "tenants": ["default"]},
        {"tool": "list_dir", "args": {"path": "."}},
    ]
    reloads = sample("trellis_cache_invalidations_total", tool="read_file", cause="reload",
                     outcome="ok")  # fmt: skip
    tools_file(tmp_path, warm_calls, changed)

    async def reloaded() -> bool:
        labels = {"tool": "read_file", "cause": "reload", "outcome": "ok"}
        return sample("trellis_cache_invalidations_total", **labels) > reloads

    await eventually(reloaded)
    await eventually(lambda: _stats_settle(cache))
    motd = await gateway.invoke(invoke_request("read_file", {"path": "motd.txt"}))
    assert motd.cache_hit and from_value(motd.output)["content"] == "hell"  # the new cap
    assert (await gateway.invoke(invoke_request("list_dir", {"path": "."}))).cache_hit


async def _stats_settle(cache: CacheClient) -> bool:
    """True once both warm results are stored (read_file's again, list_dir's shared)."""
    return (await cache.stats()).entries >= 2
