"""Wire encoding of ``Deliver`` frames from bytes cached per entry, and the split of every answer the broker sends
into frames that fit the connection's ``max_frame_bytes``.

A delivery is the broker's hottest path (every get, every redeem, every item of a batch), and building a
``DeliverItem`` message per handoff (with a copy of the entry's ``DescriptorInfo``) cost more than the
``sendmsg`` itself. Protobuf's encoding is a concatenation of fields, so the part of an item that depends only
on the entry (name, info, revision) is serialized once per entry revision and reused; a delivery splices the
token and operation in front. The result parses as the ``ConduitFrame``/``Deliver``/``DeliverItem`` of
proto/fdbroker/v1/broker.proto (tests parse it back with the generated classes).

Every frame the broker sends fits the ``max_frame_bytes`` it announced in ``Welcome``: an answer with many parts
(``Deliver`` items, ``Deposited`` results, ``Acked`` tokens) is split into several frames of the same kind, in
order (:func:`in_frames`). Clients file each part under its own token, so a split answer reads like a whole one
(docs/conduit-protocol.md §3.1). One part never exceeds a frame: a ``Deliver`` item is its token, a name of at most
255 bytes and a ``DescriptorInfo`` of a few KiB; a ``DepositResult`` an ``Entry`` of at most ~17 KiB.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fdbroker.conduit.frames import SCM_MAX_FD
from fdbroker.conduit.lean import varint
from fdbroker.v1 import conduit_pb2 as cpb

_PREFIX = struct.Struct(">I")

# Field keys: (field number << 3) | wire type (0 varint, 2 length-delimited).
_ITEM_TOKEN = b"\x0a"  # DeliverItem.token = 1
_ITEM_OPERATION = b"\x18"  # DeliverItem.operation = 3
_DELIVER_ITEMS = b"\x0a"  # Deliver.items = 1
_FRAME_FD_COUNT = b"\x08"  # ConduitFrame.fd_count = 1
_FRAME_DELIVER = b"\x2a"  # ConduitFrame.deliver = 5
# What a frame's body holds besides its repeated parts: fd_count (2 bytes up to 253), the body's own key and length
# (1 + 5), and Acked.revision (1 + 10); rounded up.
FRAME_OVERHEAD = 32


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


def field_bytes(size: int) -> int:
    """What one element of ``size`` serialized bytes takes in a repeated field: its key, its length, itself."""
    return 1 + len(varint(size)) + size


def in_frames(costs: Sequence[int], max_frame_bytes: int, most: int = SCM_MAX_FD) -> list[tuple[int, int]]:
    """Split consecutive parts of a repeated field (each taking ``costs[i]`` bytes, :func:`field_bytes`) into
    ``(start, end)`` runs, in order, each of at most ``most`` parts whose frame body stays within
    ``max_frame_bytes``. A part too large for any frame goes alone (see the module docstring: none is)."""
    budget = max_frame_bytes - FRAME_OVERHEAD
    runs: list[tuple[int, int]] = []
    start = used = 0
    for i, cost in enumerate(costs):
        if i > start and (used + cost > budget or i - start >= most):
            runs.append((start, i))
            start, used = i, 0
        used += cost
    if start < len(costs):
        runs.append((start, len(costs)))
    return runs


def deliver_frames(
    items: Sequence[tuple[bytes, int, bytes]], max_frame_bytes: int
) -> list[tuple[bytes, int, int]]:
    """The ``Deliver`` frames of ``(token, operation, tail)`` items, in order, each within ``max_frame_bytes`` and
    253 items: ``(frame, start, end)``, the frame carrying ``items[start:end]`` (attach their descriptors)."""
    encoded = [encode_item(t, op, tail) for t, op, tail in items]
    return [
        (frame_from_items(b"".join(encoded[a:b]), b - a), a, b)
        for a, b in in_frames([len(x) for x in encoded], max_frame_bytes)
    ]
