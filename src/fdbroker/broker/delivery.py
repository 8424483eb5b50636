"""Wire encoding of ``Deliver`` frames from bytes cached per entry.

A delivery is the broker's hottest path (every get, every redeem, every item of a batch), and building a
``DeliverItem`` message per handoff (with a copy of the entry's ``DescriptorInfo``) cost more than the
``sendmsg`` itself. Protobuf's encoding is a concatenation of fields, so the part of an item that depends only
on the entry (name, info, revision) is serialized once per entry revision and reused; a delivery splices the
token and operation in front. The result parses as the ``ConduitFrame``/``Deliver``/``DeliverItem`` of
proto/fdbroker/v1/broker.proto (tests parse it back with the generated classes).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fdbroker.v1 import conduit_pb2 as cpb

_PREFIX = struct.Struct(">I")

# Field keys: (field number << 3) | wire type (0 varint, 2 length-delimited).
_ITEM_TOKEN = b"\x0a"  # DeliverItem.token = 1
_ITEM_OPERATION = b"\x18"  # DeliverItem.operation = 3
_DELIVER_ITEMS = b"\x0a"  # Deliver.items = 1
_FRAME_FD_COUNT = b"\x08"  # ConduitFrame.fd_count = 1
_FRAME_DELIVER = b"\x2a"  # ConduitFrame.deliver = 5


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_ITEM_INFO = b"\x22"  # DeliverItem.info = 4


def item_tail(name: str, info: bytes, revision: int) -> bytes:
    """The entry-dependent fields of a ``DeliverItem`` (name, serialized ``info``, revision), serialized."""
    head = cpb.DeliverItem(name=name, revision=revision).SerializeToString()
    return head + _ITEM_INFO + varint(len(info)) + info


def encode_repeated(key: bytes, payloads: Sequence[bytes]) -> bytes:
    """A repeated message field (``key`` = field number << 3 | 2) from serialized messages."""
    return b"".join([key + varint(len(p)) + p for p in payloads])


def encode_item(token: bytes, operation: int, tail: bytes) -> bytes:
    """One ``Deliver.items`` field: a ``DeliverItem`` of ``token`` (omitted when empty), ``operation``, ``tail``."""
    if token:
        body = b"".join((_ITEM_TOKEN, varint(len(token)), token, _ITEM_OPERATION, varint(operation), tail))
    else:
        body = b"".join((_ITEM_OPERATION, varint(operation), tail))
    return _DELIVER_ITEMS + varint(len(body)) + body


def frame_from_items(items: bytes, fd_count: int) -> bytes:
    """A whole length-prefixed ``ConduitFrame{fd_count, deliver{items}}`` from encoded ``items`` fields."""
    frame = b"".join((_FRAME_FD_COUNT, varint(fd_count), _FRAME_DELIVER, varint(len(items)), items))
    return _PREFIX.pack(len(frame)) + frame


def encode_deliver(items: Sequence[tuple[bytes, int, bytes]], fd_count: int) -> bytes:
    """A whole length-prefixed ``ConduitFrame{fd_count, deliver{items}}`` from ``(token, operation, tail)``."""
    return frame_from_items(b"".join([encode_item(t, op, tail) for t, op, tail in items]), fd_count)
