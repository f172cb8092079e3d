"""The messages the planner sends to the model, for planning and for joining.

Prose for an LLM, with a few fixed ``## `` sections that the offline rules model reads
literally (``## Tools``: one JSON object per tool; ``## Goal`` and ``## Outcomes``: one
JSON object per node; on a repair round ``## Accepted nodes``: one ToolCall per line), so
one prompt serves both. Changing a heading here means changing
``trellis_offline_model.prompt`` too. The few-shot examples use made-up tools and sit
before ``## Tools`` so that section holds the catalog only.

A repair round continues the planning conversation: the model's own output as the
assistant turn, then a user turn with every rejected line and why, and the nodes that
were accepted (and have already started), asking for the rest of the plan only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import from_struct, from_value

REPLAN_PREFIX = "REPLAN:"
#: Longest JSON rendering of one output in a prompt; longer ones are cut (as text).
MAX_OUTPUT_CHARS = 4000

Message = dict[str, str]

PLAN_SYSTEM = """\
You are the planner of Trellis. Turn the user's goal into a plan: a set of tool calls that \
Trellis runs as a DAG, each call starting as soon as the calls it depends on have finished.

## Plan format
Write JSON Lines: one JSON object per line, one line per tool call, and nothing else \
(no prose, no code fences). Each object has exactly these fields:
{{"node_id": "n1", "tool": "<tool name>", "args": {{...}}, "depends_on": []}}
- node_id: unique and short ("n1", "n2", ...): letters, digits, "_" or "-".
- tool: the name of one of the tools below; args: an object matching its input_schema.
- depends_on: the node_ids of earlier lines whose output this call needs. Calls with no \
dependencies run at the same time, so add a dependency only when a call needs another's output.
- A string in args may use an earlier call's output: "$n1" is the whole output of n1, \
"${{n1.field.sub}}" one field of it (inside a longer string it is inserted as text). \
List every node you reference in depends_on.
- At most {max_nodes} lines. If no tool helps with the goal, write nothing.

## Examples
These examples use made-up tools; plan only with the tools listed in the Tools section.

Goal: Compare today's weather in Paris and in Oslo.
{{"node_id": "n1", "tool": "get_weather", "args": {{"city": "Paris"}}, "depends_on": []}}
{{"node_id": "n2", "tool": "get_weather", "args": {{"city": "Oslo"}}, "depends_on": []}}

Goal: How many people live in the largest city of Norway, times two?
{{"node_id": "n1", "tool": "search", "args": {{"query": "largest city, Norway"}}, "depends_on": []}}
{{"node_id": "n2", "tool": "population", "args": {{"city": "${{n1.city}}"}}, "depends_on": ["n1"]}}
{{"node_id": "n3", "tool": "calculate", "args": {{"expression": "${{n2.count}} * 2"}}, \
"depends_on": ["n2"]}}

Goal: Write a haiku about autumn.
(no tool helps: the plan is empty, write nothing)

## Tools
One JSON object per line: name, description, input_schema.
{tools}
"""

REPLAN_CONTEXT = """\
## Previous plan
{plan}

## Previous outcomes
{outcomes}

## Why a new plan is needed
{reason}

Write a new plan for what the goal still needs. Use node_ids not used above.\
"""

REPAIR_REQUEST = """\
## Rejected lines
Your plan was not valid. These lines were rejected:
{errors}

## Accepted nodes
These nodes were accepted and have already started; they stay in the plan as they are:
{accepted}

Write only the rest of the plan: a corrected line for each rejected line that is still \
needed, then any lines that should follow. Same format: JSON Lines, one tool call per line, \
nothing else. Do not write the accepted nodes again; a new line must not reuse their \
node_ids (a corrected line may keep its own), and may depend on them. At most {remaining} \
more lines.\
"""
#: Longest part of the model's invalid output echoed back in a repair round.
MAX_REPAIR_ECHO_CHARS = 8000
#: Longest rejected line quoted in a repair round.
MAX_QUOTED_LINE_CHARS = 500

JOIN_SYSTEM = """\
You are the joiner of Trellis. The tool calls planned for the user's goal have run. Write \
the final answer to the goal from their outcomes: concise, factual, using only what the \
outcomes say, and mentioning calls that failed or were skipped.
{replan_rule}"""

JOIN_MAY_REPLAN = f"""\
If the outcomes cannot answer the goal and a different plan could, reply with one line \
instead: "{REPLAN_PREFIX} <what is missing>"."""

JOIN_MUST_ANSWER = "This is the last round: answer with what you have; do not ask for a new plan."

JOIN_USER = """\
## Goal
{goal}

## Outcomes
One JSON object per line: node_id, tool, args, status, then output or error.
{outcomes}
"""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=False)


def tool_line(spec: common_pb2.ToolSpec) -> str:
    return _json(
        {
            "name": spec.name,
            "description": spec.description,
            "input_schema": from_struct(spec.input_schema),
            **batch_hint(spec),
        }
    )


def call_line(call: common_pb2.ToolCall) -> str:
    return _json(
        {
            "node_id": call.node_id,
            "tool": call.tool,
            "args": from_struct(call.args),
            "depends_on": list(call.depends_on),
        }
    )


def _output(value: Any) -> Any:
    text = _json(value)
    if len(text) <= MAX_OUTPUT_CHARS:
        return value
    return text[:MAX_OUTPUT_CHARS] + "...[truncated]"


def outcome_line(outcome: common_pb2.NodeOutcome, call: common_pb2.ToolCall | None) -> str:
    """One node's outcome, with its tool and args so the model needs no cross-reference."""
    status = common_pb2.NodeStatus.Name(outcome.status).removeprefix("NODE_STATUS_")
    line: dict[str, Any] = {
        "node_id": outcome.node_id,
        "tool": call.tool if call else "",
        "args": from_struct(call.args) if call else {},
        "status": status,
    }
    if outcome.HasField("output"):
        line["output"] = _output(from_value(outcome.output))
    if outcome.error.code or outcome.error.message:
        line["error"] = {"code": outcome.error.code, "message": outcome.error.message}
    return _json(line)


def outcome_lines(
    calls: Iterable[common_pb2.ToolCall], outcomes: Iterable[common_pb2.NodeOutcome]
) -> str:
    by_id = {call.node_id: call for call in calls}
    return "\n".join(outcome_line(o, by_id.get(o.node_id)) for o in outcomes)


def plan_messages(request: planner_pb2.PlanRequest, max_nodes: int) -> list[Message]:
    """System: role, format, reference rules, catalog. User: the goal (and replan context)."""
    tools = "\n".join(tool_line(spec) for spec in request.tools)
    messages = [
        {"role": "system", "content": PLAN_SYSTEM.format(max_nodes=max_nodes, tools=tools)},
        {"role": "user", "content": request.goal},
    ]
    if request.round > 0 and (request.previous_plan or request.replan_reason):
        context = REPLAN_CONTEXT.format(
            plan="\n".join(call_line(c) for c in request.previous_plan) or "(none)",
            outcomes=outcome_lines(request.previous_plan, request.previous_outcomes) or "(none)",
            reason=request.replan_reason or "(not given)",
        )
        messages.append({"role": "user", "content": context})
    return messages


@dataclass(frozen=True)
class RejectedLine:
    """A line of the model's plan that was rejected, and every reason why."""

    line: int
    text: str
    problems: list[str]


def _quote(text: str) -> str:
    if len(text) <= MAX_QUOTED_LINE_CHARS:
        return text
    return text[:MAX_QUOTED_LINE_CHARS] + "...[truncated]"


def rejected_lines(rejected: Iterable[RejectedLine]) -> str:
    """``line 3: <the line>`` then one ``  - problem`` per reason."""
    parts = []
    for item in rejected:
        parts.append(f"line {item.line}: {_quote(item.text)}")
        parts.extend(f"  - {problem}" for problem in item.problems)
    return "\n".join(parts)


def repair_messages(
    plan: Sequence[Message],
    output: str,
    rejected: Iterable[RejectedLine],
    accepted: Iterable[common_pb2.ToolCall],
    remaining: int,
) -> list[Message]:
    """The planning conversation, the model's invalid ``output``, then the repair request."""
    echo = output
    if len(echo) > MAX_REPAIR_ECHO_CHARS:
        echo = echo[:MAX_REPAIR_ECHO_CHARS] + "\n...[truncated]"
    request = REPAIR_REQUEST.format(
        errors=rejected_lines(rejected),
        accepted="\n".join(call_line(call) for call in accepted) or "(none)",
        remaining=remaining,
    )
    return [
        *plan,
        {"role": "assistant", "content": echo},
        {"role": "user", "content": request},
    ]


def join_messages(request: planner_pb2.JoinRequest) -> list[Message]:
    rule = JOIN_MAY_REPLAN if request.allow_replan else JOIN_MUST_ANSWER
    user = JOIN_USER.format(
        goal=request.goal, outcomes=outcome_lines(request.plan, request.outcomes)
    )
    return [
        {"role": "system", "content": JOIN_SYSTEM.format(replan_rule=rule)},
        {"role": "user", "content": user},
    ]


# -- batchable tools ----------------------------------------------------------------------
# A tool the gateway batches (ToolSpec.batch_max_items) is marked in its catalog line, so a
# model emits one independent call per item for it (ten summaries: ten nodes), which run
# together as one request, rather than folding the items into one call or chaining them.

BATCH_HINT = (
    "up to {n} calls of this tool run together as one request: write one independent call per item"
)


def batch_hint(spec: common_pb2.ToolSpec) -> dict[str, str]:
    """``{"batch": ...}`` for a batchable tool's catalog line, else nothing."""
    if spec.batch_max_items <= 1:
        return {}
    return {"batch": BATCH_HINT.format(n=spec.batch_max_items)}
