from google.protobuf import struct_pb2 as _struct_pb2
from trellis.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListToolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools",)
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolSpec]
    def __init__(self, tools: _Optional[_Iterable[_Union[_common_pb2.ToolSpec, _Mapping]]] = ...) -> None: ...

class InvokeToolRequest(_message.Message):
    __slots__ = ("call", "run_id", "idempotency_key", "cache_mode")
    CALL_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CACHE_MODE_FIELD_NUMBER: _ClassVar[int]
    call: _common_pb2.ToolCall
    run_id: str
    idempotency_key: str
    cache_mode: _common_pb2.CacheMode
    def __init__(self, call: _Optional[_Union[_common_pb2.ToolCall, _Mapping]] = ..., run_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., cache_mode: _Optional[_Union[_common_pb2.CacheMode, str]] = ...) -> None: ...

class InvokeToolResponse(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: _common_pb2.NodeOutcome
    def __init__(self, outcome: _Optional[_Union[_common_pb2.NodeOutcome, _Mapping]] = ...) -> None: ...

class InvalidateCacheRequest(_message.Message):
    __slots__ = ("tool", "tenant_id", "all_tenants", "args")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_TENANTS_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    tool: str
    tenant_id: str
    all_tenants: bool
    args: _struct_pb2.Struct
    def __init__(self, tool: _Optional[str] = ..., tenant_id: _Optional[str] = ..., all_tenants: _Optional[bool] = ..., args: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class InvalidateCacheResponse(_message.Message):
    __slots__ = ("invalidated",)
    INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    invalidated: int
    def __init__(self, invalidated: _Optional[int] = ...) -> None: ...
