"""Invalidation by side effects: a side-effecting call drops the cached results its tool's
``invalidates`` rules name, for its tenant, before its outcome is returned.

The tools are real (read_file, list_dir, command tools running ``cp``, ``touch``,
``df``) over a sandbox in the test's tmp dir, and the cache is the cache service's
own ``MemoryStore`` (tags and tag groups), in process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from tests.support.gateway_registries import load_registry
from tests.support.store_cache import StoreCache
from trellis.common.v1 import common_pb2
from trellis.runtime import context
from trellis.runtime.convert import from_value
from trellis.runtime.errors import InvalidArgument, Unavailable
from trellis_toolgateway.cache_keys import arg_tag, normal_path, path_prefixes, under_tag
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.loader import LoadOptions, ToolsFileError, check_tools_file
from trellis_toolgateway.registry import ToolRegistry
from trellis_toolgateway.tools.base import FunctionTool, Spec
from trellis_toolgateway.tools.config import Invalidation

SUCCEEDED = common_pb2.NodeStatus.NODE_STATUS_SUCCEEDED
PATH = {"pattern": r"[\w./-]{1,200}", "path": True}

#: A sandbox's tools: cached readers, and writers whose rules name them.
TOOLS = [
    {"name": "read_file", "builtin": "read_file", "cache_ttl": 300},
    {"name": "list_dir", "builtin": "list_dir", "cache_ttl": 300},
    {
        "name": "run_command",
        "kind": "command",
        "commands": [
            {"command": "df -h", "argv": ["df", "-h"], "cache_ttl": 300},
            {"command": "uname -s", "argv": ["uname", "-s"], "cache_ttl": 300},
        ],
    },
    {
        "name": "copy_file",
        "kind": "command",
        "side_effects": True,
        "commands": [
            {
                "command": "cp {src} {path}",
                "argv": ["cp", "--", "{src}", "{path}"],
                "params": {"src": PATH, "path": PATH},
            }
        ],
        "invalidates": [
            {"tools": ["read_file", "list_dir"], "same_path": {"path": "path"}},
            {"tools": ["run_command"], "args": {"command": "df -h"}},
        ],
    },
    {
        "name": "touch",
        "kind": "command",
        "side_effects": True,
        "commands": [
            {"command": "touch {path}", "argv": ["touch", "--", "{path}"], "params": {"path": PATH}}
        ],
        "invalidates": [{"tools": ["read_*", "list_*"], "same_path": {"path": "path"}}],
    },
    {
        "name": "touch_any",
        "kind": "command",
        "side_effects": True,
        "commands": [{"command": "touch marker", "argv": ["touch", "marker"]}],
        # no path argument to narrow by: every result of the tool goes
        "invalidates": [{"tools": ["read_file"], "same_path": {"path": "path"}}],
    },
]


def write_tools(tmp_path: Path, tools: list[dict]) -> Path:
    sandbox = tmp_path / "sandbox"
    (sandbox / "notes").mkdir(parents=True, exist_ok=True)
    (sandbox / "other").mkdir(exist_ok=True)
    (sandbox / "notes" / "a.txt").write_text("old")
    (sandbox / "notes" / "b.txt").write_text("b")
    (sandbox / "other" / "c.txt").write_text("c")
    (sandbox / "new.txt").write_text("new")
    file = tmp_path / "tools.yaml"
    file.write_text(yaml.safe_dump({"version": 1, "sandbox_root": "sandbox", "tools": tools}))
    return file


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(spans: InMemorySpanExporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("test")


@pytest.fixture
async def registry(tmp_path: Path) -> ToolRegistry:
    return await load_registry(write_tools(tmp_path, TOOLS), LoadOptions())


@pytest.fixture
def cache() -> StoreCache:
    return StoreCache()


@pytest.fixture
def invoker(registry: ToolRegistry, cache: StoreCache, tracer) -> Invoker:
    return Invoker(registry, cache, tracer)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def call(invoker: Invoker, tool: str, args: dict, key: str = "") -> common_pb2.NodeOutcome:
    outcome = await invoker.invoke(Call(tool, args, node_id="n"), idempotency_key=key)
    assert outcome.status == SUCCEEDED, outcome.error
    return outcome


async def read(invoker: Invoker, path: str) -> tuple[str, bool]:
    outcome = await call(invoker, "read_file", {"path": path})
    return from_value(outcome.output)["content"], outcome.cache_hit


async def listed(invoker: Invoker, path: str = ".") -> bool:
    """Whether list_dir of ``path`` was a cache hit."""
    return (await call(invoker, "list_dir", {"path": path})).cache_hit


# -- the rules ---------------------------------------------------------------------------


async def test_a_write_then_a_read_of_the_same_path_gets_the_fresh_value(
    invoker: Invoker, cache: StoreCache
) -> None:
    assert await read(invoker, "notes/a.txt") == ("old", False)
    assert await read(invoker, "notes/a.txt") == ("old", True)
    for warm in ("notes", ".", "other"):
        await listed(invoker, warm)
    assert await read(invoker, "notes/b.txt") == ("b", False)

    await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="run/w")

    assert await read(invoker, "notes/a.txt") == ("new", False)  # fresh, not the cached "old"
    # the listings of the directories it is in went too; a sibling and elsewhere stay
    assert (await listed(invoker, "notes"), await listed(invoker, ".")) == (False, False)
    assert await listed(invoker, "other") is True
    assert await read(invoker, "notes/b.txt") == ("b", True)


async def test_paths_match_in_their_canonical_spelling(invoker: Invoker) -> None:
    await read(invoker, "./notes//a.txt")
    await call(invoker, "copy_file", {"command": "cp new.txt notes/../notes/a.txt"}, key="k")
    assert await read(invoker, "./notes//a.txt") == ("new", False)


async def test_a_change_to_a_directory_drops_what_is_inside_it(invoker: Invoker) -> None:
    await read(invoker, "notes/a.txt")
    await read(invoker, "other/c.txt")
    await listed(invoker, ".")
    await call(invoker, "touch", {"command": "touch notes"}, key="k")
    assert (await read(invoker, "notes/a.txt"))[1] is False  # inside notes
    assert await listed(invoker, ".") is False  # notes' parent
    assert (await read(invoker, "other/c.txt"))[1] is True


async def test_an_argument_value_narrows_to_one_command(invoker: Invoker) -> None:
    for command in ("df -h", "uname -s"):
        await call(invoker, "run_command", {"command": command})
    await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="k")
    df = await call(invoker, "run_command", {"command": "df -h"})
    uname = await call(invoker, "run_command", {"command": "uname -s"})
    assert (df.cache_hit, uname.cache_hit) == (False, True)


async def test_a_command_spelled_otherwise_is_the_same_value(invoker: Invoker) -> None:
    await call(invoker, "run_command", {"command": "df   -h"})
    assert (await call(invoker, "run_command", {"command": "df   -h"})).cache_hit
    await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="k")
    assert not (await call(invoker, "run_command", {"command": "df   -h"})).cache_hit


async def test_a_rule_whose_argument_the_call_lacks_drops_every_result_of_the_tool(
    invoker: Invoker,
) -> None:
    await read(invoker, "notes/a.txt")
    await read(invoker, "other/c.txt")
    await call(invoker, "touch_any", {"command": "touch marker"}, key="k")
    assert (await read(invoker, "notes/a.txt"))[1] is False
    assert (await read(invoker, "other/c.txt"))[1] is False


async def test_invalidation_is_per_tenant(invoker: Invoker) -> None:
    for tenant in ("acme", "beta"):
        with context.request_scope(tenant_id=tenant):
            await read(invoker, "notes/a.txt")
    with context.request_scope(tenant_id="acme"):
        await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="k")
        assert await read(invoker, "notes/a.txt") == ("new", False)
    with context.request_scope(tenant_id="beta"):  # beta's own result is untouched
        assert await read(invoker, "notes/a.txt") == ("old", True)


async def test_a_shared_result_goes_whoever_wrote(
    tmp_path: Path, cache: StoreCache, tracer
) -> None:
    tools = [{**TOOLS[0], "shared_cache": True}, *TOOLS[1:]]
    invoker = Invoker(
        await load_registry(write_tools(tmp_path, tools), LoadOptions()), cache, tracer
    )
    with context.request_scope(tenant_id="acme"):
        await read(invoker, "notes/a.txt")
    with context.request_scope(tenant_id="beta"):
        assert (await read(invoker, "notes/a.txt"))[1] is True  # one shared result
        await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="k")
    with context.request_scope(tenant_id="acme"):
        assert await read(invoker, "notes/a.txt") == ("new", False)


async def test_the_drop_is_counted_and_marked_on_the_span(
    invoker: Invoker, spans: InMemorySpanExporter
) -> None:
    labels = {"tool": "read_file", "cause": "side_effect", "outcome": "ok"}
    before = sample("trellis_cache_invalidations_total", **labels)
    await read(invoker, "notes/a.txt")
    await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="k")
    assert sample("trellis_cache_invalidations_total", **labels) == before + 1
    (span,) = [s for s in spans.get_finished_spans() if s.name == "execute_tool copy_file"]
    (event,) = [e for e in span.events if e.name == "trellis.cache.invalidated"]
    assert event.attributes["trellis.cache.cause"] == "side_effect"
    assert set(event.attributes["trellis.cache.tools"]) == {"read_file", "list_dir", "run_command"}
    assert event.attributes["trellis.cache.entries"] == 1


async def test_a_call_refused_before_its_backend_drops_nothing(
    invoker: Invoker, cache: StoreCache
) -> None:
    await read(invoker, "notes/a.txt")
    with pytest.raises(InvalidArgument):
        await invoker.invoke(Call("copy_file", {"command": "cp new.txt ../escape"}))
    assert cache.invalidations == []
    assert (await read(invoker, "notes/a.txt"))[1] is True


async def test_an_idempotent_replay_drops_nothing_again(
    invoker: Invoker, cache: StoreCache
) -> None:
    await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="same")
    await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"}, key="same")
    assert len(cache.invalidations) == 1


class DownOnInvalidate(StoreCache):
    async def invalidate(self, *args, **kwargs) -> int:
        raise Unavailable("cache is down", reason="CACHE_BACKEND_UNAVAILABLE")


async def test_a_cache_that_fails_the_drop_does_not_fail_the_call(
    registry: ToolRegistry, tracer, spans: InMemorySpanExporter
) -> None:
    invoker = Invoker(registry, DownOnInvalidate(), tracer)
    labels = {"tool": "read_file", "cause": "side_effect", "outcome": "error"}
    before = sample("trellis_cache_invalidations_total", **labels)
    outcome = await invoker.invoke(
        Call("copy_file", {"command": "cp new.txt notes/a.txt"}), idempotency_key="k"
    )
    assert outcome.status == SUCCEEDED  # the copy happened: its outcome says so
    assert sample("trellis_cache_invalidations_total", **labels) == before + 1
    (span,) = [s for s in spans.get_finished_spans() if s.name == "execute_tool copy_file"]
    assert any(e.name == "trellis.cache.error" for e in span.events)


async def test_a_result_read_before_the_write_is_not_stored_after_it(tracer) -> None:
    """A read that started before a write and ends after it must not store what it read."""
    started, released, store = asyncio.Event(), asyncio.Event(), {"value": "old"}

    async def slow_read(args: dict) -> dict:
        seen = store["value"]
        started.set()
        await released.wait()
        return {"value": seen}

    async def write(args: dict) -> dict:
        store["value"] = "new"
        return {}

    obj = {"type": "object"}
    reader = FunctionTool(Spec("reader", "r", obj, obj, cache_ttl=300), slow_read)
    rule = Invalidation(tools=["reader"])
    writer = FunctionTool(
        Spec("writer", "w", obj, obj, side_effects=True, invalidates=(rule,)), write
    )
    cache = StoreCache()
    invoker = Invoker(ToolRegistry([reader, writer]), cache, tracer)

    first = asyncio.create_task(invoker.invoke(Call("reader", {})))
    await started.wait()  # the read missed the cache and runs
    await invoker.invoke(Call("writer", {}))
    released.set()
    assert from_value((await first).output) == {"value": "old"}  # its caller gets it
    await invoker.settled()
    again = await invoker.invoke(Call("reader", {}))
    assert (again.cache_hit, from_value(again.output)) == (False, {"value": "new"})


async def test_side_effecting_tools_are_never_cached_even_with_rules(
    invoker: Invoker, cache: StoreCache
) -> None:
    await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"})
    again = await call(invoker, "copy_file", {"command": "cp new.txt notes/a.txt"})
    assert (again.cache_hit, cache.sets) == (False, 0)


# -- tags and groups ---------------------------------------------------------------------


async def test_tags_name_the_tool_tenant_arguments_and_directories(registry: ToolRegistry) -> None:
    index = registry.invalidation
    tags = index.tags(registry.get("read_file").tool, "acme", {"path": "./notes//a.txt"})
    assert tags[:2] == ["tool:read_file", "tenant:acme"]
    assert arg_tag("read_file", "path", "notes/a.txt") in tags
    for directory in (".", "notes", "notes/a.txt"):
        assert under_tag("read_file", "path", directory) in tags
    # a tool no rule compares by path has no directory tags
    df = index.tags(registry.get("run_command").tool, "acme", {"command": "df   -h"})
    assert df == ["tool:run_command", "tenant:acme", arg_tag("run_command", "command", "df -h")]


def test_path_prefixes_are_outermost_first() -> None:
    assert path_prefixes(normal_path("a//b/./c/")) == [".", "a", "a/b", "a/b/c"]
    assert path_prefixes("/x/y") == ["/", "/x", "/x/y"]
    assert path_prefixes(normal_path("")) == ["."]


# -- the tools file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "problem"),
    [
        (
            {"name": "r", "builtin": "read_file", "invalidates": [{"tools": ["x"]}]},
            "tools[0].invalidates: only a tool with side effects makes results stale",
        ),
        (
            {"name": "r", "builtin": "echo", "side_effects": False,
             "invalidates": [{"tools": ["x"]}]},
            "tools[0]: invalidates: only a tool with side effects makes results stale",
        ),
        (
            {"name": "h", "kind": "http", "method": "POST", "url": "http://h/x",
             "allowed_hosts": ["h"], "refresh_ahead": 0.2},
            "tools[0].refresh_ahead: a tool with side effects is never cached",
        ),
        (
            {"name": "e", "builtin": "echo", "side_effects": True, "refresh_ahead": 0.2},
            "tools[0]: refresh_ahead: a tool with side effects is never cached",
        ),
        (
            {"name": "e", "builtin": "echo", "refresh_ahead": 1},
            "tools[0].refresh_ahead: Input should be less than 1",
        ),
        (
            {"name": "e", "builtin": "echo", "side_effects": True,
             "invalidates": [{"tools": ["bad name"]}]},
            "tools[0].invalidates[0].tools[0]: not a tool name or pattern",
        ),
        (
            {"name": "e", "builtin": "echo", "side_effects": True,
             "invalidates": [{"tools": ["x"], "same_path": {"a": "a", "b": "b"}}]},
            "tools[0].invalidates[0].same_path: Dictionary should have at most 1 item",
        ),
    ],
)  # fmt: skip
def test_rules_that_cannot_work_are_refused_with_their_place(
    tmp_path: Path, tool: dict, problem: str
) -> None:
    with pytest.raises(ToolsFileError) as raised:
        check_tools_file(write_tools(tmp_path, [tool]))
    assert problem in str(raised.value)


def test_warm_calls_are_checked_with_the_file(tmp_path: Path) -> None:
    file = write_tools(tmp_path, [])
    data = yaml.safe_load(file.read_text())
    data["warm"] = [{"tool": "echo", "tenants": ["not a tenant"]}]
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(ToolsFileError) as raised:
        check_tools_file(file)
    assert "warm[0].tenants[0]" in str(raised.value)
