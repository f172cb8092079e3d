import datetime

from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from trellis.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_KIND_UNSPECIFIED: _ClassVar[UsageKind]
    USAGE_KIND_MODEL: _ClassVar[UsageKind]
    USAGE_KIND_TOOL: _ClassVar[UsageKind]
USAGE_KIND_UNSPECIFIED: UsageKind
USAGE_KIND_MODEL: UsageKind
USAGE_KIND_TOOL: UsageKind

class RecordUsageRequest(_message.Message):
    __slots__ = ("usage_id", "run_id", "node_id", "kind", "usage", "tool", "tool_cost_nano_usd", "estimated", "occurred_at", "session_id")
    USAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    TOOL_COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    usage_id: str
    run_id: str
    node_id: str
    kind: UsageKind
    usage: _common_pb2.Usage
    tool: str
    tool_cost_nano_usd: int
    estimated: bool
    occurred_at: _timestamp_pb2.Timestamp
    session_id: str
    def __init__(self, usage_id: _Optional[str] = ..., run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., kind: _Optional[_Union[UsageKind, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., tool: _Optional[str] = ..., tool_cost_nano_usd: _Optional[int] = ..., estimated: _Optional[bool] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class RecordUsageResponse(_message.Message):
    __slots__ = ("cost_nano_usd", "duplicate")
    COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    cost_nano_usd: int
    duplicate: bool
    def __init__(self, cost_nano_usd: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class RecordUsagesRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[RecordUsageRequest]
    def __init__(self, entries: _Optional[_Iterable[_Union[RecordUsageRequest, _Mapping]]] = ...) -> None: ...

class RecordUsageResult(_message.Message):
    __slots__ = ("usage_id", "cost_nano_usd", "duplicate", "error")
    USAGE_ID_FIELD_NUMBER: _ClassVar[int]
    COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    usage_id: str
    cost_nano_usd: int
    duplicate: bool
    error: _common_pb2.Error
    def __init__(self, usage_id: _Optional[str] = ..., cost_nano_usd: _Optional[int] = ..., duplicate: _Optional[bool] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class RecordUsagesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecordUsageResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RecordUsageResult, _Mapping]]] = ...) -> None: ...

class CheckBudgetRequest(_message.Message):
    __slots__ = ("estimated_cost_nano_usd", "estimated_usage", "reservation_id")
    ESTIMATED_COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_USAGE_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    estimated_cost_nano_usd: int
    estimated_usage: _common_pb2.Usage
    reservation_id: str
    def __init__(self, estimated_cost_nano_usd: _Optional[int] = ..., estimated_usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., reservation_id: _Optional[str] = ...) -> None: ...

class CheckBudgetResponse(_message.Message):
    __slots__ = ("allowed", "daily_limit_nano_usd", "spent_today_nano_usd", "remaining_nano_usd", "monthly_limit_nano_usd", "spent_this_month_nano_usd", "reserved_nano_usd", "estimated_cost_nano_usd")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    DAILY_LIMIT_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    SPENT_TODAY_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    REMAINING_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_LIMIT_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    SPENT_THIS_MONTH_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    RESERVED_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    daily_limit_nano_usd: int
    spent_today_nano_usd: int
    remaining_nano_usd: int
    monthly_limit_nano_usd: int
    spent_this_month_nano_usd: int
    reserved_nano_usd: int
    estimated_cost_nano_usd: int
    def __init__(self, allowed: _Optional[bool] = ..., daily_limit_nano_usd: _Optional[int] = ..., spent_today_nano_usd: _Optional[int] = ..., remaining_nano_usd: _Optional[int] = ..., monthly_limit_nano_usd: _Optional[int] = ..., spent_this_month_nano_usd: _Optional[int] = ..., reserved_nano_usd: _Optional[int] = ..., estimated_cost_nano_usd: _Optional[int] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("tenant_id", "daily_limit_nano_usd", "monthly_limit_nano_usd", "update_mask")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DAILY_LIMIT_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_LIMIT_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    daily_limit_nano_usd: int
    monthly_limit_nano_usd: int
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, tenant_id: _Optional[str] = ..., daily_limit_nano_usd: _Optional[int] = ..., monthly_limit_nano_usd: _Optional[int] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "start_day", "end_day", "session_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    START_DAY_FIELD_NUMBER: _ClassVar[int]
    END_DAY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    start_day: str
    end_day: str
    session_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., start_day: _Optional[str] = ..., end_day: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant_id", "day", "model", "input_tokens", "output_tokens", "cached_input_tokens", "cost_nano_usd", "events", "kind", "tool", "estimated_events", "estimated_input_tokens", "estimated_output_tokens")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    day: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_nano_usd: int
    events: int
    kind: UsageKind
    tool: str
    estimated_events: int
    estimated_input_tokens: int
    estimated_output_tokens: int
    def __init__(self, tenant_id: _Optional[str] = ..., day: _Optional[str] = ..., model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., cost_nano_usd: _Optional[int] = ..., events: _Optional[int] = ..., kind: _Optional[_Union[UsageKind, str]] = ..., tool: _Optional[str] = ..., estimated_events: _Optional[int] = ..., estimated_input_tokens: _Optional[int] = ..., estimated_output_tokens: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "total_cost_nano_usd", "total_input_tokens", "total_output_tokens", "estimated_events")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    total_cost_nano_usd: int
    total_input_tokens: int
    total_output_tokens: int
    estimated_events: int
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., total_cost_nano_usd: _Optional[int] = ..., total_input_tokens: _Optional[int] = ..., total_output_tokens: _Optional[int] = ..., estimated_events: _Optional[int] = ...) -> None: ...

class GetRunUsageRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunUsageResponse(_message.Message):
    __slots__ = ("model_usage", "tool_cost_nano_usd", "cost_nano_usd", "usage_ids")
    MODEL_USAGE_FIELD_NUMBER: _ClassVar[int]
    TOOL_COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    COST_NANO_USD_FIELD_NUMBER: _ClassVar[int]
    USAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    model_usage: _common_pb2.Usage
    tool_cost_nano_usd: int
    cost_nano_usd: int
    usage_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., tool_cost_nano_usd: _Optional[int] = ..., cost_nano_usd: _Optional[int] = ..., usage_ids: _Optional[_Iterable[str]] = ...) -> None: ...
