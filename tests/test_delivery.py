"""The hand-spliced Deliver frames parse back, field for field, as the generated protobuf messages."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from fdbroker.broker.delivery import encode_deliver, item_tail, varint
from fdbroker.conduit.frames import Frame, FrameDecoder
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
