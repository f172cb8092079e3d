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
    __slots__ = ("run_id", "goal", "tools", "max_nodes", "model", "round", "previous_plan", "previous_outcomes", "replan_reason", "attempt")
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
    def __init__(self, run_id: _Optional[str] = ..., goal: _Optional[str] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolSpec, _Mapping]]] = ..., max_nodes: _Optional[int] = ..., model: _Optional[str] = ..., round: _Optional[int] = ..., previous_plan: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ..., previous_outcomes: _Optional[_Iterable[_Union[_common_pb2.NodeOutcome, _Mapping]]] = ..., replan_reason: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class PlanDone(_message.Message):
    __slots__ = ("usage",)
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: _common_pb2.Usage
    def __init__(self, usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("node", "done", "usage")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.ToolCall
    done: PlanDone
    usage: ModelCallUsage
    def __init__(self, node: _Optional[_Union[_common_pb2.ToolCall, _Mapping]] = ..., done: _Optional[_Union[PlanDone, _Mapping]] = ..., usage: _Optional[_Union[ModelCallUsage, _Mapping]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("run_id", "goal", "plan", "outcomes", "model", "round", "allow_replan", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ALLOW_REPLAN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    goal: str
    plan: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCall]
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeOutcome]
    model: str
    round: int
    allow_replan: bool
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., goal: _Optional[str] = ..., plan: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ..., outcomes: _Optional[_Iterable[_Union[_common_pb2.NodeOutcome, _Mapping]]] = ..., model: _Optional[str] = ..., round: _Optional[int] = ..., allow_replan: _Optional[bool] = ..., attempt: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("answer_delta", "done", "usage")
    ANSWER_DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    answer_delta: str
    done: JoinDone
    usage: ModelCallUsage
    def __init__(self, answer_delta: _Optional[str] = ..., done: _Optional[_Union[JoinDone, _Mapping]] = ..., usage: _Optional[_Union[ModelCallUsage, _Mapping]] = ...) -> None: ...
