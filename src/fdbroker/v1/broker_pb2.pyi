import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KIND_TCP_LISTENER: _ClassVar[Kind]
    KIND_TCP_STREAM: _ClassVar[Kind]
    KIND_UDP: _ClassVar[Kind]
    KIND_UNIX_LISTENER: _ClassVar[Kind]
    KIND_UNIX_STREAM: _ClassVar[Kind]
    KIND_UNIX_DGRAM: _ClassVar[Kind]
    KIND_SOCKET_OTHER: _ClassVar[Kind]
    KIND_FILE: _ClassVar[Kind]
    KIND_DIRECTORY: _ClassVar[Kind]
    KIND_PIPE: _ClassVar[Kind]
    KIND_FIFO: _ClassVar[Kind]
    KIND_MEMFD: _ClassVar[Kind]
    KIND_EVENTFD: _ClassVar[Kind]
    KIND_TIMERFD: _ClassVar[Kind]
    KIND_SIGNALFD: _ClassVar[Kind]
    KIND_PIDFD: _ClassVar[Kind]
    KIND_CHAR_DEVICE: _ClassVar[Kind]
    KIND_OTHER: _ClassVar[Kind]

class AccessMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_MODE_UNSPECIFIED: _ClassVar[AccessMode]
    ACCESS_MODE_READ: _ClassVar[AccessMode]
    ACCESS_MODE_WRITE: _ClassVar[AccessMode]
    ACCESS_MODE_READ_WRITE: _ClassVar[AccessMode]

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNSPECIFIED: _ClassVar[Operation]
    OPERATION_PUT: _ClassVar[Operation]
    OPERATION_GET: _ClassVar[Operation]
    OPERATION_TAKE: _ClassVar[Operation]
    OPERATION_LEASE: _ClassVar[Operation]
    OPERATION_CHECKIN: _ClassVar[Operation]
KIND_UNSPECIFIED: Kind
KIND_TCP_LISTENER: Kind
KIND_TCP_STREAM: Kind
KIND_UDP: Kind
KIND_UNIX_LISTENER: Kind
KIND_UNIX_STREAM: Kind
KIND_UNIX_DGRAM: Kind
KIND_SOCKET_OTHER: Kind
KIND_FILE: Kind
KIND_DIRECTORY: Kind
KIND_PIPE: Kind
KIND_FIFO: Kind
KIND_MEMFD: Kind
KIND_EVENTFD: Kind
KIND_TIMERFD: Kind
KIND_SIGNALFD: Kind
KIND_PIDFD: Kind
KIND_CHAR_DEVICE: Kind
KIND_OTHER: Kind
ACCESS_MODE_UNSPECIFIED: AccessMode
ACCESS_MODE_READ: AccessMode
ACCESS_MODE_WRITE: AccessMode
ACCESS_MODE_READ_WRITE: AccessMode
OPERATION_UNSPECIFIED: Operation
OPERATION_PUT: Operation
OPERATION_GET: Operation
OPERATION_TAKE: Operation
OPERATION_LEASE: Operation
OPERATION_CHECKIN: Operation

class Identity(_message.Message):
    __slots__ = ("pid", "uid", "gid")
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    uid: int
    gid: int
    def __init__(self, pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ...) -> None: ...

class DescriptorInfo(_message.Message):
    __slots__ = ("kind", "family", "local_address", "peer_address", "listening", "path", "access_mode", "flags", "summary")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LISTENING_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ACCESS_MODE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    kind: Kind
    family: str
    local_address: str
    peer_address: str
    listening: bool
    path: str
    access_mode: AccessMode
    flags: _containers.RepeatedScalarFieldContainer[str]
    summary: str
    def __init__(self, kind: _Optional[_Union[Kind, str]] = ..., family: _Optional[str] = ..., local_address: _Optional[str] = ..., peer_address: _Optional[str] = ..., listening: _Optional[bool] = ..., path: _Optional[str] = ..., access_mode: _Optional[_Union[AccessMode, str]] = ..., flags: _Optional[_Iterable[str]] = ..., summary: _Optional[str] = ...) -> None: ...

class LeaseState(_message.Message):
    __slots__ = ("mode", "holders", "epoch", "waiters")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[LeaseState.Mode]
        MODE_EXCLUSIVE: _ClassVar[LeaseState.Mode]
        MODE_SHARED: _ClassVar[LeaseState.Mode]
    MODE_UNSPECIFIED: LeaseState.Mode
    MODE_EXCLUSIVE: LeaseState.Mode
    MODE_SHARED: LeaseState.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    mode: LeaseState.Mode
    holders: _containers.RepeatedCompositeFieldContainer[LeaseHolder]
    epoch: int
    waiters: int
    def __init__(self, mode: _Optional[_Union[LeaseState.Mode, str]] = ..., holders: _Optional[_Iterable[_Union[LeaseHolder, _Mapping]]] = ..., epoch: _Optional[int] = ..., waiters: _Optional[int] = ...) -> None: ...

class LeaseHolder(_message.Message):
    __slots__ = ("lease_id", "identity", "epoch", "expire_time")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    identity: Identity
    epoch: int
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ..., epoch: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("name", "info", "owner", "labels", "create_time", "revision", "create_revision", "expire_time", "ephemeral", "lease")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    name: str
    info: DescriptorInfo
    owner: Identity
    labels: _containers.ScalarMap[str, str]
    create_time: _timestamp_pb2.Timestamp
    revision: int
    create_revision: int
    expire_time: _timestamp_pb2.Timestamp
    ephemeral: bool
    lease: LeaseState
    def __init__(self, name: _Optional[str] = ..., info: _Optional[_Union[DescriptorInfo, _Mapping]] = ..., owner: _Optional[_Union[Identity, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ..., create_revision: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ephemeral: _Optional[bool] = ..., lease: _Optional[_Union[LeaseState, _Mapping]] = ...) -> None: ...

class EntryOptions(_message.Message):
    __slots__ = ("labels", "ttl", "ephemeral")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    ttl: _duration_pb2.Duration
    ephemeral: bool
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ephemeral: _Optional[bool] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("token", "operation", "name", "expire_time")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    operation: Operation
    name: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, token: _Optional[bytes] = ..., operation: _Optional[_Union[Operation, str]] = ..., name: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ResponseHeader(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "entries", "sessions", "pending_tokens", "max_entries", "max_entries_per_uid", "max_sessions_per_uid", "max_pending_tokens_per_uid", "token_ttl", "caller", "broker_pid", "start_time", "oldest_watch_revision", "max_frame_bytes", "keeper", "header")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_PER_UID_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_UID_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_TOKENS_PER_UID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TTL_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    BROKER_PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WATCH_REVISION_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEPER_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    version: str
    entries: int
    sessions: int
    pending_tokens: int
    max_entries: int
    max_entries_per_uid: int
    max_sessions_per_uid: int
    max_pending_tokens_per_uid: int
    token_ttl: _duration_pb2.Duration
    caller: Identity
    broker_pid: int
    start_time: _timestamp_pb2.Timestamp
    oldest_watch_revision: int
    max_frame_bytes: int
    keeper: KeeperInfo
    header: ResponseHeader
    def __init__(self, version: _Optional[str] = ..., entries: _Optional[int] = ..., sessions: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., max_entries: _Optional[int] = ..., max_entries_per_uid: _Optional[int] = ..., max_sessions_per_uid: _Optional[int] = ..., max_pending_tokens_per_uid: _Optional[int] = ..., token_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., caller: _Optional[_Union[Identity, _Mapping]] = ..., broker_pid: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., oldest_watch_revision: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ..., keeper: _Optional[_Union[KeeperInfo, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class KeeperInfo(_message.Message):
    __slots__ = ("pid", "restarts", "last_exit")
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    pid: int
    restarts: int
    last_exit: str
    def __init__(self, pid: _Optional[int] = ..., restarts: _Optional[int] = ..., last_exit: _Optional[str] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("name", "options", "replace", "if_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    IF_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    options: EntryOptions
    replace: bool
    if_revision: int
    def __init__(self, name: _Optional[str] = ..., options: _Optional[_Union[EntryOptions, _Mapping]] = ..., replace: _Optional[bool] = ..., if_revision: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("handoff", "header")
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    handoff: Handoff
    header: ResponseHeader
    def __init__(self, handoff: _Optional[_Union[Handoff, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class BatchPutRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PutRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[PutRequest, _Mapping]]] = ...) -> None: ...

class BatchPutResponse(_message.Message):
    __slots__ = ("handoffs", "header")
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    handoffs: _containers.RepeatedCompositeFieldContainer[Handoff]
    header: ResponseHeader
    def __init__(self, handoffs: _Optional[_Iterable[_Union[Handoff, _Mapping]]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("name", "prefetch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    prefetch: int
    def __init__(self, name: _Optional[str] = ..., prefetch: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("entry", "handoffs", "prefetch_tokens", "prefetch_expire_time", "header")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    entry: Entry
    handoffs: _containers.RepeatedCompositeFieldContainer[Handoff]
    prefetch_tokens: _containers.RepeatedScalarFieldContainer[bytes]
    prefetch_expire_time: _timestamp_pb2.Timestamp
    header: ResponseHeader
    def __init__(self, entry: _Optional[_Union[Entry, _Mapping]] = ..., handoffs: _Optional[_Iterable[_Union[Handoff, _Mapping]]] = ..., prefetch_tokens: _Optional[_Iterable[bytes]] = ..., prefetch_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("names", "prefetch")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    prefetch: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., prefetch: _Optional[int] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("entries", "handoffs", "prefetch_tokens", "prefetch_expire_time", "header")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    handoffs: _containers.RepeatedCompositeFieldContainer[Handoff]
    prefetch_tokens: _containers.RepeatedScalarFieldContainer[bytes]
    prefetch_expire_time: _timestamp_pb2.Timestamp
    header: ResponseHeader
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., handoffs: _Optional[_Iterable[_Union[Handoff, _Mapping]]] = ..., prefetch_tokens: _Optional[_Iterable[bytes]] = ..., prefetch_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class TakeRequest(_message.Message):
    __slots__ = ("name", "if_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IF_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    if_revision: int
    def __init__(self, name: _Optional[str] = ..., if_revision: _Optional[int] = ...) -> None: ...

class TakeResponse(_message.Message):
    __slots__ = ("entry", "handoff", "header")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    entry: Entry
    handoff: Handoff
    header: ResponseHeader
    def __init__(self, entry: _Optional[_Union[Entry, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("name", "if_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IF_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    if_revision: int
    def __init__(self, name: _Optional[str] = ..., if_revision: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StatResponse(_message.Message):
    __slots__ = ("entry", "header")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    entry: Entry
    header: ResponseHeader
    def __init__(self, entry: _Optional[_Union[Entry, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("prefix", "label_selector", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    label_selector: str
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., label_selector: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("entries", "next_page_token", "header")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_page_token: str
    header: ResponseHeader
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("name", "ttl", "mode", "wait")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    ttl: _duration_pb2.Duration
    mode: LeaseState.Mode
    wait: bool
    def __init__(self, name: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., mode: _Optional[_Union[LeaseState.Mode, str]] = ..., wait: _Optional[bool] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("lease_id", "epoch", "expire_time", "entry", "handoff", "header")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    epoch: int
    expire_time: _timestamp_pb2.Timestamp
    entry: Entry
    handoff: Handoff
    header: ResponseHeader
    def __init__(self, lease_id: _Optional[str] = ..., epoch: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("renewed", "gone", "header")
    class Renewed(_message.Message):
        __slots__ = ("lease_id", "expire_time")
        LEASE_ID_FIELD_NUMBER: _ClassVar[int]
        EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
        lease_id: str
        expire_time: _timestamp_pb2.Timestamp
        def __init__(self, lease_id: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    renewed: _containers.RepeatedCompositeFieldContainer[KeepAliveResponse.Renewed]
    gone: _containers.RepeatedScalarFieldContainer[str]
    header: ResponseHeader
    def __init__(self, renewed: _Optional[_Iterable[_Union[KeepAliveResponse.Renewed, _Mapping]]] = ..., gone: _Optional[_Iterable[str]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "return_descriptor")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    return_descriptor: bool
    def __init__(self, lease_id: _Optional[str] = ..., return_descriptor: _Optional[bool] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("handoff", "header")
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    handoff: Handoff
    header: ResponseHeader
    def __init__(self, handoff: _Optional[_Union[Handoff, _Mapping]] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("prefix", "start_revision")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    start_revision: int
    def __init__(self, prefix: _Optional[str] = ..., start_revision: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("type", "revision", "name", "entry", "reason", "lease_id", "epoch", "time")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[Event.Type]
        TYPE_PUT: _ClassVar[Event.Type]
        TYPE_DELETE: _ClassVar[Event.Type]
        TYPE_EXPIRE: _ClassVar[Event.Type]
        TYPE_LEASE_GRANTED: _ClassVar[Event.Type]
        TYPE_LEASE_RELEASED: _ClassVar[Event.Type]
    TYPE_UNSPECIFIED: Event.Type
    TYPE_PUT: Event.Type
    TYPE_DELETE: Event.Type
    TYPE_EXPIRE: Event.Type
    TYPE_LEASE_GRANTED: Event.Type
    TYPE_LEASE_RELEASED: Event.Type
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Event.Reason]
        REASON_RELEASED: _ClassVar[Event.Reason]
        REASON_EXPIRED: _ClassVar[Event.Reason]
        REASON_HOLDER_DIED: _ClassVar[Event.Reason]
        REASON_ENTRY_REMOVED: _ClassVar[Event.Reason]
        REASON_TAKEN: _ClassVar[Event.Reason]
        REASON_SESSION_ENDED: _ClassVar[Event.Reason]
        REASON_HANDOVER: _ClassVar[Event.Reason]
    REASON_UNSPECIFIED: Event.Reason
    REASON_RELEASED: Event.Reason
    REASON_EXPIRED: Event.Reason
    REASON_HOLDER_DIED: Event.Reason
    REASON_ENTRY_REMOVED: Event.Reason
    REASON_TAKEN: Event.Reason
    REASON_SESSION_ENDED: Event.Reason
    REASON_HANDOVER: Event.Reason
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    type: Event.Type
    revision: int
    name: str
    entry: Entry
    reason: Event.Reason
    lease_id: str
    epoch: int
    time: _timestamp_pb2.Timestamp
    def __init__(self, type: _Optional[_Union[Event.Type, str]] = ..., revision: _Optional[int] = ..., name: _Optional[str] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ..., reason: _Optional[_Union[Event.Reason, str]] = ..., lease_id: _Optional[str] = ..., epoch: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("events", "header_revision", "header")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    HEADER_REVISION_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    header_revision: int
    header: ResponseHeader
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., header_revision: _Optional[int] = ..., header: _Optional[_Union[ResponseHeader, _Mapping]] = ...) -> None: ...
