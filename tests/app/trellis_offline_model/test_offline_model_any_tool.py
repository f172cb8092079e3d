"""The rules plan for any tool in the catalog: goal words against the tool's name and
description, arguments from the goal by schema type; nothing matched: the tools are
listed. Deterministic: the same goal and catalog give the same plan."""

from __future__ import annotations

import pytest

from trellis_offline_model import answering, matching, planning

READ_FILE = {
    "name": "read_file",
    "description": "Read a text file inside the sandbox directory.",
    "input_schema": {
        "type": "object",
        "properties": {"path": {"type": "string", "description": "Path relative to the root."}},
        "required": ["path"],
    },
}
LIST_DIR = {
    "name": "list_dir",
    "description": "List a directory inside the sandbox directory: each entry's name and type"
    " (file, dir).",
    "input_schema": {
        "type": "object",
        "properties": {"path": {"type": "string", "default": "."}},
    },
}
WEATHER = {  # an HTTP tool as the gateway describes it (URL placeholders: scalars)
    "name": "weather",
    "description": "Current weather of a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": ["string", "integer", "number", "boolean"]}},
        "required": ["city"],
    },
}
ADD = {  # an MCP tool, with its server's prefix
    "name": "calc.add",
    "description": "Add two integers.",
    "input_schema": {
        "type": "object",
        "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
        "required": ["a", "b"],
    },
}
FETCH = {  # a gRPC tool server's tool
    "name": "tools.fetchPage",
    "description": "Download a web page.",
    "input_schema": {
        "type": "object",
        "properties": {
            "url": {"type": "string", "format": "uri"},
            "mode": {"type": "string", "enum": ["text", "html"]},
            "max_bytes": {"type": "integer"},
        },
        "required": ["url"],
    },
}
SQL = {
    "name": "sql_query",
    "description": "Run one read-only SQL query against the configured SQLite database.",
    "input_schema": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "params": {"type": "array"}},
        "required": ["query"],
    },
}
CATALOG = [READ_FILE, LIST_DIR, WEATHER, ADD, FETCH, SQL]


def calls(goal: str) -> list[tuple[str, dict]]:
    return [(n["tool"], n["args"]) for n in planning.plan(goal, CATALOG)]


@pytest.mark.parametrize(
    ("goal", "expected"),
    [
        ("Read the file README.md in the sandbox", [("read_file", {"path": "README.md"})]),
        ("List the files in the sandbox", [("list_dir", {})]),
        ("What's the weather in Paris?", [("weather", {"city": "Paris"})]),
        ("Add 2 and 40", [("calc.add", {"a": 2, "b": 40})]),
        (
            "Download the page https://example.com/a?b=1 as html, at most 5000 bytes",
            [
                (
                    "tools.fetchPage",
                    {"url": "https://example.com/a?b=1", "mode": "html", "max_bytes": 5000},
                )
            ],
        ),
        (
            'Run the SQL query "SELECT count(*) FROM runs"',
            [("sql_query", {"query": "SELECT count(*) FROM runs"})],
        ),
    ],
)
def test_tools_are_matched_and_filled_from_the_goal(goal: str, expected) -> None:
    assert calls(goal) == expected
    assert calls(goal) == expected  # deterministic


def test_a_tool_whose_required_argument_is_missing_is_not_planned() -> None:
    assert calls("Read the file") == []
    assert calls("How is the weather?") == []  # no city in the goal


def test_unrelated_and_foreign_goals_match_nothing() -> None:
    for goal in ("Write a haiku about autumn", "Lis le fichier README.md", "ファイルを読んで"):
        assert calls(goal) == [], goal


def test_scores_weigh_the_name_above_the_description() -> None:
    assert matching.score("list the files", LIST_DIR) > matching.score("list the files", READ_FILE)
    assert matching.words("getWeatherForecasts of cities") == ["weather", "forecast", "city"]


def test_the_answer_without_outcomes_lists_the_tools() -> None:
    text = answering.answer("Lis le fichier", [], CATALOG)
    assert text.startswith("No available tool matches this goal")
    assert "rule-based model" in text
    assert "- read_file: Read a text file inside the sandbox directory." in text
    assert "- calc.add: Add two integers." in text
    assert answering.answer("x", []) == answering.NO_MATCH


def test_command_placeholders_take_a_path_from_the_goal() -> None:
    description = (
        "Run one command:\n- `df -h`: disk usage\n- `df -h {path}`: disk usage of a directory"
    )
    tool = {
        "name": "run_command",
        "description": description,
        "input_schema": {"properties": {"command": {"type": "string"}}},
    }
    nodes = planning.plan("disk usage of a directory ./docs", [tool])
    assert [n["args"]["command"] for n in nodes] == ["df -h", "df -h ./docs"]
    nodes = planning.plan("disk usage of a directory", [tool])
    assert [n["args"]["command"] for n in nodes] == ["df -h"]  # no path: left out


def test_a_tool_named_like_a_rule_but_shaped_otherwise_is_matched_like_any() -> None:
    echo = {
        "name": "echo",
        "description": "Echo the text back.",
        "input_schema": {"properties": {"text": {"type": "string"}}, "required": ["text"]},
    }
    assert planning.plan('echo "hi there"', [echo])[0]["args"] == {"text": "hi there"}


def test_arithmetic_is_found_in_any_language() -> None:
    arithmetic = {"name": "arithmetic", "description": "", "input_schema": {}}
    nodes = planning.plan("計算して2+3を", [arithmetic])
    assert [n["args"] for n in nodes] == [{"expression": "2+3"}]
