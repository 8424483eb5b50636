import datetime

from fdbroker.v1 import broker_pb2 as _broker_pb2
from fdbroker.v1 import handover_pb2 as _handover_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConduitFrame(_message.Message):
    __slots__ = ("fd_count", "welcome", "deposit", "deposited", "deliver", "redeem", "ack", "acked", "error", "ping", "pong", "handover_begin", "handover_entries", "handover_done", "handover_ack", "handover_released", "query", "query_result")
    FD_COUNT_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    DEPOSIT_FIELD_NUMBER: _ClassVar[int]
    DEPOSITED_FIELD_NUMBER: _ClassVar[int]
    DELIVER_FIELD_NUMBER: _ClassVar[int]
    REDEEM_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_BEGIN_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_DONE_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_ACK_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_RELEASED_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    QUERY_RESULT_FIELD_NUMBER: _ClassVar[int]
    fd_count: int
    welcome: Welcome
    deposit: Deposit
    deposited: Deposited
    deliver: Deliver
    redeem: Redeem
    ack: Ack
    acked: Acked
    error: Error
    ping: Ping
    pong: Pong
    handover_begin: _handover_pb2.HandoverBegin
    handover_entries: _handover_pb2.HandoverEntries
    handover_done: _handover_pb2.HandoverDone
    handover_ack: _handover_pb2.HandoverAck
    handover_released: _handover_pb2.HandoverReleased
    query: Query
    query_result: QueryResult
    def __init__(self, fd_count: _Optional[int] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., deposit: _Optional[_Union[Deposit, _Mapping]] = ..., deposited: _Optional[_Union[Deposited, _Mapping]] = ..., deliver: _Optional[_Union[Deliver, _Mapping]] = ..., redeem: _Optional[_Union[Redeem, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., acked: _Optional[_Union[Acked, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., handover_begin: _Optional[_Union[_handover_pb2.HandoverBegin, _Mapping]] = ..., handover_entries: _Optional[_Union[_handover_pb2.HandoverEntries, _Mapping]] = ..., handover_done: _Optional[_Union[_handover_pb2.HandoverDone, _Mapping]] = ..., handover_ack: _Optional[_Union[_handover_pb2.HandoverAck, _Mapping]] = ..., handover_released: _Optional[_Union[_handover_pb2.HandoverReleased, _Mapping]] = ..., query: _Optional[_Union[Query, _Mapping]] = ..., query_result: _Optional[_Union[QueryResult, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("session_id", "identity", "version", "max_frame_bytes", "token_ttl")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TTL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    identity: _broker_pb2.Identity
    version: str
    max_frame_bytes: int
    token_ttl: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., identity: _Optional[_Union[_broker_pb2.Identity, _Mapping]] = ..., version: _Optional[str] = ..., max_frame_bytes: _Optional[int] = ..., token_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Deposit(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Deposited(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DepositResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DepositResult, _Mapping]]] = ...) -> None: ...

class DepositResult(_message.Message):
    __slots__ = ("token", "name", "revision", "error", "entry")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    name: str
    revision: int
    error: Error
    entry: _broker_pb2.Entry
    def __init__(self, token: _Optional[bytes] = ..., name: _Optional[str] = ..., revision: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., entry: _Optional[_Union[_broker_pb2.Entry, _Mapping]] = ...) -> None: ...

class Deliver(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DeliverItem]
    def __init__(self, items: _Optional[_Iterable[_Union[DeliverItem, _Mapping]]] = ...) -> None: ...

class DeliverItem(_message.Message):
    __slots__ = ("token", "name", "operation", "info", "revision", "prefetch_tokens", "prefetch_expire_time")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    name: str
    operation: _broker_pb2.Operation
    info: _broker_pb2.DescriptorInfo
    revision: int
    prefetch_tokens: _containers.RepeatedScalarFieldContainer[bytes]
    prefetch_expire_time: _timestamp_pb2.Timestamp
    def __init__(self, token: _Optional[bytes] = ..., name: _Optional[str] = ..., operation: _Optional[_Union[_broker_pb2.Operation, str]] = ..., info: _Optional[_Union[_broker_pb2.DescriptorInfo, _Mapping]] = ..., revision: _Optional[int] = ..., prefetch_tokens: _Optional[_Iterable[bytes]] = ..., prefetch_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Redeem(_message.Message):
    __slots__ = ("tokens", "refill")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFILL_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    refill: int
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ..., refill: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Acked(_message.Message):
    __slots__ = ("tokens", "revision")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    revision: int
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ..., revision: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "token", "name")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    token: bytes
    name: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., token: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("id", "list", "stat", "info")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    id: int
    list: _broker_pb2.ListRequest
    stat: _broker_pb2.StatRequest
    info: _broker_pb2.GetInfoRequest
    def __init__(self, id: _Optional[int] = ..., list: _Optional[_Union[_broker_pb2.ListRequest, _Mapping]] = ..., stat: _Optional[_Union[_broker_pb2.StatRequest, _Mapping]] = ..., info: _Optional[_Union[_broker_pb2.GetInfoRequest, _Mapping]] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("id", "list", "stat", "info", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    list: _broker_pb2.ListResponse
    stat: _broker_pb2.StatResponse
    info: _broker_pb2.GetInfoResponse
    error: Error
    def __init__(self, id: _Optional[int] = ..., list: _Optional[_Union[_broker_pb2.ListResponse, _Mapping]] = ..., stat: _Optional[_Union[_broker_pb2.StatResponse, _Mapping]] = ..., info: _Optional[_Union[_broker_pb2.GetInfoResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...
