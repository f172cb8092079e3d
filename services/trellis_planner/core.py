"""The planner's domain core: plan a goal, join outcomes. No gRPC in here.

``plan`` streams each validated ToolCall as soon as the model has written its line,
then a ``PlanEnd`` with the usage and cost of its model calls; ``join`` streams answer
text, then a ``JoinEnd`` with FINISH or REPLAN.

Both also stream, for every model call, a ``CallStarted`` once its budget check passed
(before the request is sent) and a ``CallUsage`` once its usage is recorded — before
anything else that follows, an error included. So a caller always learns what a stream
it saw end cost, and when it cancels a stream itself it knows which calls to look up in
the ledger: every started call gets its ledger row (zero tokens when the endpoint never
answered), however it ends.

Repair: a node is never retracted once streamed, so the first call's valid lines go out
as they come, while its rejected lines (not JSON, not a ToolCall, unknown tool, args
against the input schema, dangling or forward references, duplicate ids) are collected.
If there are any, one repair call sends them back, each with its reasons, together with
the nodes already accepted, and asks for the rest of the plan; the same validator checks
the answer, so it continues the same plan (ids, references). A line that repeats an
accepted node unchanged is skipped. Still invalid after the repair, or over
``max_nodes`` (no repair can add to a full plan): ``InvalidArgument`` (INVALID_PLAN, or
TOO_MANY_NODES for a plan over ``max_nodes``). A line over ``max_line_bytes`` ends the
plan at once with INVALID_PLAN, unread to its end and not repaired: a model writing such
a line is off track, and quoting it back would only make the repair call as large.

Every model call is recorded with cost accounting: valid or not, finished or failed,
and also when the client goes away mid-stream (tokens estimated from the text so far,
marked estimated); the ledger write is shielded from that cancellation, and kept in the
durable usage outbox when cost accounting is out of reach (``model_usage.py``). A call's
usage_id is decided before it is made, so its budget reservation and its ledger row
carry the same id.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis.runtime.logs import get_logger
from trellis.runtime.validation import DEFAULT_MAX_GOAL_BYTES
from trellis_planner import model_usage
from trellis_planner.jsonl import JsonLine, JsonLinesParser, LineTooLong
from trellis_planner.model import ChatCall, ChatModel
from trellis_planner.model_usage import UsageSender
from trellis_planner.prompts import (
    Message,
    RejectedLine,
    join_messages,
    plan_messages,
    repair_messages,
)
from trellis_planner.replan import ReplanGate
from trellis_planner.validation import PlanValidator, check_request, invalid_plan

log = get_logger(__name__)

#: Steps of the model calls, as they appear in usage ids and on spans.
PLAN = "plan"
PLAN_REPAIR = "plan-repair"
JOIN = "join"
#: The first call stops being read after this many rejected lines: it is off track, and
#: the repair round has enough to go on.
MAX_REJECTED_LINES = 10

_NODE_INDEX = re.compile(r"^plan\[\d+\]\.?")


@dataclass(frozen=True)
class PlanEnd:
    """The plan is complete; ``usage`` sums its model calls (plan, and repair if any)."""

    usage: common_pb2.Usage


@dataclass(frozen=True)
class CallStarted:
    """A model call under ``usage_id`` passed its budget check and is being made."""

    usage_id: str


@dataclass(frozen=True)
class CallUsage:
    """What the model call ``usage_id`` used, and cost as the ledger priced it;
    ``deferred``: cost accounting was out of reach, the ledger prices it later."""

    usage_id: str
    usage: common_pb2.Usage
    deferred: bool


@dataclass(frozen=True)
class JoinEnd:
    """The answer is complete, or the model asks for another plan (``replan``)."""

    replan: bool
    reason: str
    usage: common_pb2.Usage


def _still_invalid(error: InvalidArgument) -> InvalidArgument:
    return invalid_plan(
        f"the model's plan is still invalid after one repair round: {error.message}",
        error.violations,
    )


def _problem(violation: FieldViolation) -> str:
    """A violation as the model should read it: relative to its line (``args.ms: ...``)."""
    field = _NODE_INDEX.sub("", violation.field)
    return f"{field}: {violation.description}" if field else violation.description


def _line_error(line: JsonLine) -> InvalidArgument:
    problem = str(line.error)
    return invalid_plan(
        f"the model's plan is not JSON Lines: {problem}", [FieldViolation("plan", problem)]
    )


def _too_long(error: LineTooLong) -> InvalidArgument:
    problem = f"line {error.line_number} is longer than {error.limit} bytes"
    return invalid_plan(
        f"the model's plan is refused: {problem} (it starts {error.line[:40]!r})",
        [FieldViolation("plan", problem)],
    )


def _total(a: common_pb2.Usage, b: common_pb2.Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        model=b.model or a.model,
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cached_input_tokens=a.cached_input_tokens + b.cached_input_tokens,
        cost_nano_usd=a.cost_nano_usd + b.cost_nano_usd,
        estimated=a.estimated or b.estimated,
    )


@dataclass
class _Round:
    """One model call of a plan: the lines it got wrong, its output and usage.

    In the first round a rejected line is noted for the repair; in the repair round (or
    once the plan is full) it ends the plan at once.
    """

    validator: PlanValidator
    repair: bool
    rejected: list[RejectedLine] = field(default_factory=list)
    errors: list[InvalidArgument] = field(default_factory=list)
    output: str = ""
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)

    @property
    def enough(self) -> bool:
        return len(self.rejected) >= MAX_REJECTED_LINES

    def take(self, line: JsonLine) -> common_pb2.ToolCall | None:
        """The line's node if it is valid, else None (rejection noted) or raise."""
        if isinstance(line.error, LineTooLong):
            raise _too_long(line.error)
        if line.error is not None:
            self._reject(line, [line.error.problem], _line_error(line))
            return None
        if self.repair and self.validator.is_repeat(line.value):
            return None
        try:
            return self.validator.check(line.value, line.number)
        except InvalidArgument as error:
            if self.validator.full:  # over max_nodes: accepted nodes stay, nothing fits
                raise
            self._reject(line, [_problem(v) for v in error.violations], error)
            return None

    def _reject(self, line: JsonLine, problems: list[str], error: InvalidArgument) -> None:
        if self.repair:
            raise _still_invalid(error)
        self.rejected.append(RejectedLine(line.number, line.text, problems))
        self.errors.append(error)


class Planner:
    def __init__(
        self,
        model: ChatModel,
        usage: UsageSender,
        *,
        default_model: str,
        max_nodes: int,
        max_line_bytes: int | None = None,
        max_goal_bytes: int = DEFAULT_MAX_GOAL_BYTES,
    ) -> None:
        self._model = model
        self._usage = usage
        self._default_model = default_model
        self._max_nodes = max_nodes
        self._max_line_bytes = max_line_bytes
        self._max_goal_bytes = max_goal_bytes

    async def plan(
        self, request: planner_pb2.PlanRequest
    ) -> AsyncIterator[common_pb2.ToolCall | CallStarted | CallUsage | PlanEnd]:
        check_request(request.run_id, request.goal, self._max_goal_bytes)
        max_nodes = request.max_nodes if request.max_nodes > 0 else self._max_nodes
        previous = [call.node_id for call in request.previous_plan]
        validator = PlanValidator(request.tools, max_nodes, previous=previous)
        messages = plan_messages(request, max_nodes)
        first = _Round(validator, repair=False)
        async with aclosing(self._round(first, messages, request, PLAN)) as nodes:
            async for node in nodes:
                yield node
        usage = first.usage
        if first.rejected:
            if validator.full:  # the rejected lines can no longer be added
                raise first.errors[0]
            log.info(
                "repairing plan",
                run_id=request.run_id,
                round=request.round,
                rejected_lines=[r.line for r in first.rejected],
                accepted=validator.count,
            )
            repair = _Round(validator, repair=True)
            messages = repair_messages(
                messages,
                first.output,
                first.rejected,
                validator.accepted,
                max_nodes - validator.count,
            )
            async with aclosing(self._round(repair, messages, request, PLAN_REPAIR)) as nodes:
                async for node in nodes:
                    yield node
            usage = _total(usage, repair.usage)
        yield PlanEnd(usage)

    async def _round(
        self,
        round_: _Round,
        messages: Sequence[Message],
        request: planner_pb2.PlanRequest,
        step: str,
    ) -> AsyncIterator[common_pb2.ToolCall | CallStarted | CallUsage]:
        """Stream the valid nodes of one model call; record its usage however it ends."""
        parser = JsonLinesParser(strict=False, max_line_bytes=self._max_line_bytes)
        call = self._chat(messages, request, step)
        await call.reserve()  # BUDGET_EXCEEDED: no call, nothing to record
        yield CallStarted(call.usage_id)
        try:
            async with call, aclosing(call.deltas()) as deltas:
                async for text in deltas:
                    for line in parser.feed(text):
                        if (node := round_.take(line)) is not None:
                            yield node
                    if round_.enough:
                        break
                else:
                    for line in parser.close():
                        if (node := round_.take(line)) is not None:
                            yield node
        except BaseException as error:  # also cancellation: the tokens were spent all the same
            used = await self._record(call, request)
            round_.usage = used.usage
            if isinstance(error, Exception):  # not cancelled: the caller still listens
                yield used
            raise
        round_.output = call.result.text
        used = await self._record(call, request)
        round_.usage = used.usage
        yield used

    async def join(
        self, request: planner_pb2.JoinRequest
    ) -> AsyncIterator[str | CallStarted | CallUsage | JoinEnd]:
        check_request(request.run_id, request.goal, self._max_goal_bytes)
        gate = ReplanGate(request.allow_replan)
        call = self._chat(join_messages(request), request, JOIN)
        await call.reserve()
        yield CallStarted(call.usage_id)
        try:
            async with call, aclosing(call.deltas()) as deltas:
                async for text in deltas:
                    for piece in gate.feed(text):
                        yield piece
                for piece in gate.close():
                    yield piece
        except BaseException as error:  # also cancellation: the tokens were spent all the same
            used = await self._record(call, request)
            if isinstance(error, Exception):
                yield used
            raise
        used = await self._record(call, request)
        yield used
        yield JoinEnd(gate.replan, gate.reason, used.usage)

    def _chat(
        self,
        messages: Sequence[Message],
        request: planner_pb2.PlanRequest | planner_pb2.JoinRequest,
        step: str,
    ) -> ChatCall:
        return self._model.chat(
            messages,
            model=request.model or self._default_model,
            run_id=request.run_id,
            step=step,
            usage_id=model_usage.usage_id(request.run_id, step, request.round, request.attempt),
        )

    async def _record(
        self, call: ChatCall, request: planner_pb2.PlanRequest | planner_pb2.JoinRequest
    ) -> CallUsage:
        """Record the call's usage; zero tokens when the endpoint never answered (the row
        still tells the ledger, and whoever waits for the call, that it is over)."""
        result = call.result
        usage = common_pb2.Usage(model=result.model or result.request_model)
        if call.opened:
            usage.input_tokens = result.input_tokens
            usage.output_tokens = result.output_tokens
            usage.cached_input_tokens = result.cached_input_tokens
            usage.estimated = result.estimated
        cost = await model_usage.record(
            self._usage,
            usage_id=call.usage_id,
            run_id=request.run_id,
            usage=usage,
            estimated=usage.estimated,
        )
        usage.cost_nano_usd = cost or 0
        return CallUsage(call.usage_id, usage, deferred=cost is None)
