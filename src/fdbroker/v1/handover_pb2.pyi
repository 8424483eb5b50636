import datetime

from fdbroker.v1 import broker_pb2 as _broker_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandoverBegin(_message.Message):
    __slots__ = ("version", "pid", "revision", "epoch", "entries")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    revision: int
    epoch: int
    entries: int
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., revision: _Optional[int] = ..., epoch: _Optional[int] = ..., entries: _Optional[int] = ...) -> None: ...

class HandoverEntry(_message.Message):
    __slots__ = ("entry", "ttl_remaining")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    TTL_REMAINING_FIELD_NUMBER: _ClassVar[int]
    entry: _broker_pb2.Entry
    ttl_remaining: _duration_pb2.Duration
    def __init__(self, entry: _Optional[_Union[_broker_pb2.Entry, _Mapping]] = ..., ttl_remaining: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class HandoverEntries(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HandoverEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[HandoverEntry, _Mapping]]] = ...) -> None: ...

class HandoverDone(_message.Message):
    __slots__ = ("entries", "revision")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    entries: int
    revision: int
    def __init__(self, entries: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class HandoverAck(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: int
    def __init__(self, entries: _Optional[int] = ...) -> None: ...

class HandoverReleased(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
