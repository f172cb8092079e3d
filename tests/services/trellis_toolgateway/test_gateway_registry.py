"""The registry (schemas checked at registration, unique names) and the holder that swaps
registries atomically and retires their sources. (Cache keys: test_gateway_invoker.)"""

import asyncio

import pytest
from jsonschema import SchemaError
from opentelemetry import trace

from tests.support.gateway_registries import builtin_registry
from trellis.runtime.convert import from_value
from trellis_toolgateway.invoker import Call, Invoker
from trellis_toolgateway.registry import (
    RegistryHolder,
    SourceHandle,
    ToolRegistry,
)
from trellis_toolgateway.tools.base import FunctionTool, Spec, Tool, ToolSource


async def _noop(args: dict) -> dict:
    return {}


def tool(name: str = "t", input_schema: dict | None = None, timeout: float = 10.0) -> FunctionTool:
    return FunctionTool(
        Spec(name, "d", input_schema or {"type": "object"}, {}, timeout=timeout), _noop
    )


class ClosingSource(ToolSource):
    def __init__(self) -> None:
        self.closed = 0

    async def tools(self) -> list[Tool]:
        return []

    async def aclose(self) -> None:
        self.closed += 1


def with_source(registry: ToolRegistry, source: ToolSource, key: object = "k") -> ToolRegistry:
    registry.sources.append(SourceHandle(key, source))
    return registry


def test_builtins_are_registered_with_valid_specs() -> None:
    registry = builtin_registry()
    assert list(registry) == [
        "arithmetic", "run_command", "read_file", "list_dir", "sql_query", "sleep", "echo"
    ]  # fmt: skip
    for spec in registry.specs():
        proto = spec.to_proto()
        assert proto.name == spec.name and proto.version == (
            "2" if spec.name == "arithmetic" else "1"
        )
        assert proto.input_schema["type"] == "object"
        assert not proto.side_effects


def test_builtin_registry_applies_command_settings() -> None:
    registry = builtin_registry(command_timeout=3.0)
    entry = registry.get("run_command")
    assert entry is not None and entry.tool.spec.timeout == 4.0  # kill at 3 s, bound at 4 s


def test_duplicate_names_and_bad_schemas_are_refused() -> None:
    registry = ToolRegistry([tool("t")])
    with pytest.raises(ValueError, match="twice"):
        registry.register(tool("t"))
    with pytest.raises(SchemaError):
        registry.register(tool("u", {"type": "no-such-type"}))
    assert "u" not in registry and len(registry) == 1


async def test_holder_delegates_to_the_current_registry_and_swaps_atomically() -> None:
    first, second = ToolRegistry([tool("a")]), ToolRegistry([tool("b"), tool("c")])
    holder = RegistryHolder(first)
    entry = holder.get("a")
    assert entry is not None and [s.name for s in holder.specs()] == ["a"]
    assert holder.swap(second) is first
    assert holder.get("a") is None and holder.get("b") is not None
    assert list(holder) == ["b", "c"] and len(holder) == 2 and "c" in holder
    # An entry looked up before the swap still works: in-flight calls keep their tool.
    assert await entry.tool.run({}) == {}


async def test_invoker_sees_the_swap_through_the_holder() -> None:
    async def answer(value: str):
        async def run(args: dict) -> dict:
            return {"v": value}

        return FunctionTool(Spec("t", "d", {"type": "object"}, {}), run)

    holder = RegistryHolder(ToolRegistry([await answer("old")]))
    invoker = Invoker(holder, None, trace.get_tracer("test"))
    assert from_value((await invoker.invoke(Call("t"))).output) == {"v": "old"}
    holder.swap(ToolRegistry([await answer("new")]))
    assert from_value((await invoker.invoke(Call("t"))).output) == {"v": "new"}


async def test_swap_closes_unused_sources_after_the_old_tools_timeout() -> None:
    kept, dropped = ClosingSource(), ClosingSource()
    old = with_source(with_source(ToolRegistry([tool("a", timeout=0.2)]), kept), dropped)
    new = with_source(ToolRegistry(), kept)
    holder = RegistryHolder(old)
    holder.swap(new)
    await asyncio.sleep(0.05)
    assert dropped.closed == 0  # calls into the old registry may still be running
    await asyncio.sleep(0.3)
    assert (dropped.closed, kept.closed) == (1, 0)
    await holder.aclose()
    assert (dropped.closed, kept.closed) == (1, 1)


async def test_aclose_closes_sources_still_being_retired_at_once() -> None:
    retiring, current = ClosingSource(), ClosingSource()
    holder = RegistryHolder(with_source(ToolRegistry([tool("a", timeout=60)]), retiring))
    holder.swap(with_source(ToolRegistry(), current))
    await holder.aclose()
    assert (retiring.closed, current.closed) == (1, 1)
    with pytest.raises(RuntimeError):
        holder.swap(ToolRegistry())


@pytest.mark.parametrize("name", ["", "rm -rf", "a/b", "t\x00", "x" * 129])
def test_a_tool_name_against_the_rule_is_refused(name: str) -> None:
    """A source's tool named so could never be called (InvokeTool refuses the name):
    the loader skips it with a warning, as for any tool the registry refuses."""
    with pytest.raises(ValueError, match="tool name"):
        ToolRegistry([tool(name)])
    assert ToolRegistry([tool("mcp.files_read:v2")]).get("mcp.files_read:v2") is not None


def test_the_catalog_version_depends_on_the_specs_only() -> None:
    """Replicas loading the same file agree on the version, whatever the order; any change
    of a spec the callers see moves it."""
    one = ToolRegistry([tool("a"), tool("b")])
    assert one.version == ToolRegistry([tool("b"), tool("a")]).version
    assert len(one.version) == 32
    assert one.version != ToolRegistry([tool("a")]).version
    assert one.version != ToolRegistry([tool("a"), tool("b", timeout=3)]).version
    assert one.composed().version == one.version
