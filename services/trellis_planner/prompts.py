"""The messages the planner sends to the model, for planning and for joining.

Prose for an LLM, with a few fixed ``## `` sections that the offline rules model reads
literally (``## Tools``: one JSON object per tool; ``## Goal`` and ``## Outcomes``: one
JSON object per node), so one prompt serves both. Changing a heading here means changing
``trellis_offline_model.prompt`` too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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


def join_messages(request: planner_pb2.JoinRequest) -> list[Message]:
    rule = JOIN_MAY_REPLAN if request.allow_replan else JOIN_MUST_ANSWER
    user = JOIN_USER.format(
        goal=request.goal, outcomes=outcome_lines(request.plan, request.outcomes)
    )
    return [
        {"role": "system", "content": JOIN_SYSTEM.format(replan_rule=rule)},
        {"role": "user", "content": user},
    ]
