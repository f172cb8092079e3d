"""One model call of a plan, and what it got wrong: the core's repair bookkeeping.

``PlanRound.take`` checks each candidate node the format's reader hands out (``candidates``)
with the plan's validator: a valid one is the node to stream; a rejected one is noted
with every reason (for the repair round to quote) or, in the repair round or once the
plan is full, ends the plan. A node longer than the limit always ends it. The errors
a plan can end with are made here too, worded for the model's format.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trellis.common.v1 import common_pb2
from trellis.runtime.convert import from_struct
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis_planner import plan_schema
from trellis_planner.candidates import Candidate
from trellis_planner.formats import PlanFormat
from trellis_planner.jsonl import LineTooLong
from trellis_planner.prompts import RejectedLine, RepairCall
from trellis_planner.validation import PlanValidator, invalid_plan

#: The first call stops being read after this many rejected nodes: it is off track, and
#: the repair round has enough to go on.
MAX_REJECTED_LINES = 10

_NODE_INDEX = re.compile(r"^plan\[\d+\]\.?")


def still_invalid(error: InvalidArgument) -> InvalidArgument:
    return invalid_plan(
        f"the model's plan is still invalid after one repair round: {error.message}",
        error.violations,
    )


def _problem(violation: FieldViolation) -> str:
    """A violation as the model should read it: relative to its node (``args.ms: ...``)."""
    field = _NODE_INDEX.sub("", violation.field)
    return f"{field}: {violation.description}" if field else violation.description


def unreadable(fmt: PlanFormat, candidate: Candidate, kind: str) -> InvalidArgument:
    what = "not JSON Lines" if fmt is PlanFormat.JSONL else "unreadable"
    problem = f"{kind} {candidate.number}: {candidate.problem}"
    return invalid_plan(
        f"the model's plan is {what}: {problem}", [FieldViolation("plan", candidate.problem)]
    )


def too_long(error: LineTooLong, kind: str) -> InvalidArgument:
    problem = f"{kind} {error.line_number} is longer than {error.limit} bytes"
    return invalid_plan(
        f"the model's plan is refused: {problem} (it starts {error.line[:40]!r})",
        [FieldViolation("plan", problem)],
    )


def total(a: common_pb2.Usage, b: common_pb2.Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        model=b.model or a.model,
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cached_input_tokens=a.cached_input_tokens + b.cached_input_tokens,
        cost_nano_usd=a.cost_nano_usd + b.cost_nano_usd,
        estimated=a.estimated or b.estimated,
    )


@dataclass
class PlanRound:
    """One model call of a plan: what it got wrong, its output and usage.

    In the first round a rejected node is noted for the repair; in the repair round (or
    once the plan is full) it ends the plan at once. ``prepare`` turns a candidate's
    value into the node to check (json_schema: optional nulls dropped); with
    ``calls_allowed`` false (the last round's join) tool calls are not taken at all.
    """

    fmt: PlanFormat
    validator: PlanValidator
    kind: str
    repair: bool
    prepare: Callable[[Any], Any] = lambda value: value
    calls_allowed: bool = True
    rejected: list[RejectedLine] = field(default_factory=list)
    errors: list[InvalidArgument] = field(default_factory=list)
    #: tool_calls: the node id of each accepted candidate, by its number.
    accepted: dict[int, str] = field(default_factory=dict)
    problems: dict[int, list[str]] = field(default_factory=dict)
    ignored: int = 0
    output: str = ""
    text: str = ""
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)

    @property
    def enough(self) -> bool:
        return len(self.rejected) >= MAX_REJECTED_LINES

    def take(self, candidate: Candidate) -> common_pb2.ToolCall | None:
        """The candidate's node if it is valid, else None (rejection noted) or raise."""
        if candidate.too_long is not None:
            raise too_long(candidate.too_long, self.kind)
        if not self.calls_allowed:
            self.ignored += 1
            return None
        if candidate.value is None:
            error = unreadable(self.fmt, candidate, self.kind)
            self._reject(candidate, [candidate.problem], error)
            return None
        value = self.prepare(candidate.value)
        if self.repair and self.validator.is_repeat(value):
            return None
        where: int | str = candidate.number
        if self.fmt is not PlanFormat.JSONL:
            where = f"{self.kind} {candidate.number}"
        try:
            call = self.validator.check(value, where)
        except InvalidArgument as error:
            if self.validator.full:  # over max_nodes: accepted nodes stay, nothing fits
                raise
            self._reject(candidate, [_problem(v) for v in error.violations], error)
            return None
        self.accepted[candidate.number] = call.node_id
        return call

    def _reject(self, candidate: Candidate, problems: list[str], error: InvalidArgument) -> None:
        if self.repair:
            raise still_invalid(error)
        self.rejected.append(RejectedLine(candidate.number, candidate.text, problems))
        self.problems[candidate.number] = problems
        self.errors.append(error)


def preparer(fmt: PlanFormat, tools: Sequence[common_pb2.ToolSpec]) -> Callable[[Any], Any]:
    """json_schema: a node's args without the nulls strict mode wrote for optional ones."""
    if fmt is not PlanFormat.JSON_SCHEMA:
        return lambda value: value
    schemas = {t.name: from_struct(t.input_schema) for t in tools}

    def prepare(value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("args"), dict):
            schema = schemas.get(value.get("tool"))  # type: ignore[arg-type]
            return {**value, "args": plan_schema.restore_optional(value["args"], schema)}
        return value

    return prepare


def repair_calls(candidates: Sequence[Candidate], round_: PlanRound) -> list[RepairCall]:
    """The first reply's tool calls as the repair conversation echoes them: ids of our
    own (accepted: the node id), arguments as written when they are JSON."""
    calls = []
    for c in candidates:
        node = round_.accepted.get(c.number, "")
        problems = round_.problems.get(c.number, [])
        if not node and not problems:
            continue  # a repeat, or skipped: nothing to say
        arguments = c.arguments
        if c.value is None:  # not JSON: say so, and keep the history readable
            problems = [*problems, f"the arguments were: {c.arguments[:500]}"]
            arguments = "{}"
        call_id = node or f"rejected_{c.number}"
        calls.append(RepairCall(call_id, c.function or "unknown", arguments, problems, node))
    return calls
