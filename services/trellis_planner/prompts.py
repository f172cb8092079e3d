"""The messages the planner sends to the model: every plan format, plan, repair and join.

One home for all of them, so the conversation a model sees is written in one place:

- ``jsonl``: the system prompt asks for JSON Lines (one node per line) and lists the
  catalog; the goal is the user message; a replan adds the previous round as context.
- ``json_schema``: the same prompt asking for one object ``{"nodes": [...]}``; the
  request's ``response_format`` (``plan_schema.py``) holds the model to it.
- ``tool_calls``: a conversation. The system prompt explains rounds; the goal is the
  user message; each earlier round is an assistant message with its tool calls (ids are
  the node ids) followed by one ``tool`` message per call with its outcome as JSON. The
  join is the same conversation: the model answers, or calls more tools.
- A repair round continues the conversation it repairs: the model's own output, then
  what was rejected and why, and what was accepted (and has already started).
- The join (``jsonl``/``json_schema``): the goal, then each node's outcome as one JSON
  object per line; when no tool ran, the catalog (name and description) so the answer
  can say what is available.
- A turn of a session (every format, plan and join alike): the system message ends with
  the conversation so far, one JSON object per line (``trellis.contract.session_context``:
  the summary of older turns, then each earlier turn's goal, answer and compact tool
  results), so a follow-up ("and multiply that by 3") can be understood.
- A fold (Summarize): the system asks for a summary; the user message holds the
  previous summary and the turns to fold, as the same JSON lines.

The prose and its ``## `` headings are for models only: the offline rules model reads
the request's ``tools`` / ``response_format`` and the JSON objects in these messages
(tool specs, tool calls, outcomes), never a heading.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.contract.session_context import context_lines, summary_line, turn_line
from trellis.planner.v1 import planner_pb2
from trellis.runtime.convert import from_struct, from_value
from trellis_planner.formats import PlanFormat
from trellis_planner.plan_schema import batch_hint

REPLAN_PREFIX = "REPLAN:"
#: Longest JSON rendering of one output in a prompt; longer ones are cut (as text).
MAX_OUTPUT_CHARS = 4000
#: Longest part of the model's invalid output echoed back in a repair round.
MAX_REPAIR_ECHO_CHARS = 8000
#: Longest rejected line quoted in a repair round.
MAX_QUOTED_LINE_CHARS = 500

Message = dict[str, Any]

PLAN_SYSTEM = """\
You are the planner of Trellis. Turn the user's goal into a plan: a set of tool calls that \
Trellis runs as a DAG, each call starting as soon as the calls it depends on have finished.

## Plan format
{format_rule}
{{"node_id": "n1", "tool": "<tool name>", "args": {{...}}, "depends_on": []}}
- node_id: unique and short ("n1", "n2", ...): letters, digits, "_" or "-".
- tool: the name of one of the tools below; args: an object matching its input_schema.
- depends_on: the node_ids of earlier nodes whose output this call needs. Calls with no \
dependencies run at the same time, so add a dependency only when a call needs another's output.
- A string in args may use an earlier call's output: "$n1" is the whole output of n1, \
"${{n1.field.sub}}" one field of it (inside a longer string it is inserted as text). \
List every node you reference in depends_on.
- At most {max_nodes} {unit}s. If no tool helps with the goal, {empty_rule}.

## Examples
These examples use made-up tools; plan only with the tools listed in the Tools section.

{examples}

## Tools
One JSON object per line: name, description, input_schema.
{tools}
"""

JSONL_RULE = """\
Write JSON Lines: one JSON object per line, one line per tool call, and nothing else \
(no prose, no code fences). Each object has exactly these fields:"""
JSONL_EMPTY = "write nothing"
JSONL_EXAMPLES = """\
Goal: Compare today's weather in Paris and in Oslo.
{"node_id": "n1", "tool": "get_weather", "args": {"city": "Paris"}, "depends_on": []}
{"node_id": "n2", "tool": "get_weather", "args": {"city": "Oslo"}, "depends_on": []}

Goal: How many people live in the largest city of Norway, times two?
{"node_id": "n1", "tool": "search", "args": {"query": "largest city, Norway"}, "depends_on": []}
{"node_id": "n2", "tool": "population", "args": {"city": "${n1.city}"}, "depends_on": ["n1"]}
{"node_id": "n3", "tool": "calculate", "args": {"expression": "${n2.count} * 2"}, \
"depends_on": ["n2"]}

Goal: Write a haiku about autumn.
(no tool helps: the plan is empty, write nothing)"""

JSON_RULE = """\
Write one JSON object {{"nodes": [...]}} and nothing else: the nodes in the order they \
may start, each an object with exactly these fields:"""
JSON_EMPTY = 'write {"nodes": []}'
JSON_EXAMPLES = """\
Goal: How many people live in the largest city of Norway, times two?
{"nodes": [
{"node_id": "n1", "tool": "search", "args": {"query": "largest city, Norway"}, "depends_on": []},
{"node_id": "n2", "tool": "population", "args": {"city": "${n1.city}"}, "depends_on": ["n1"]},
{"node_id": "n3", "tool": "calculate", "args": {"expression": "${n2.count} * 2"}, \
"depends_on": ["n2"]}
]}

Goal: Write a haiku about autumn.
{"nodes": []}"""

TOOLS_SYSTEM = """\
You are the planner of Trellis. Reach the user's goal with the tools (functions) you have.

- In each reply, call every tool you need that does not need the result of another call: \
Trellis runs all the calls of one reply at the same time, each as soon as its arguments \
are written. A call that needs a result waits for your next reply; the results come back \
as tool messages (JSON: status, then output or error).
- At most {max_nodes} calls in one reply.
- When the results answer the goal, reply with the final answer as text: concise, factual, \
using only what the results say, and mentioning calls that failed or were skipped. If no \
tool helps with the goal, answer it directly.\
"""
TOOLS_LAST_ROUND = "This is the last round: answer with what you have; call no more tools."

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
## Rejected {kind}s
Your plan was not valid. These {kind}s were rejected:
{errors}

## Accepted nodes
These nodes were accepted and have already started; they stay in the plan as they are:
{accepted}

Write only the rest of the plan: a corrected {kind} for each rejected {kind} that is still \
needed, then any that should follow. {format_rule} Do not write the accepted nodes again; \
a new node must not reuse their node_ids (a corrected one may keep its own), and may \
depend on them. At most {remaining} more {kind}s.\
"""
REPAIR_FORMAT = {
    PlanFormat.JSONL: "Same format: JSON Lines, one tool call per line, nothing else.",
    PlanFormat.JSON_SCHEMA: 'Same format: one JSON object {"nodes": [...]}, nothing else.',
}

TOOLS_REPAIR = """\
Some of your tool calls were rejected: each tool message above says why. Call again, \
corrected, the ones that are still needed; the accepted ones are running, do not call them \
again. At most {remaining} more calls.\
"""
TOOLS_AS_TEXT = """\
Your reply wrote tool calls as text, which Trellis cannot run. Call the tools through \
function calling. If your reply was meant as the answer, write it again as plain text.\
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

JOIN_OUTCOMES = """\
## Outcomes
One JSON object per line: node_id, tool, args, status, then output or error.
{outcomes}
"""
JOIN_NO_TOOLS = """\
## Outcomes
No tool was called. The tools that were available (one JSON object per line: name, \
description):
{tools}
"""

SESSION_CONTEXT = """

## Conversation so far
This goal continues a conversation with the user. Its earlier turns, oldest first, one \
JSON object per line (first a summary of the oldest turns, when there is one). Use them to \
understand what the goal refers to ("that", "it", "the same for ..."); do not redo their work \
unless the goal asks for it.
{lines}"""

SUMMARY_SYSTEM = """\
You are the memory of Trellis. Fold the earlier turns of a conversation into one summary \
that a planner can rely on later: the user's goals, the answers and the facts and figures \
they found, the names, paths and values a follow-up could refer to. Oldest first, plain \
text, no preamble, at most {max_words} words. The user message holds the previous summary \
(if any) and the turns to fold, one JSON object per line.\
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


def _status(outcome: common_pb2.NodeOutcome) -> dict[str, Any]:
    """What a node's outcome says: status, then output or error."""
    status = common_pb2.NodeStatus.Name(outcome.status).removeprefix("NODE_STATUS_")
    out: dict[str, Any] = {"status": status}
    if outcome.HasField("output"):
        out["output"] = _output(from_value(outcome.output))
    if outcome.error.code or outcome.error.message:
        out["error"] = {"code": outcome.error.code, "message": outcome.error.message}
    return out


def outcome_line(outcome: common_pb2.NodeOutcome, call: common_pb2.ToolCall | None) -> str:
    """One node's outcome, with its tool and args so the model needs no cross-reference."""
    line: dict[str, Any] = {
        "node_id": outcome.node_id,
        "tool": call.tool if call else "",
        "args": from_struct(call.args) if call else {},
    }
    return _json({**line, **_status(outcome)})


def outcome_lines(
    calls: Iterable[common_pb2.ToolCall], outcomes: Iterable[common_pb2.NodeOutcome]
) -> str:
    by_id = {call.node_id: call for call in calls}
    return "\n".join(outcome_line(o, by_id.get(o.node_id)) for o in outcomes)


def plan_system(fmt: PlanFormat, tools: Iterable[common_pb2.ToolSpec], max_nodes: int) -> str:
    """The planning system prompt of ``jsonl`` or ``json_schema``."""
    jsonl = fmt is PlanFormat.JSONL
    return PLAN_SYSTEM.format(
        format_rule=JSONL_RULE if jsonl else JSON_RULE.format(),
        empty_rule=JSONL_EMPTY if jsonl else JSON_EMPTY,
        examples=JSONL_EXAMPLES if jsonl else JSON_EXAMPLES,
        max_nodes=max_nodes,
        unit="line" if jsonl else "node",
        tools="\n".join(tool_line(spec) for spec in tools),
    )


def plan_messages(
    request: planner_pb2.PlanRequest,
    max_nodes: int,
    fmt: PlanFormat = PlanFormat.JSONL,
    function_of: Any = None,
) -> list[Message]:
    """The messages of a plan call in ``fmt`` (``function_of``: as in ``conversation``)."""
    if fmt is PlanFormat.TOOL_CALLS:
        rounds = _rounds(request.previous_plan, request.round_starts)
        outcomes = {o.node_id: o for o in request.previous_outcomes}
        return with_session(
            conversation(
                request.goal,
                rounds,
                outcomes,
                max_nodes,
                last_round=False,
                function_of=function_of,
            ),
            _session(request),
        )
    messages = [
        {"role": "system", "content": plan_system(fmt, request.tools, max_nodes)},
        {"role": "user", "content": request.goal},
    ]
    if request.round > 0 and (request.previous_plan or request.replan_reason):
        context = REPLAN_CONTEXT.format(
            plan="\n".join(call_line(c) for c in request.previous_plan) or "(none)",
            outcomes=outcome_lines(request.previous_plan, request.previous_outcomes) or "(none)",
            reason=request.replan_reason or "(not given)",
        )
        messages.append({"role": "user", "content": context})
    return with_session(messages, _session(request))


def _session(
    request: planner_pb2.PlanRequest | planner_pb2.JoinRequest,
) -> planner_pb2.SessionContext | None:
    return request.session if request.HasField("session") else None


@dataclass(frozen=True)
class RejectedLine:
    """A line (or node) of the model's plan that was rejected, and every reason why."""

    line: int
    text: str
    problems: list[str]


def _quote(text: str) -> str:
    if len(text) <= MAX_QUOTED_LINE_CHARS:
        return text
    return text[:MAX_QUOTED_LINE_CHARS] + "...[truncated]"


def rejected_lines(rejected: Iterable[RejectedLine], kind: str = "line") -> str:
    """``line 3: <the line>`` then one ``  - problem`` per reason."""
    parts = []
    for item in rejected:
        parts.append(f"{kind} {item.line}: {_quote(item.text)}")
        parts.extend(f"  - {problem}" for problem in item.problems)
    return "\n".join(parts)


def repair_messages(
    plan: Sequence[Message],
    output: str,
    rejected: Iterable[RejectedLine],
    accepted: Iterable[common_pb2.ToolCall],
    remaining: int,
    fmt: PlanFormat = PlanFormat.JSONL,
) -> list[Message]:
    """The planning conversation, the model's invalid ``output``, then the repair request
    (``jsonl`` and ``json_schema``; tool calls: ``tool_repair_messages``)."""
    echo = output
    if len(echo) > MAX_REPAIR_ECHO_CHARS:
        echo = echo[:MAX_REPAIR_ECHO_CHARS] + "\n...[truncated]"
    kind = "line" if fmt is PlanFormat.JSONL else "node"
    request = REPAIR_REQUEST.format(
        kind=kind,
        errors=rejected_lines(rejected, kind),
        accepted="\n".join(call_line(call) for call in accepted) or "(none)",
        format_rule=REPAIR_FORMAT[fmt],
        remaining=remaining,
    )
    return [
        *plan,
        {"role": "assistant", "content": echo},
        {"role": "user", "content": request},
    ]


# -- tool_calls: the conversation ---------------------------------------------------


def _rounds(
    calls: Sequence[common_pb2.ToolCall], round_starts: Sequence[int]
) -> list[list[common_pb2.ToolCall]]:
    """``calls`` cut into their rounds (``round_starts``: index of rounds 1, 2, ...)."""
    bounds = [0, *(s for s in round_starts if 0 < s <= len(calls)), len(calls)]
    rounds = [list(calls[a:b]) for a, b in itertools.pairwise(bounds)]
    return [r for r in rounds if r]


def tool_call(call_id: str, function: str, args: Mapping[str, Any] | str) -> dict[str, Any]:
    """One entry of an assistant message's ``tool_calls``."""
    arguments = args if isinstance(args, str) else _json(dict(args))
    function_call = {"name": function, "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function_call}


def tool_result(call_id: str, content: Mapping[str, Any]) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "content": _json(dict(content))}


def conversation(
    goal: str,
    rounds: Sequence[Sequence[common_pb2.ToolCall]],
    outcomes: Mapping[str, common_pb2.NodeOutcome],
    max_nodes: int,
    *,
    last_round: bool,
    function_of: Any = None,
) -> list[Message]:
    """System, goal, then each round's calls (ids: node ids) and their outcomes.

    ``function_of`` maps a tool name to its function name (``plan_schema.FunctionNames``).
    """
    name = function_of or (lambda tool: tool)
    system = TOOLS_SYSTEM.format(max_nodes=max_nodes)
    if last_round:
        system += "\n" + TOOLS_LAST_ROUND
    messages: list[Message] = [
        {"role": "system", "content": system},
        {"role": "user", "content": goal},
    ]
    for calls in rounds:
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    tool_call(c.node_id, name(c.tool), from_struct(c.args)) for c in calls
                ],
            }
        )
        for c in calls:
            outcome = outcomes.get(c.node_id)
            content = _status(outcome) if outcome is not None else {"status": "UNKNOWN"}
            messages.append(tool_result(c.node_id, content))
    return messages


@dataclass(frozen=True)
class RepairCall:
    """One tool call of the reply being repaired, as the model wrote it."""

    call_id: str
    function: str
    arguments: str
    #: Empty: accepted (it runs as ``node_id``); else why it was rejected.
    problems: list[str]
    node_id: str = ""


def tool_repair_messages(
    messages: Sequence[Message],
    text: str,
    calls: Sequence[RepairCall],
    remaining: int,
) -> list[Message]:
    """The conversation, the reply being repaired (its text and calls), one tool message
    per call (ACCEPTED or REJECTED with why), then the request to call the rest again."""
    reply: Message = {"role": "assistant", "content": text or None}
    if calls:
        reply["tool_calls"] = [tool_call(c.call_id, c.function, c.arguments) for c in calls]
    out = [*messages, reply]
    for c in calls:
        if c.problems:
            content = {"status": "REJECTED", "problems": c.problems}
        else:
            content = {"status": "ACCEPTED", "node_id": c.node_id, "note": "running"}
        out.append(tool_result(c.call_id, content))
    request = TOOLS_REPAIR.format(remaining=remaining) if calls else TOOLS_AS_TEXT
    out.append({"role": "user", "content": request})
    return out


# -- sessions -------------------------------------------------------------------------


def with_session(
    messages: list[Message], session: planner_pb2.SessionContext | None
) -> list[Message]:
    """``messages`` with the session's conversation so far at the end of the system
    message (unchanged when the run is no turn of a session, or its first)."""
    if session is None or not (session.turns or session.summary):
        return messages
    section = SESSION_CONTEXT.format(lines="\n".join(context_lines(session)))
    first = dict(messages[0])
    first["content"] = (first.get("content") or "") + section
    return [first, *messages[1:]]


def summary_messages(
    session: planner_pb2.SessionContext, fold: int, max_words: int
) -> list[Message]:
    """Ask for a summary of the previous summary and the ``fold`` oldest turns."""
    lines = []
    if session.summary:
        lines.append(summary_line(session.summary, session.summary_through_turn))
    lines.extend(turn_line(turn) for turn in session.turns[:fold])
    return [
        {"role": "system", "content": SUMMARY_SYSTEM.format(max_words=max_words)},
        {"role": "user", "content": "\n".join(lines)},
    ]


# -- the join -------------------------------------------------------------------------


def join_messages(request: planner_pb2.JoinRequest) -> list[Message]:
    """System (answer, or REPLAN when allowed), the goal, then the outcomes (or, when no
    tool ran, the catalog)."""
    rule = JOIN_MAY_REPLAN if request.allow_replan else JOIN_MUST_ANSWER
    if request.outcomes:
        body = JOIN_OUTCOMES.format(outcomes=outcome_lines(request.plan, request.outcomes))
    else:
        tools = "\n".join(
            _json({"name": t.name, "description": t.description}) for t in request.tools
        )
        body = JOIN_NO_TOOLS.format(tools=tools or "(none)")
    messages: list[Message] = [
        {"role": "system", "content": JOIN_SYSTEM.format(replan_rule=rule)},
        {"role": "user", "content": request.goal},
        {"role": "user", "content": body},
    ]
    return with_session(messages, _session(request))


def tool_join_messages(
    request: planner_pb2.JoinRequest, max_nodes: int, function_of: Any = None
) -> list[Message]:
    """The tool_calls conversation of the run so far, for the model to answer (or, when
    ``allow_replan``, to call more tools)."""
    messages = conversation(
        request.goal,
        _rounds(request.plan, request.round_starts),
        {o.node_id: o for o in request.outcomes},
        max_nodes,
        last_round=not request.allow_replan,
        function_of=function_of,
    )
    return with_session(messages, _session(request))
