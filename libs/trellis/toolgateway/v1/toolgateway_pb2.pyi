from google.protobuf import struct_pb2 as _struct_pb2
from trellis.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ToolSourceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOOL_SOURCE_STATE_UNSPECIFIED: _ClassVar[ToolSourceState]
    TOOL_SOURCE_STATE_CONNECTING: _ClassVar[ToolSourceState]
    TOOL_SOURCE_STATE_UP: _ClassVar[ToolSourceState]
    TOOL_SOURCE_STATE_DOWN: _ClassVar[ToolSourceState]
TOOL_SOURCE_STATE_UNSPECIFIED: ToolSourceState
TOOL_SOURCE_STATE_CONNECTING: ToolSourceState
TOOL_SOURCE_STATE_UP: ToolSourceState
TOOL_SOURCE_STATE_DOWN: ToolSourceState

class ListToolsRequest(_message.Message):
    __slots__ = ("known_catalog_version",)
    KNOWN_CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    known_catalog_version: str
    def __init__(self, known_catalog_version: _Optional[str] = ...) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools", "catalog_version", "unchanged", "sources", "collisions")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    COLLISIONS_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolSpec]
    catalog_version: str
    unchanged: bool
    sources: _containers.RepeatedCompositeFieldContainer[ToolSourceStatus]
    collisions: _containers.RepeatedCompositeFieldContainer[ToolNameCollision]
    def __init__(self, tools: _Optional[_Iterable[_Union[_common_pb2.ToolSpec, _Mapping]]] = ..., catalog_version: _Optional[str] = ..., unchanged: _Optional[bool] = ..., sources: _Optional[_Iterable[_Union[ToolSourceStatus, _Mapping]]] = ..., collisions: _Optional[_Iterable[_Union[ToolNameCollision, _Mapping]]] = ...) -> None: ...

class ToolSourceStatus(_message.Message):
    __slots__ = ("name", "kind", "state", "error", "tools")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    state: ToolSourceState
    error: str
    tools: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[ToolSourceState, str]] = ..., error: _Optional[str] = ..., tools: _Optional[int] = ...) -> None: ...

class ToolNameCollision(_message.Message):
    __slots__ = ("tool", "served_by", "skipped")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    tool: str
    served_by: str
    skipped: str
    def __init__(self, tool: _Optional[str] = ..., served_by: _Optional[str] = ..., skipped: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("outcome", "catalog_version")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    outcome: _common_pb2.NodeOutcome
    catalog_version: str
    def __init__(self, outcome: _Optional[_Union[_common_pb2.NodeOutcome, _Mapping]] = ..., catalog_version: _Optional[str] = ...) -> None: ...

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
