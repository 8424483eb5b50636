"""The handover's entry frames, in process: what the old broker splices from cached bytes is the message the
generated classes build.

(The protocol end to end, with real processes, failures before the ack included, is tests/test_survival.py.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fdbroker import fdinfo
from fdbroker.broker.leasing import LeaseTable
from fdbroker.broker.registry import Entry, Owner, PutOptions, Registry
from fdbroker.broker.survival.giving import encode_entries
from fdbroker.v1 import conduit_pb2 as cpb
from fdbroker.v1 import handover_pb2 as hpb

OWNER = Owner(4242, os.getuid(), os.getgid())


@pytest.fixture
def pipe() -> Iterator[int]:
    r, w = os.pipe()
    yield w
    os.close(r)
    os.close(w)


@pytest.fixture
def source(pipe: int) -> Iterator[Registry]:
    """A registry with one entry of every shape a handover carries."""
    reg = Registry(capacity=1000)

    def put(name: str, **opts: object) -> Entry:
        fd = os.dup(pipe)
        return reg.put(name, fd, fdinfo.describe(fd), OWNER, "s", PutOptions(**opts))  # type: ignore[arg-type]

    try:
        put("plain")
        put("labelled", labels={f"k{i}": "v" * 40 for i in range(8)})  # > 127 bytes: multi-byte lengths
        put("expiring", ttl=3600.25)
        put("expiring/now", ttl=0.5)
        put("ephemeral", ephemeral=True)
        leased = put("leased")
        leased.lease = LeaseTable(epoch=77)
        leased.invalidate()
        for i in range(300):  # more than one frame's worth
            put(f"many/{i:03d}")
        yield reg
    finally:
        reg.close_all()


def built(chunk: list[Entry], now: float) -> cpb.ConduitFrame:
    """The frame as the generated classes build it (what giving.py sent before it spliced bytes)."""
    items = []
    for e in chunk:
        item = hpb.HandoverEntry(entry=e.to_pb())
        if e.expires_at is not None:
            item.ttl_remaining.FromNanoseconds(int(max(0.0, e.expires_at - now) * 1e9))
        items.append(item)
    return cpb.ConduitFrame(fd_count=len(chunk), handover_entries=hpb.HandoverEntries(entries=items))


def test_spliced_frame_is_the_message_the_classes_build(source: Registry) -> None:
    entries = source.in_order()
    assert [e.name for e in entries] == sorted(e.name for e in entries)
    for now in (source.clock(), source.clock() + 1.0, source.clock() + 10_000.0):  # ttl left, zero, clamped
        for i in range(0, len(entries), 253):
            chunk = entries[i : i + 253]
            data = encode_entries(chunk, now)
            assert int.from_bytes(data[:4], "big") == len(data) - 4
            want = built(chunk, now)
            assert cpb.ConduitFrame.FromString(data[4:]) == want


def test_spliced_frame_over_the_limit_is_refused(source: Registry) -> None:
    chunk = source.in_order()[:10]
    size = len(encode_entries(chunk, 0.0)) - 4
    assert len(encode_entries(chunk, 0.0, size)) == size + 4
    with pytest.raises(ValueError, match="over"):
        encode_entries(chunk, 0.0, size - 1)
