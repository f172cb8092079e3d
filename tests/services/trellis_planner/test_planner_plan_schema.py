"""Which format a model gets, and what the API holds it to: the plan schema, the functions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.services.trellis_planner.conftest import make_tools
from trellis.common.v1 import common_pb2
from trellis.runtime.convert import to_struct
from trellis_planner.formats import FormatChooser, PlanFormat
from trellis_planner.plan_schema import (
    FunctionNames,
    plan_schema,
    response_format,
    restore_optional,
    strict_args,
    tool_definitions,
)
from trellis_planner.settings import PlannerSettings

JSONL, JSON, TOOLS = PlanFormat.JSONL, PlanFormat.JSON_SCHEMA, PlanFormat.TOOL_CALLS


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("trellis-offline-rules-v1", JSONL),
        ("gpt-4o-mini", TOOLS),
        ("o3-mini", TOOLS),
        ("Qwen/Qwen2.5-7B-Instruct", JSON),
        ("llama3.1:8b", JSON),
        ("my-azure-deployment", TOOLS),  # unknown: tool calls
    ],
)
def test_auto_picks_by_model_name(model: str, expected: PlanFormat) -> None:
    assert FormatChooser().choose(model) is expected


def test_the_operator_table_wins_exact_names_before_patterns() -> None:
    chooser = FormatChooser("auto", {"gpt-*": JSONL, "gpt-4o": JSON, "my-*": JSON})
    assert chooser.choose("gpt-4o") is JSON and chooser.choose("gpt-4.1") is JSONL
    assert chooser.choose("my-deployment") is JSON
    assert FormatChooser("json_schema").choose("gpt-4o") is JSON  # a fixed format


def test_a_run_keeps_the_format_it_started_with() -> None:
    chooser = FormatChooser("jsonl")
    assert chooser.choose("gpt-4o", common_pb2.PLAN_FORMAT_TOOL_CALLS) is TOOLS
    assert chooser.choose("gpt-4o", common_pb2.PLAN_FORMAT_UNSPECIFIED) is JSONL


def test_settings_read_the_format_and_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_PLAN_FORMAT", "tool_calls")
    monkeypatch.setenv("TRELLIS_MODEL_PLAN_FORMATS", '{"llama*": "json_schema"}')
    settings = PlannerSettings()
    assert settings.plan_format == "tool_calls"
    assert settings.model_plan_formats == {"llama*": JSON}
    monkeypatch.setenv("TRELLIS_MODEL_PLAN_FORMATS", '{"llama*": "yaml"}')
    with pytest.raises(ValueError, match="jsonl"):
        PlannerSettings()


def objects(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object schema inside ``schema``."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            yield schema
        for value in schema.values():
            yield from objects(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from objects(value)


def test_the_plan_schema_is_strict_for_the_bundled_catalog() -> None:
    schema, strict = plan_schema(make_tools())
    assert strict
    Draft202012Validator.check_schema(schema)
    for obj in objects(schema):  # what strict mode asks of every object
        assert obj["additionalProperties"] is False
        assert sorted(obj["required"]) == sorted(obj["properties"])
    branches = schema["properties"]["nodes"]["items"]["anyOf"]
    assert [b["properties"]["tool"]["enum"] for b in branches] == [
        ["run_command"],
        ["arithmetic"],
        ["sleep"],
        ["echo"],
    ]
    assert branches[0]["description"].startswith("Run one read-only system command")
    assert branches[0]["properties"]["node_id"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    plan = {
        "nodes": [
            {"node_id": "n1", "tool": "sleep", "args": {"ms": 5}, "depends_on": []},
            {"node_id": "n2", "tool": "sleep", "args": {"ms": "$n1"}, "depends_on": ["n1"]},
            {"node_id": "n3", "tool": "echo", "args": {"value": [1, "a"]}, "depends_on": []},
        ]
    }
    assert list(Draft202012Validator(schema).iter_errors(plan)) == []
    bad = {"nodes": [{"node_id": "n 1", "tool": "nope", "args": {}, "depends_on": []}]}
    assert list(Draft202012Validator(schema).iter_errors(bad))


def test_optional_properties_become_nullable_and_come_back_absent() -> None:
    own = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1, "default": "."},
            "depth": {"type": "integer", "maximum": 5},
            "opts": {"type": "object", "properties": {"all": {"type": "boolean"}}},
        },
        "required": ["depth"],
    }
    strict = strict_args(own)
    assert strict is not None
    assert strict["required"] == ["path", "depth", "opts"]
    assert strict["properties"]["path"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert strict["properties"]["depth"]["anyOf"][0] == {"type": "integer"}  # no maximum
    args = {"path": None, "depth": 2, "opts": {"all": None}}
    assert list(Draft202012Validator(strict).iter_errors(args)) == []
    assert restore_optional(args, own) == {"depth": 2, "opts": {}}


def test_without_tools_the_plan_can_only_be_empty() -> None:
    schema, strict = plan_schema([])
    Draft202012Validator.check_schema(schema)
    assert not strict
    assert list(Draft202012Validator(schema).iter_errors({"nodes": []})) == []
    assert list(Draft202012Validator(schema).iter_errors({"nodes": [{}]}))


def test_a_free_form_object_sends_the_format_not_strict() -> None:
    free = common_pb2.ToolSpec(
        name="http_post",
        input_schema=to_struct(
            {"type": "object", "properties": {"body": {"type": "object"}}, "required": ["body"]}
        ),
    )
    fmt = response_format([*make_tools(), free])
    assert fmt["json_schema"]["strict"] is False
    branch = fmt["json_schema"]["schema"]["properties"]["nodes"]["items"]["anyOf"][-1]
    assert branch["properties"]["args"]["properties"]["body"] == {"type": "object"}  # as is


def test_function_names_fit_the_api_and_map_back() -> None:
    names = FunctionNames(["calc.add", "calc:add", "x" * 100, "echo"])
    assert names.function("echo") == "echo"
    assert {names.function("calc.add"), names.function("calc:add")} == {"calc_add", "calc_add_2"}
    long = names.function("x" * 100)
    assert len(long) == 64 and names.tool(long) == "x" * 100
    assert names.tool(names.function("calc:add")) == "calc:add"
    assert names.tool("unknown") == "unknown"
    definitions = tool_definitions(make_tools(), FunctionNames(t.name for t in make_tools()))
    assert definitions[1]["function"]["name"] == "arithmetic"
    assert definitions[1]["function"]["parameters"]["required"] == ["expression"]
