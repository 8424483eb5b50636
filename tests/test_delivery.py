"""The hand-spliced Deliver frames parse back, field for field, as the generated protobuf messages."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from fdbroker.broker.delivery import (
    FRAME_OVERHEAD,
    deliver_frames,
    encode_deliver,
    in_frames,
    item_tail,
)
from fdbroker.conduit.frames import Frame, FrameDecoder
from fdbroker.conduit.lean import varint
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

names = st.from_regex(r"[a-z0-9]{1,20}(/[a-z0-9._-]{1,20}){0,3}", fullmatch=True)
infos = st.builds(
    lambda k, p, f: pb.DescriptorInfo(kind=k, path=p, flags=f, summary=f"{p} summary"),
    st.sampled_from(list(pb.Kind.values())),
    st.text(max_size=40),
    st.lists(st.sampled_from(["O_APPEND", "O_NONBLOCK"]), max_size=2),
)


@given(
    st.lists(
        st.tuples(
            st.binary(min_size=32, max_size=32),
            st.sampled_from([2, 3, 4]),
            names,
            infos,
            st.integers(0, 2**63),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_encode_deliver_parses_back(items):
    data = encode_deliver(
        [(t, op, item_tail(n, i.SerializeToString(), r)) for t, op, n, i, r in items], len(items)
    )
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    frame = cpb.ConduitFrame.FromString(data[4:])
    assert frame.fd_count == len(items)
    assert frame.WhichOneof("body") == "deliver"
    got = frame.deliver.items
    assert len(got) == len(items)
    for g, (t, op, n, i, r) in zip(got, items, strict=True):
        assert (g.token, g.operation, g.name, g.info, g.revision) == (t, op, n, i, r)


@given(st.integers(1, 2**64 - 1))
def test_varint_matches_protobuf(n):
    # proto3 omits a zero field, so the oracle covers n >= 1; zero is one zero byte.
    assert varint(n) == cpb.Pong(nonce=n).SerializeToString()[1:]
    assert varint(0) == b"\x00"


def test_decoder_accepts_spliced_frame():
    data = encode_deliver(
        [(b"t" * 32, 2, item_tail("a/b", pb.DescriptorInfo(kind=pb.KIND_PIPE).SerializeToString(), 7))], 0
    )
    # fd_count 0 with no descriptors attached: the decoder yields the frame as is
    (frame,) = FrameDecoder().feed(data, [])
    assert isinstance(frame, Frame), frame
    assert frame.message.deliver.items[0].name == "a/b"


@given(
    st.lists(st.integers(1, 70_000), max_size=600),
    st.sampled_from([1024, 4096, 65536]),
)
def test_answers_are_split_into_frames_that_fit_in_order(costs: list[int], max_frame_bytes: int) -> None:
    """Every part in exactly one run, in order; at most 253 per run; a run of several fits the frame (with the
    frame's own fields); a run is cut only where the next part would not fit or the count is full."""
    runs = in_frames(costs, max_frame_bytes)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(costs)))
    for k, (a, b) in enumerate(runs):
        assert 0 < b - a <= 253
        body = sum(costs[a:b])
        assert b - a == 1 or body + FRAME_OVERHEAD <= max_frame_bytes
        if k + 1 < len(runs) and b - a < 253:
            assert body + costs[b] + FRAME_OVERHEAD > max_frame_bytes


def test_deliver_frames_parse_back_whole_and_fit() -> None:
    info = pb.DescriptorInfo(kind=pb.KIND_TCP_LISTENER, path="p" * 4000).SerializeToString()
    items = [(bytes([i]) * 32, 2, item_tail(f"n/{i:03d}" + "x" * 240, info, i + 1)) for i in range(253)]
    frames = deliver_frames(items, 65536)
    assert len(frames) > 1
    got = []
    for data, a, b in frames:
        assert struct.unpack(">I", data[:4])[0] == len(data) - 4 <= 65536
        m = cpb.ConduitFrame.FromString(data[4:])
        assert m.fd_count == b - a == len(m.deliver.items)
        got += [(i.token, i.name) for i in m.deliver.items]
    assert got == [(t, f"n/{i:03d}" + "x" * 240) for i, (t, _, _) in enumerate(items)]
