"""Planning by rules: goal + tool catalog -> tool calls, no model weights involved.

The rules read the catalog the way an LLM would read it, but literally. Four tools of
the bundled catalog have rules of their own (when their schema is the one the rule
fills):

- ``run_command``: its description lists allowed commands, one per line, as
  ``- `df -h`: disk usage, disk space, storage``. A command is planned when one of its
  keywords (or the command itself) appears in the goal as a whole word or phrase,
  case-insensitively; commands come in description order, each once. A command with a
  ``{placeholder}`` takes a path from the goal, and is left out when there is none.
- ``arithmetic``: one call per arithmetic expression in the goal ("(17*23)+4"), in any
  language around it.
- ``sleep``: "sleep 200 ms" / "sleep 2 s".
- ``echo``: ``echo "hello"``; ``echo the result`` (or ``echo it``) echoes the output of the
  call planned just before it, the one chained dependency the rules know.

Every other tool (builtin, command, HTTP, MCP, gRPC alike) is planned when the goal's
words match its name and description, with arguments from the goal (``matching.py``).

Commands come first, then the other calls in the order the goal mentions them, then the
matched tools in catalog order. Calls are independent unless chained. A goal no rule
matches gets an empty plan.

A repair round (the planner rejected some lines and lists the nodes it accepted) gets
``remaining``: the goal's plan minus the nodes already accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from trellis_offline_model import matching

RUN_COMMAND = "run_command"
ARITHMETIC = "arithmetic"
SLEEP = "sleep"
ECHO = "echo"

_COMMAND_LINE = re.compile(r"^\s*[-*]\s*`([^`]+)`\s*:\s*(.*)$")
_EXPRESSION = re.compile(r"(?<![A-Za-z0-9_.])[(\-]*\d[\d\s.()+\-*/%]*")
_HAS_OPERATOR = re.compile(r"[\d)]\s*(?:\*\*|//|[-+*/%])\s*[-(]*\s*\d")
_SLEEP = re.compile(
    r"\bsleep(?:s|ing)?\s+(?:for\s+)?(\d+(?:\.\d+)?)\s*"
    r"(ms|msecs?|milliseconds?|s|secs?|seconds?)\b",
    re.IGNORECASE,
)
_ECHO_LITERAL = re.compile(r"\becho\s+(?:\"([^\"]*)\"|'([^']*)'|`([^`]*)`|“([^”]*)”)", re.I)
_REFERENCE = re.compile(r"\$(\{?)([A-Za-z0-9_\-]+)")
_ECHO_PREVIOUS = re.compile(r"\becho\s+(?:the\s+result|the\s+output|it|that)\b", re.I)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
#: The parameter each rule fills, so a tool of the same name and another schema is
#: matched like any tool instead.
RULE_PARAMETERS = {RUN_COMMAND: "command", ARITHMETIC: "expression", SLEEP: "ms", ECHO: "value"}

Node = dict[str, Any]


def has_rule(tool: Mapping[str, Any]) -> bool:
    """Whether ``tool`` is one the dedicated rules fill (its schema has their parameter,
    or no parameters at all)."""
    parameter = RULE_PARAMETERS.get(str(tool.get("name")))
    if parameter is None:
        return False
    properties = matching.parameters(tool.get("input_schema"))
    return not properties or parameter in properties


def _command(command: str, goal: str) -> str | None:
    """``command`` with its placeholders filled by paths from the goal (None: no path)."""
    names = _PLACEHOLDER.findall(command)
    if not names:
        return command
    paths = matching.GoalValues.of(goal).paths
    if len(paths) < len(names):
        return None
    for name, path in zip(names, paths, strict=False):
        command = command.replace(f"{{{name}}}", path, 1)
    return command


def allowed_commands(description: str) -> list[tuple[str, list[str]]]:
    """(command, keywords) for every ``- `cmd`: kw, kw`` line of a description."""
    found = []
    for line in description.splitlines():
        match = _COMMAND_LINE.match(line)
        if match:
            keywords = [k.strip() for k in match.group(2).split(",") if k.strip()]
            found.append((match.group(1).strip(), keywords))
    return found


def mentions(goal: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``goal`` as whole words, ignoring case and spacing."""
    words = phrase.split()
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return re.search(pattern, goal, re.IGNORECASE) is not None


def _trim_expression(text: str) -> str:
    expr = text.strip().rstrip("+-*/%. ").strip()
    while expr.endswith(")") and expr.count(")") > expr.count("("):
        expr = expr[:-1].rstrip()
    while expr.startswith("(") and expr.count("(") > expr.count(")"):
        expr = expr[1:].lstrip()
    return expr


def _overlaps(span: tuple[int, int], taken: Iterable[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in taken)


def _other_calls(goal: str, tools: set[str]) -> list[tuple[int, str, Any]]:
    """(position, tool, args or a chain marker) of every non-command call in the goal."""
    calls: list[tuple[int, str, Any]] = []
    taken: list[tuple[int, int]] = []
    if SLEEP in tools:
        for m in _SLEEP.finditer(goal):
            scale = 1 if m.group(2).lower().startswith("m") else 1000
            calls.append((m.start(), SLEEP, {"ms": round(float(m.group(1)) * scale)}))
            taken.append(m.span())
    if ECHO in tools:
        for m in _ECHO_LITERAL.finditer(goal):
            value = next(g for g in m.groups() if g is not None)
            calls.append((m.start(), ECHO, {"value": value}))
            taken.append(m.span())
        for m in _ECHO_PREVIOUS.finditer(goal):
            calls.append((m.start(), ECHO, None))  # None: echo the previous call's output
            taken.append(m.span())
    if ARITHMETIC in tools:
        for m in _EXPRESSION.finditer(goal):
            expr = _trim_expression(m.group(0))
            if _HAS_OPERATOR.search(expr) and not _overlaps(m.span(), taken):
                calls.append((m.start(), ARITHMETIC, {"expression": expr}))
    return sorted(calls, key=lambda call: call[0])


def plan(goal: str, catalog: Iterable[Mapping[str, Any]], *, first_id: int = 1) -> list[Node]:
    """The tool calls the rules find in ``goal`` for the tools of ``catalog``.

    Nodes are numbered ``n{first_id}``, ``n{first_id + 1}``, ... (a replan continues
    after the previous plan's ids).
    """
    tools = [t for t in catalog if t.get("name")]
    ruled = {str(t["name"]): t for t in tools if has_rule(t)}
    nodes: list[Node] = []

    def add(tool: str, args: dict[str, Any], depends_on: list[str]) -> None:
        node_id = f"n{first_id + len(nodes)}"
        nodes.append({"node_id": node_id, "tool": tool, "args": args, "depends_on": depends_on})

    if RUN_COMMAND in ruled:
        description = str(ruled[RUN_COMMAND].get("description", ""))
        for template, keywords in allowed_commands(description):
            if any(mentions(goal, k) for k in [template, *keywords]):
                command = _command(template, goal)
                if command and all(n["args"].get("command") != command for n in nodes):
                    add(RUN_COMMAND, {"command": command}, [])
    for _, tool, args in _other_calls(goal, set(ruled)):
        if args is None:
            if nodes:
                previous = nodes[-1]["node_id"]
                add(tool, {"value": f"${previous}"}, [previous])
            continue
        add(tool, args, [])
    others = [t for t in tools if not has_rule(t)]
    values = matching.GoalValues.of(goal)
    for tool in matching.matching(goal, others):
        args = matching.fill(goal, tool.get("input_schema"), values)
        if args is not None:
            add(str(tool["name"]), args, [])
    return nodes


def _renamed(value: Any, names: Mapping[str, str]) -> Any:
    """``value`` with references (``$n1``, ``${n1.x}``) to renamed nodes renamed."""
    if isinstance(value, str):
        return _REFERENCE.sub(lambda m: f"${m.group(1)}{names.get(m.group(2), m.group(2))}", value)
    if isinstance(value, Mapping):
        return {k: _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value


def remaining(
    nodes: Iterable[Node], accepted: Iterable[Mapping[str, Any]], *, first_id: int
) -> list[Node]:
    """The nodes of ``nodes`` (the goal's plan) that ``accepted`` (a repair round's
    accepted nodes) lacks.

    A node with the tool and args of an accepted node is that node: it is dropped and
    references to it point to the accepted one. The rest keep their order and are
    numbered ``n{first_id}``, ``n{first_id + 1}``, ...
    """
    done = [(a.get("tool"), a.get("args") or {}, str(a.get("node_id"))) for a in accepted]
    names: dict[str, str] = {}
    rest: list[Node] = []
    for node in nodes:
        args = _renamed(node["args"], names)
        depends_on = [names.get(d, d) for d in node["depends_on"]]
        same = next((nid for tool, a, nid in done if tool == node["tool"] and a == args), None)
        if same is not None:
            names[node["node_id"]] = same
            continue
        names[node["node_id"]] = node_id = f"n{first_id + len(rest)}"
        rest.append(
            {"node_id": node_id, "tool": node["tool"], "args": args, "depends_on": depends_on}
        )
    return rest
