"""The planner's domain core: plan a goal, join outcomes. No gRPC in here.

``plan`` streams each validated ToolCall as soon as the model has written its line,
then a ``PlanEnd`` with the call's usage and cost; ``join`` streams answer text, then
a ``JoinEnd`` with FINISH or REPLAN. Every model call is recorded with cost accounting,
also when the call's output turned out to be invalid (the tokens were spent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from trellis.common.v1 import common_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis_planner import usage as usage_mod
from trellis_planner.jsonl import JsonLinesError, JsonLinesParser
from trellis_planner.model import ChatCall, ChatModel
from trellis_planner.prompts import join_messages, plan_messages
from trellis_planner.replan import ReplanGate
from trellis_planner.usage import UsageRecorder
from trellis_planner.validation import PlanValidator, invalid_plan

PLAN = "plan"
JOIN = "join"


@dataclass(frozen=True)
class PlanEnd:
    """The plan is complete."""

    usage: common_pb2.Usage


@dataclass(frozen=True)
class JoinEnd:
    """The answer is complete, or the model asks for another plan (``replan``)."""

    replan: bool
    reason: str
    usage: common_pb2.Usage


def _require_goal(goal: str) -> None:
    if not goal.strip():
        raise InvalidArgument(
            "goal is required", reason="GOAL_REQUIRED", violations=[FieldViolation("goal", "empty")]
        )


class Planner:
    def __init__(
        self,
        model: ChatModel,
        recorder: UsageRecorder,
        *,
        default_model: str,
        max_nodes: int,
    ) -> None:
        self._model = model
        self._recorder = recorder
        self._default_model = default_model
        self._max_nodes = max_nodes

    async def plan(
        self, request: planner_pb2.PlanRequest
    ) -> AsyncIterator[common_pb2.ToolCall | PlanEnd]:
        _require_goal(request.goal)
        max_nodes = request.max_nodes if request.max_nodes > 0 else self._max_nodes
        validator = PlanValidator([tool.name for tool in request.tools], max_nodes)
        parser = JsonLinesParser()
        call = self._model.chat(
            plan_messages(request, max_nodes),
            model=request.model or self._default_model,
            run_id=request.run_id,
            step=PLAN,
        )
        try:
            async with call:
                try:
                    async for text in call.deltas():
                        for line in parser.feed(text):
                            yield validator.check(line.value, line.number)
                    for line in parser.close():
                        yield validator.check(line.value, line.number)
                except JsonLinesError as error:
                    raise invalid_plan(
                        f"the model's plan is not JSON Lines: {error}",
                        [FieldViolation("plan", str(error))],
                    ) from error
        except Exception:
            if call.opened:
                await self._record(call, request, PLAN)
            raise
        yield PlanEnd(await self._record(call, request, PLAN))

    async def join(self, request: planner_pb2.JoinRequest) -> AsyncIterator[str | JoinEnd]:
        _require_goal(request.goal)
        gate = ReplanGate(request.allow_replan)
        call = self._model.chat(
            join_messages(request),
            model=request.model or self._default_model,
            run_id=request.run_id,
            step=JOIN,
        )
        try:
            async with call:
                async for text in call.deltas():
                    for piece in gate.feed(text):
                        yield piece
                for piece in gate.close():
                    yield piece
        except Exception:
            if call.opened:
                await self._record(call, request, JOIN)
            raise
        usage = await self._record(call, request, JOIN)
        yield JoinEnd(gate.replan, gate.reason, usage)

    async def _record(
        self, call: ChatCall, request: planner_pb2.PlanRequest | planner_pb2.JoinRequest, step: str
    ) -> common_pb2.Usage:
        result = call.result
        usage = common_pb2.Usage(
            model=result.model or result.request_model,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cached_input_tokens=result.cached_input_tokens,
        )
        usage.cost_nano_usd = await usage_mod.record(
            self._recorder,
            usage_id=usage_mod.usage_id(request.run_id, step, request.round, request.attempt),
            run_id=request.run_id,
            usage=usage,
            estimated=result.estimated,
        )
        return usage
