import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from trellis.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOIN_DECISION_UNSPECIFIED: _ClassVar[JoinDecision]
    JOIN_DECISION_FINISH: _ClassVar[JoinDecision]
    JOIN_DECISION_REPLAN: _ClassVar[JoinDecision]
JOIN_DECISION_UNSPECIFIED: JoinDecision
JOIN_DECISION_FINISH: JoinDecision
JOIN_DECISION_REPLAN: JoinDecision

class PlanRequest(_message.Message):
    __slots__ = ("run_id", "goal", "tools", "max_nodes", "model", "round", "previous_plan", "previous_outcomes", "replan_reason", "attempt", "plan_format", "round_starts", "session")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PLAN_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    REPLAN_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROUND_STARTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    goal: str
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolSpec]
    max_nodes: int
    model: str
    round: int
    previous_plan: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCall]
    previous_outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeOutcome]
    replan_reason: str
    attempt: int
    plan_format: _common_pb2.PlanFormat
    round_starts: _containers.RepeatedScalarFieldContainer[int]
    session: SessionContext
    def __init__(self, run_id: _Optional[str] = ..., goal: _Optional[str] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolSpec, _Mapping]]] = ..., max_nodes: _Optional[int] = ..., model: _Optional[str] = ..., round: _Optional[int] = ..., previous_plan: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ..., previous_outcomes: _Optional[_Iterable[_Union[_common_pb2.NodeOutcome, _Mapping]]] = ..., replan_reason: _Optional[str] = ..., attempt: _Optional[int] = ..., plan_format: _Optional[_Union[_common_pb2.PlanFormat, str]] = ..., round_starts: _Optional[_Iterable[int]] = ..., session: _Optional[_Union[SessionContext, _Mapping]] = ...) -> None: ...

class PlanStarted(_message.Message):
    __slots__ = ("plan_format",)
    PLAN_FORMAT_FIELD_NUMBER: _ClassVar[int]
    plan_format: _common_pb2.PlanFormat
    def __init__(self, plan_format: _Optional[_Union[_common_pb2.PlanFormat, str]] = ...) -> None: ...

class PlanDone(_message.Message):
    __slots__ = ("usage", "answered")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    usage: _common_pb2.Usage
    answered: bool
    def __init__(self, usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., answered: _Optional[bool] = ...) -> None: ...

class ModelCallUsage(_message.Message):
    __slots__ = ("usage_id", "started", "usage", "cost_deferred")
    USAGE_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_DEFERRED_FIELD_NUMBER: _ClassVar[int]
    usage_id: str
    started: bool
    usage: _common_pb2.Usage
    cost_deferred: bool
    def __init__(self, usage_id: _Optional[str] = ..., started: _Optional[bool] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_deferred: _Optional[bool] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("node", "done", "usage", "started", "answer_delta")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ANSWER_DELTA_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.ToolCall
    done: PlanDone
    usage: ModelCallUsage
    started: PlanStarted
    answer_delta: str
    def __init__(self, node: _Optional[_Union[_common_pb2.ToolCall, _Mapping]] = ..., done: _Optional[_Union[PlanDone, _Mapping]] = ..., usage: _Optional[_Union[ModelCallUsage, _Mapping]] = ..., started: _Optional[_Union[PlanStarted, _Mapping]] = ..., answer_delta: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("run_id", "goal", "plan", "outcomes", "model", "round", "allow_replan", "attempt", "plan_format", "round_starts", "tools", "max_nodes", "session")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ALLOW_REPLAN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROUND_STARTS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    goal: str
    plan: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCall]
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeOutcome]
    model: str
    round: int
    allow_replan: bool
    attempt: int
    plan_format: _common_pb2.PlanFormat
    round_starts: _containers.RepeatedScalarFieldContainer[int]
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolSpec]
    max_nodes: int
    session: SessionContext
    def __init__(self, run_id: _Optional[str] = ..., goal: _Optional[str] = ..., plan: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ..., outcomes: _Optional[_Iterable[_Union[_common_pb2.NodeOutcome, _Mapping]]] = ..., model: _Optional[str] = ..., round: _Optional[int] = ..., allow_replan: _Optional[bool] = ..., attempt: _Optional[int] = ..., plan_format: _Optional[_Union[_common_pb2.PlanFormat, str]] = ..., round_starts: _Optional[_Iterable[int]] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolSpec, _Mapping]]] = ..., max_nodes: _Optional[int] = ..., session: _Optional[_Union[SessionContext, _Mapping]] = ...) -> None: ...

class JoinDone(_message.Message):
    __slots__ = ("decision", "reason", "usage")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    decision: JoinDecision
    reason: str
    usage: _common_pb2.Usage
    def __init__(self, decision: _Optional[_Union[JoinDecision, str]] = ..., reason: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("answer_delta", "done", "usage", "node")
    ANSWER_DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    answer_delta: str
    done: JoinDone
    usage: ModelCallUsage
    node: _common_pb2.ToolCall
    def __init__(self, answer_delta: _Optional[str] = ..., done: _Optional[_Union[JoinDone, _Mapping]] = ..., usage: _Optional[_Union[ModelCallUsage, _Mapping]] = ..., node: _Optional[_Union[_common_pb2.ToolCall, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class UsageShare(_message.Message):
    __slots__ = ("run_id", "node_id", "usage_id", "weight")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    usage_id: str
    weight: int
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., usage_id: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("messages", "model", "output_schema", "output_name", "max_output_tokens", "temperature", "shares", "timeout", "tool")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    model: str
    output_schema: _struct_pb2.Struct
    output_name: str
    max_output_tokens: int
    temperature: float
    shares: _containers.RepeatedCompositeFieldContainer[UsageShare]
    timeout: _duration_pb2.Duration
    tool: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., model: _Optional[str] = ..., output_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output_name: _Optional[str] = ..., max_output_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., shares: _Optional[_Iterable[_Union[UsageShare, _Mapping]]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tool: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "usage", "error")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    text: str
    usage: _containers.RepeatedCompositeFieldContainer[ModelCallUsage]
    error: _common_pb2.Error
    def __init__(self, text: _Optional[str] = ..., usage: _Optional[_Iterable[_Union[ModelCallUsage, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("inputs", "model", "shares", "timeout", "tool", "dimensions")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model: str
    shares: _containers.RepeatedCompositeFieldContainer[UsageShare]
    timeout: _duration_pb2.Duration
    tool: str
    dimensions: int
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[UsageShare, _Mapping]]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tool: _Optional[str] = ..., dimensions: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "usage", "error")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    usage: _containers.RepeatedCompositeFieldContainer[ModelCallUsage]
    error: _common_pb2.Error
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[ModelCallUsage, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class TurnResult(_message.Message):
    __slots__ = ("tool", "status", "output")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    tool: str
    status: str
    output: str
    def __init__(self, tool: _Optional[str] = ..., status: _Optional[str] = ..., output: _Optional[str] = ...) -> None: ...

class ContextTurn(_message.Message):
    __slots__ = ("number", "goal", "answer", "results")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    number: int
    goal: str
    answer: str
    results: _containers.RepeatedCompositeFieldContainer[TurnResult]
    def __init__(self, number: _Optional[int] = ..., goal: _Optional[str] = ..., answer: _Optional[str] = ..., results: _Optional[_Iterable[_Union[TurnResult, _Mapping]]] = ...) -> None: ...

class SessionContext(_message.Message):
    __slots__ = ("session_id", "summary", "summary_through_turn", "turns")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_THROUGH_TURN_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    summary: str
    summary_through_turn: int
    turns: _containers.RepeatedCompositeFieldContainer[ContextTurn]
    def __init__(self, session_id: _Optional[str] = ..., summary: _Optional[str] = ..., summary_through_turn: _Optional[int] = ..., turns: _Optional[_Iterable[_Union[ContextTurn, _Mapping]]] = ...) -> None: ...

class SummarizeRequest(_message.Message):
    __slots__ = ("run_id", "session", "max_tokens", "model", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session: SessionContext
    max_tokens: int
    model: str
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., session: _Optional[_Union[SessionContext, _Mapping]] = ..., max_tokens: _Optional[int] = ..., model: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class SummarizeResponse(_message.Message):
    __slots__ = ("folded", "summary", "through_turn", "usage")
    FOLDED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    THROUGH_TURN_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    folded: bool
    summary: str
    through_turn: int
    usage: ModelCallUsage
    def __init__(self, folded: _Optional[bool] = ..., summary: _Optional[str] = ..., through_turn: _Optional[int] = ..., usage: _Optional[_Union[ModelCallUsage, _Mapping]] = ...) -> None: ...
