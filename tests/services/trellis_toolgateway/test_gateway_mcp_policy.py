"""MCP tool policy from annotations and the tools file (``tools.mcp_policy``), and what the
file may say about an MCP server (``McpServer``): hints mapped to side effects, caching,
retries and whether a lost call may be sent again; per-tool overrides; include/exclude;
``${VAR}`` references, headers and transports checked at load."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp.types import ToolAnnotations
from pydantic import ValidationError

from trellis_toolgateway.loader import LoadOptions, ToolsFileError, check_tools_file
from trellis_toolgateway.tools.config import McpServer
from trellis_toolgateway.tools.mcp_policy import Hints, policy_of, served


def server(**fields: object) -> McpServer:
    return McpServer.model_validate({"name": "s", "command": ["srv"], **fields})


def hints(**kwargs: bool) -> ToolAnnotations:
    return ToolAnnotations(**{f"{k}_hint": v for k, v in kwargs.items()})


POLICY = {"cache_ttl": 30, "retries": 2, "timeout": 5}


@pytest.mark.parametrize(
    ("annotations", "side_effects", "cache_ttl", "retries", "safe"),
    [
        # read-only: cacheable for the entry's TTL, retried, safe to send again
        (hints(read_only=True), False, 30, 2, True),
        (hints(read_only=True, destructive=True), False, 30, 2, True),  # destructive is moot
        # destructive: side effects, never cached or retried; idempotent makes it repeatable
        (hints(read_only=False, destructive=True, idempotent=True), True, 0, 0, True),
        (hints(destructive=True), True, 0, 0, False),
        # not idempotent: side effects even when it destroys nothing
        (hints(destructive=False, idempotent=False), True, 0, 0, False),
        (hints(destructive=False), True, 0, 0, False),
        # idempotent and not destructive: no side effects, but a write is never cached
        (hints(destructive=False, idempotent=True), False, 0, 2, True),
        # not read-only and nothing else said: the spec's defaults (destructive, not idempotent)
        (hints(read_only=False), True, 0, 0, False),
        # no hints at all: the entry decides (side-effect free by default), not repeatable
        (None, False, 30, 2, False),
        (ToolAnnotations(title="Only a title"), False, 30, 2, False),
    ],
)
def test_annotations_map_to_policy(
    annotations: ToolAnnotations | None,
    side_effects: bool,
    cache_ttl: float,
    retries: int,
    safe: bool,
) -> None:
    policy, repeatable = policy_of(server(**POLICY), "t", annotations)
    assert (policy["side_effects"], policy["cache_ttl"], policy["retries"]) == (
        side_effects,
        cache_ttl,
        retries,
    )
    assert repeatable is safe
    assert policy["timeout"] == 5 and "description" not in policy


def test_a_side_effecting_entry_makes_even_read_only_tools_side_effecting() -> None:
    policy, safe = policy_of(server(side_effects=True, **POLICY), "t", hints(read_only=True))
    assert (policy["side_effects"], policy["cache_ttl"], policy["retries"]) == (True, 0, 0)
    assert safe  # sending a read-only call twice still does no harm
    # an explicit "false" on the entry does not override what a tool says of itself
    policy, _ = policy_of(server(side_effects=False), "t", hints(destructive=True))
    assert policy["side_effects"] is True


def test_per_tool_overrides_have_the_last_word() -> None:
    entry = server(
        **POLICY,
        tools={
            # the server calls it destructive; the file knows it only reads
            "lookup": {"read_only": True, "cache_ttl": 300, "description": "Look up."},
            # the server says nothing; the file says it is idempotent
            "sync": {"idempotent": True, "destructive": False},
            # a read-only tool the file wants never cached and run once per key
            "export": {"side_effects": True, "retries": 1},
        },
    )
    lookup, safe = policy_of(entry, "lookup", hints(destructive=True))
    assert (lookup["side_effects"], lookup["cache_ttl"], safe) == (False, 300, True)
    assert lookup["description"] == "Look up."
    sync, safe = policy_of(entry, "sync", None)
    assert (sync["side_effects"], sync["cache_ttl"], sync["retries"], safe) == (False, 0, 2, True)
    export, _ = policy_of(entry, "export", hints(read_only=True))
    # the explicit override wins, even over "side effects are never retried"
    assert (export["side_effects"], export["cache_ttl"], export["retries"]) == (True, 0, 1)


def test_hints_replaced_by_the_file_are_the_only_ones_changed() -> None:
    merged = Hints.of(
        hints(read_only=False, destructive=True, idempotent=True),
        server(tools={"t": {"destructive": False}}).tools["t"],
    )
    assert merged == Hints(read_only=False, destructive=False, idempotent=True)
    assert not merged.side_effects and merged.safe_to_repeat


def test_include_and_exclude_choose_the_tools_served() -> None:
    entry = server(include=["git_*", "read_resource"], exclude=["git_reset", "*_unstaged"])
    names = ["git_status", "git_reset", "git_diff_unstaged", "git_log", "other", "read_resource"]
    assert [n for n in names if served(entry, n)] == ["git_status", "git_log", "read_resource"]
    assert all(served(server(), n) for n in names)  # no include: everything
    assert [n for n in names if served(server(exclude=["git_*"]), n)] == [
        "other",
        "read_resource",
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"headers": {"A": "b"}}, "headers are for url servers"),
        ({"transport": "sse"}, "transport is for url servers"),
        ({"env": {"K": "${NOT CLOSED"}}, "env 'K': only ${ENV_VAR} references are allowed"),
        ({"tools": {"t": {"input_schema": {"type": "object"}}}}, "contract is its server's"),
        ({"include": [" "]}, "a pattern cannot be empty"),
        ({"tools": {"t": {"colour": "red"}}}, "Extra inputs are not permitted"),
    ],
)
def test_stdio_entries_refuse_what_does_not_apply(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("$", r"\$").replace("(", r"\(")):
        server(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"env": {"K": "v"}}, "env is for stdio servers"),
        ({"url": "ftp://x/"}, "url must be an absolute http"),
        ({"headers": {"Authorization": "Bearer {token}"}}, "only ${ENV_VAR} references"),
        ({"transport": "websocket"}, "Input should be 'streamable_http' or 'sse'"),
    ],
)
def test_url_entries_refuse_what_does_not_apply(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("$", r"\$")):
        McpServer.model_validate({"name": "s", "url": "http://127.0.0.1:1/mcp", **fields})


def test_env_values_may_hold_braces_and_dollars_that_are_not_references() -> None:
    entry = server(env={"JSON": '{"a": 1}', "PRICE": "$5", "TOKEN": "${TOKEN}"})
    assert entry.env["JSON"] == '{"a": 1}'


def test_a_missing_secret_is_a_file_error_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text(
        "mcp_servers:\n"
        "  - {name: remote, url: 'http://127.0.0.1:1/mcp',"
        " headers: {Authorization: 'Bearer ${TRELLIS_TEST_MISSING_TOKEN}'}}\n"
        "  - {name: local, command: [srv], env: {KEY: '${TRELLIS_TEST_MISSING_KEY}'}}\n"
    )
    with pytest.raises(ToolsFileError) as raised:
        check_tools_file(path, LoadOptions(environ={}))
    assert raised.value.problems == [
        "mcp_servers[0].headers.Authorization: environment variable"
        " TRELLIS_TEST_MISSING_TOKEN is not set",
        "mcp_servers[1].env.KEY: environment variable TRELLIS_TEST_MISSING_KEY is not set",
    ]
    environ = {"TRELLIS_TEST_MISSING_TOKEN": "t0ken-value", "TRELLIS_TEST_MISSING_KEY": "k"}
    check_tools_file(path, LoadOptions(environ=environ))  # set: the file is good
