"""The handover's entry frames, in process: what the old broker splices from cached bytes is the message the
generated classes build, and what the successor decodes from it is the entry :func:`restore` would install.

(The protocol end to end, with real processes, failures before the ack included, is tests/test_survival.py.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from fdbroker import fdinfo
from fdbroker.broker.leasing import LeaseTable
from fdbroker.broker.registry import Entry, Owner, PutOptions, Registry
from fdbroker.broker.survival.carry import MAX_FRAME_BYTES, restore
from fdbroker.broker.survival.giving import encode_entries
from fdbroker.broker.survival.receiving import decode_entries
from fdbroker.conduit.frames import FramedConduit
from fdbroker.v1 import broker_pb2 as pb
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


def test_spliced_frame_travels_with_its_descriptors(source: Registry) -> None:
    x, y = socket.socketpair()
    a, b = FramedConduit(x, timeout=10), FramedConduit(y, timeout=10, max_frame_bytes=MAX_FRAME_BYTES)
    try:
        chunk = source.in_order()[:253]
        now = source.clock()
        a.send_raw(encode_entries(chunk, now), [e.fd for e in chunk])
        frame = b.recv()
        try:
            assert frame.message == built(chunk, now)
            assert len(frame.fds) == 253
            assert all(
                os.fstat(fd).st_ino == os.fstat(e.fd).st_ino for fd, e in zip(frame.fds, chunk, strict=True)
            )
        finally:
            frame.close_fds()
    finally:
        a.close()
        b.close()


def test_spliced_frame_over_the_limit_is_refused(source: Registry) -> None:
    chunk = source.in_order()[:10]
    size = len(encode_entries(chunk, 0.0)) - 4
    assert len(encode_entries(chunk, 0.0, size)) == size + 4
    with pytest.raises(ValueError, match="over"):
        encode_entries(chunk, 0.0, size - 1)


def test_decoded_entries_are_what_restore_installs(source: Registry, pipe: int) -> None:
    now = source.clock()
    frames = [built(source.in_order()[i : i + 253], now) for i in range(0, len(source), 253)]
    fast = Registry(capacity=1000)
    slow = Registry(capacity=1000)
    leases: list[tuple[str, pb.LeaseHolder]] = []
    try:
        for frame in frames:
            items = frame.handover_entries.entries
            fast.install(decode_entries(items, [os.dup(pipe) for _ in items], fast, 1, leases))
            for item in items:
                e = item.entry
                ttl = item.ttl_remaining.ToNanoseconds() / 1e9 if item.HasField("ttl_remaining") else None
                restore(
                    slow,
                    e.name,
                    os.dup(pipe),
                    e.info,
                    Owner(e.owner.pid, e.owner.uid, e.owner.gid),
                    labels=dict(e.labels),
                    create_time=e.create_time.ToNanoseconds() / 1e9,
                    create_revision=e.create_revision,
                    revision=e.revision,
                    expires_in=ttl,
                    expire_time=e.expire_time.ToNanoseconds() / 1e9 if e.HasField("expire_time") else None,
                    ephemeral=e.ephemeral,
                    session_id="handover" if e.ephemeral else "",
                    lease_epoch=e.lease.epoch,
                )
        assert leases == []  # no holder in the source
        assert len(fast) == len(slow) == len(source)
        assert fast.revision == slow.revision == source.revision
        for a, b, orig in zip(fast.in_order(), slow.in_order(), source.in_order(), strict=True):
            assert a.name == b.name == orig.name
            assert (a.info_bytes, a.owner, a.labels, a.create_revision, a.revision) == (
                b.info_bytes,
                b.owner,
                b.labels,
                b.create_revision,
                b.revision,
            )
            assert (a.ephemeral, a.session_id, a.expire_time) == (b.ephemeral, b.session_id, b.expire_time)
            assert abs(a.create_time - b.create_time) < 1e-6
            assert (a.expires_at is None) == (b.expires_at is None)
            if a.expires_at is not None and b.expires_at is not None:
                assert abs(a.expires_at - b.expires_at) < 0.5
            assert (a.lease and a.lease.epoch) == (b.lease and b.lease.epoch)
            # The successor shows the entry exactly as the old broker did.
            assert a.to_pb() == b.to_pb() == orig.to_pb()
        assert fast.get("leased").lease.epoch == 77  # type: ignore[union-attr]
        assert fast.count_for_uid(OWNER.uid) == len(source)
        assert [e.name for e in fast.due(fast.clock() + 1.0)] == ["expiring/now"]
    finally:
        fast.close_all()
        slow.close_all()


def test_decode_takes_the_lease_holders_and_builds_their_entries_form_again(pipe: int) -> None:
    held = pb.Entry(name="locks/db", revision=9, create_revision=3)
    held.info.kind = pb.KIND_PIPE
    held.owner.uid = os.getuid()
    held.lease.epoch = 12
    holder = held.lease.holders.add(lease_id="L1", epoch=12)
    plain = pb.Entry(name="plain")  # revision 0: the floor
    items = [hpb.HandoverEntry(entry=held), hpb.HandoverEntry(entry=plain)]
    reg = Registry(capacity=10)
    leases: list[tuple[str, pb.LeaseHolder]] = []
    try:
        reg.install(decode_entries(items, [os.dup(pipe), os.dup(pipe)], reg, 40, leases))
        assert leases == [("locks/db", holder)]
        e = reg.get("locks/db")
        assert e.lease is not None and e.lease.epoch == 12 and not e.lease.holders
        assert not e.to_pb().lease.holders  # not the form that came: its holders stay behind
        assert e.to_pb().lease.epoch == 12
        p = reg.get("plain")
        assert p.revision == p.create_revision == 40 and reg.revision == 40
    finally:
        reg.close_all()
