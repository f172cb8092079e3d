"""The registry (schemas checked at registration, unique names) and cache keys."""

import pytest
from jsonschema import SchemaError

from trellis_toolgateway.cache_keys import cache_key, cache_tags
from trellis_toolgateway.registry import ToolRegistry, builtin_registry
from trellis_toolgateway.tools.base import FunctionTool, Spec


async def _noop(args: dict) -> dict:
    return {}


def tool(name: str = "t", input_schema: dict | None = None) -> FunctionTool:
    return FunctionTool(Spec(name, "d", input_schema or {"type": "object"}, {}), _noop)


def test_builtins_are_registered_with_valid_specs() -> None:
    registry = builtin_registry()
    assert list(registry) == ["arithmetic", "run_command", "sleep", "echo"]
    for spec in registry.specs():
        proto = spec.to_proto()
        assert proto.name == spec.name and proto.version == "1"
        assert proto.input_schema["type"] == "object"
        assert not proto.side_effects


def test_duplicate_names_and_bad_schemas_are_refused() -> None:
    registry = ToolRegistry([tool("t")])
    with pytest.raises(ValueError, match="twice"):
        registry.register(tool("t"))
    with pytest.raises(SchemaError):
        registry.register(tool("u", {"type": "no-such-type"}))
    assert "u" not in registry and len(registry) == 1


def test_cache_key_is_canonical_and_covers_tenant_tool_version_args() -> None:
    base = cache_key("acme", "arithmetic", "1", {"a": 1, "b": {"c": 2, "d": 3}})
    assert base == cache_key("acme", "arithmetic", "1", {"b": {"d": 3, "c": 2}, "a": 1})
    assert len(base) == 64 and int(base, 16) >= 0
    others = {
        cache_key("globex", "arithmetic", "1", {"a": 1, "b": {"c": 2, "d": 3}}),
        cache_key("acme", "echo", "1", {"a": 1, "b": {"c": 2, "d": 3}}),
        cache_key("acme", "arithmetic", "2", {"a": 1, "b": {"c": 2, "d": 3}}),
        cache_key("acme", "arithmetic", "1", {"a": 1, "b": {"c": 2, "d": 4}}),
    }
    assert base not in others and len(others) == 4
    assert cache_tags("echo", "acme") == ["tool:echo", "tenant:acme"]
