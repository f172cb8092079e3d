"""The planner's domain core: plan a goal, join outcomes. No gRPC in here.

``plan`` first says which plan format the run's model gets (``PlanStarted``:
``formats.py``), then streams each validated ToolCall as soon as the model has written
it (a JSONL line, a node object of the ``json_schema`` plan, a tool call whose arguments
closed: ``candidates.py``), then a ``PlanEnd`` with the usage of its model calls. In the
``tool_calls`` format the model may also write text: it streams as answer text (``str``)
and, when the model called no tool, ``PlanEnd.answered`` says the run has its answer.

``join`` streams answer text, then a ``JoinEnd`` with FINISH or REPLAN. In the
``tool_calls`` format the join is the run's conversation so far: the model answers, or
calls more tools, and those calls stream as ToolCalls of the next round (REPLAN without
a second model call); on the last allowed round the model may not call tools.

Both also stream, for every model call, a ``CallStarted`` once its budget check passed
(before the request is sent) and a ``CallUsage`` once its usage is recorded — before
anything else that follows, an error included. So a caller always learns what a stream
it saw end cost, and when it cancels a stream itself it knows which calls to look up in
the ledger: every started call gets its ledger row (zero tokens when the endpoint never
answered), however it ends.

Repair, in every format: a node is never retracted once streamed, so the first call's
valid nodes go out as they come, while its rejected ones (not JSON, not a ToolCall,
unknown tool, args against the input schema, dangling or forward references, duplicate
ids; tool calls written as text; a node cut off by the token limit) are collected. If
there are any, one repair call sends them back, each with its reasons, together with
the nodes already accepted, and asks for the rest of the plan; the same validator checks
the answer, so it continues the same plan (ids, references). A node that repeats an
accepted one unchanged is skipped. Still invalid after the repair, or over
``max_nodes`` (no repair can add to a full plan): ``InvalidArgument`` (INVALID_PLAN, or
TOO_MANY_NODES for a plan over ``max_nodes``). A node over ``max_line_bytes`` ends the
plan at once with INVALID_PLAN, unread to its end and not repaired: a model writing such
a node is off track, and quoting it back would only make the repair call as large. A
model that refuses (the API's ``refusal``) ends the stream with MODEL_REFUSED.

Every model call is recorded with cost accounting: valid or not, finished or failed,
and also when the client goes away mid-stream (tokens estimated from the text so far,
marked estimated); the ledger write is shielded from that cancellation, and kept in the
durable usage outbox when cost accounting is out of reach (``model_usage.py``). A call's
usage_id is decided before it is made, so its budget reservation and its ledger row
carry the same id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.errors import Unavailable
from trellis.runtime.logs import get_logger
from trellis.runtime.validation import DEFAULT_MAX_GOAL_BYTES
from trellis_planner import model_usage, plan_schema
from trellis_planner.candidates import Candidate, JsonlReader, NodeIds, PlanReader
from trellis_planner.formats import FormatChooser, PlanFormat
from trellis_planner.json_plan import JsonPlanReader
from trellis_planner.model import ChatCall, ChatModel
from trellis_planner.model_errors import refused
from trellis_planner.model_usage import CallUsage, UsageSender
from trellis_planner.plan_round import PlanRound, preparer, repair_calls, total
from trellis_planner.prompts import (
    Message,
    join_messages,
    plan_messages,
    repair_messages,
    tool_join_messages,
    tool_repair_messages,
)
from trellis_planner.replan import ReplanGate
from trellis_planner.tool_stream import ToolCallReader
from trellis_planner.validation import PlanValidator, check_request

log = get_logger(__name__)

#: Steps of the model calls, as they appear in usage ids and on spans.
PLAN = "plan"
PLAN_REPAIR = "plan-repair"
JOIN = "join"
JOIN_REPAIR = "join-repair"

Request = planner_pb2.PlanRequest | planner_pb2.JoinRequest


@dataclass(frozen=True)
class PlanStarted:
    """The plan format this run's model gets (sent first)."""

    plan_format: PlanFormat


@dataclass(frozen=True)
class PlanEnd:
    """The plan is complete; ``usage`` sums its model calls (plan, and repair if any);
    ``answered``: the model answered instead of calling tools (tool_calls)."""

    usage: common_pb2.Usage
    answered: bool = False


@dataclass(frozen=True)
class CallStarted:
    """A model call under ``usage_id`` passed its budget check and is being made."""

    usage_id: str


@dataclass(frozen=True)
class JoinEnd:
    """The answer is complete, or the model asks for another plan (``replan``)."""

    replan: bool
    reason: str
    usage: common_pb2.Usage


@dataclass
class _Plan:
    """What a planning exchange (a call and its repair) produced."""

    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    nodes: int = 0
    text: bool = False


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
        formats: FormatChooser | None = None,
    ) -> None:
        self._model = model
        self._usage = usage
        self._default_model = default_model
        self._max_nodes = max_nodes
        self._max_line_bytes = max_line_bytes
        self._max_goal_bytes = max_goal_bytes
        self._formats = formats or FormatChooser()

    def _format(self, request: Request) -> PlanFormat:
        fmt = self._formats.choose(request.model or self._default_model, request.plan_format)
        trace.get_current_span().set_attribute("trellis.plan_format", fmt.value)
        return fmt

    async def plan(
        self, request: planner_pb2.PlanRequest
    ) -> AsyncIterator[common_pb2.ToolCall | str | PlanStarted | CallStarted | CallUsage | PlanEnd]:
        check_request(request.run_id, request.goal, self._max_goal_bytes)
        fmt = self._format(request)
        yield PlanStarted(fmt)
        max_nodes = request.max_nodes if request.max_nodes > 0 else self._max_nodes
        previous = [call.node_id for call in request.previous_plan]
        validator = PlanValidator(request.tools, max_nodes, previous=previous)
        names = plan_schema.FunctionNames(t.name for t in request.tools)
        messages = plan_messages(request, max_nodes, fmt, names.function)
        done = _Plan()
        exchange = self._exchange(
            fmt, validator, messages, request, (PLAN, PLAN_REPAIR), names, done, calls_allowed=True
        )
        async with aclosing(exchange) as items:
            async for item in items:
                yield item
        answered = fmt is PlanFormat.TOOL_CALLS and done.nodes == 0 and done.text
        yield PlanEnd(done.usage, answered)

    async def _exchange(
        self,
        fmt: PlanFormat,
        validator: PlanValidator,
        messages: list[Message],
        request: Request,
        steps: tuple[str, str],
        names: plan_schema.FunctionNames,
        done: _Plan,
        *,
        calls_allowed: bool,
    ) -> AsyncIterator[common_pb2.ToolCall | str | CallStarted | CallUsage]:
        """A planning call, and its repair call if it got nodes wrong."""
        tools = list(request.tools)
        options = self._options(fmt, tools, validator.max_nodes, calls_allowed)
        prepare = preparer(fmt, tools)
        ids = NodeIds(validator.previous_ids)
        first = PlanRound(fmt, validator, "", False, prepare, calls_allowed)
        reader = self._reader(fmt, ids, names, release_text=not calls_allowed)
        first.kind = reader.kind
        opening = self._round(first, reader, messages, request, steps[0], options)
        async with aclosing(opening) as it:
            async for item in it:
                yield item
        done.usage = first.usage
        done.nodes += len(first.accepted)
        done.text = done.text or bool(first.text)
        if first.ignored and not first.text:
            raise Unavailable(
                "the model called tools on the last round, when it had to answer",
                reason="MODEL_BAD_RESPONSE",
                metadata={"model": first.usage.model},
            )
        if not first.rejected:
            return
        if validator.full:  # the rejected nodes can no longer be added
            raise first.errors[0]
        log.info(
            "repairing plan",
            run_id=request.run_id,
            round=request.round,
            format=fmt.value,
            rejected=[r.line for r in first.rejected],
            accepted=validator.count,
        )
        remaining = validator.max_nodes - validator.count
        if fmt is PlanFormat.TOOL_CALLS:
            assert isinstance(reader, ToolCallReader)
            calls = repair_calls(reader.candidates, first)
            text = first.text + reader.text_as_calls
            messages = tool_repair_messages(messages, text, calls, remaining)
        else:
            messages = repair_messages(
                messages, first.output, first.rejected, validator.accepted, remaining, fmt
            )
        repair = PlanRound(fmt, validator, reader.kind, True, prepare, calls_allowed)
        reader = self._reader(fmt, ids, names, release_text=True)
        second = self._round(repair, reader, messages, request, steps[1], options)
        async with aclosing(second) as it:
            async for item in it:
                yield item
        done.usage = total(done.usage, repair.usage)
        done.nodes += len(repair.accepted)
        done.text = done.text or bool(repair.text)

    def _reader(
        self,
        fmt: PlanFormat,
        ids: NodeIds,
        names: plan_schema.FunctionNames,
        *,
        release_text: bool,
    ) -> PlanReader:
        """The format's reader; ``release_text``: text that looks like a tool call is
        the answer after all (a repair round, or a round that may not call tools)."""
        if fmt is PlanFormat.JSON_SCHEMA:
            return JsonPlanReader(self._max_line_bytes)
        if fmt is PlanFormat.TOOL_CALLS:
            return ToolCallReader(
                ids, names, release_text=release_text, max_line_bytes=self._max_line_bytes
            )
        return JsonlReader(self._max_line_bytes)

    def _options(
        self,
        fmt: PlanFormat,
        tools: Sequence[common_pb2.ToolSpec],
        max_nodes: int,
        calls_allowed: bool,
    ) -> dict[str, Any]:
        """The request fields of the format: the response schema, or the tools."""
        if fmt is PlanFormat.JSON_SCHEMA:
            return {"response_format": plan_schema.response_format(tools)}
        if fmt is PlanFormat.TOOL_CALLS and tools:
            names = plan_schema.FunctionNames(t.name for t in tools)
            options: dict[str, Any] = {"tools": plan_schema.tool_definitions(tools, names)}
            if calls_allowed:
                options.update(tool_choice="auto", parallel_tool_calls=True)
            else:
                options["tool_choice"] = "none"
            return options
        return {}

    async def _round(
        self,
        round_: PlanRound,
        reader: PlanReader,
        messages: Sequence[Message],
        request: Request,
        step: str,
        options: Mapping[str, Any],
    ) -> AsyncIterator[common_pb2.ToolCall | str | CallStarted | CallUsage]:
        """Stream the valid nodes (and answer text) of one model call; record its usage
        however it ends."""
        call = self._chat(messages, request, step, options, round_.fmt)
        await call.reserve()  # BUDGET_EXCEEDED: no call, nothing to record
        yield CallStarted(call.usage_id)
        refusal: list[str] = []
        try:
            async with call, aclosing(call.deltas()) as deltas:
                async for parts in deltas:
                    if parts.refusal:
                        refusal.append(parts.refusal)
                    for item in reader.feed(parts):
                        if (out := self._item(round_, item)) is not None:
                            yield out
                    if round_.enough:
                        break
                else:
                    cut_off = "length" in call.result.finish_reasons
                    for item in reader.close(cut_off):
                        if (out := self._item(round_, item)) is not None:
                            yield out
                    if refusal:
                        raise refused(call.result.model, "".join(refusal))
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

    @staticmethod
    def _item(round_: PlanRound, item: Candidate | str) -> common_pb2.ToolCall | str | None:
        if isinstance(item, str):
            round_.text += item
            return item
        return round_.take(item)

    async def join(
        self, request: planner_pb2.JoinRequest
    ) -> AsyncIterator[common_pb2.ToolCall | str | CallStarted | CallUsage | JoinEnd]:
        check_request(request.run_id, request.goal, self._max_goal_bytes)
        fmt = self._format(request)
        if fmt is PlanFormat.TOOL_CALLS:
            async with aclosing(self._tool_join(request)) as items:
                async for item in items:
                    yield item
            return
        gate = ReplanGate(request.allow_replan)
        call = self._chat(join_messages(request), request, JOIN, {}, fmt)
        await call.reserve()
        yield CallStarted(call.usage_id)
        refusal: list[str] = []
        try:
            async with call, aclosing(call.deltas()) as deltas:
                async for parts in deltas:
                    if parts.refusal:
                        refusal.append(parts.refusal)
                    for piece in gate.feed(parts.text) if parts.text else ():
                        yield piece
                for piece in gate.close():
                    yield piece
                if refusal:
                    raise refused(call.result.model, "".join(refusal))
        except BaseException as error:  # also cancellation: the tokens were spent all the same
            used = await self._record(call, request)
            if isinstance(error, Exception):
                yield used
            raise
        used = await self._record(call, request)
        yield used
        yield JoinEnd(gate.replan, gate.reason, used.usage)

    async def _tool_join(
        self, request: planner_pb2.JoinRequest
    ) -> AsyncIterator[common_pb2.ToolCall | str | CallStarted | CallUsage | JoinEnd]:
        """The conversation so far: the model answers, or calls the next round's tools."""
        max_nodes = request.max_nodes if request.max_nodes > 0 else self._max_nodes
        validator = PlanValidator(
            request.tools, max_nodes, previous=[c.node_id for c in request.plan]
        )
        names = plan_schema.FunctionNames(t.name for t in request.tools)
        messages = tool_join_messages(request, max_nodes, names.function)
        done = _Plan()
        exchange = self._exchange(
            PlanFormat.TOOL_CALLS,
            validator,
            messages,
            request,
            (JOIN, JOIN_REPAIR),
            names,
            done,
            calls_allowed=request.allow_replan,
        )
        async with aclosing(exchange) as items:
            async for item in items:
                yield item
        reason = f"the model called {done.nodes} more tools" if done.nodes else ""
        yield JoinEnd(done.nodes > 0, reason, done.usage)

    def _chat(
        self,
        messages: Sequence[Message],
        request: Request,
        step: str,
        options: Mapping[str, Any],
        fmt: PlanFormat,
    ) -> ChatCall:
        return self._model.chat(
            messages,
            model=request.model or self._default_model,
            run_id=request.run_id,
            step=step,
            usage_id=model_usage.usage_id(request.run_id, step, request.round, request.attempt),
            options=options,
            span_attributes={"trellis.plan_format": fmt.value},
        )

    async def _record(self, call: ChatCall, request: Request) -> CallUsage:
        return await model_usage.record_call(self._usage, call, request.run_id)
