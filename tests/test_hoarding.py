"""Descriptor hoarding on the conduit (issue 7, section 3): one connection, or many connections of one uid, must
not be able to fill the broker's descriptor table by holding descriptors in frames that never complete.

* The decoder holds at most the descriptors of the one frame in progress: descriptors that arrive with a read in
  which no frame starts are closed and the stream is given up (property tests on :class:`FrameDecoder`).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdbroker.conduit import SCM_MAX_FD, ConduitError, ErrType, Frame, FrameDecoder, encode_frame
from fdbroker.v1 import broker_pb2 as pb

# -- the decoder's rule, as properties ---------------------------------------------------------------------------

# Never opened: the decoder only moves descriptor numbers around, and a Recorder stands in for closing them.
_fake_fds = itertools.count(1_000_000)


class Recorder:
    """A decoder's ``close`` callable that records what it is given instead of closing anything."""

    def __init__(self) -> None:
        self.closed: list[int] = []

    def __call__(self, fds: list[int]) -> None:
        self.closed.extend(fds)


messages = st.one_of(
    st.builds(lambda n: pb.ConduitFrame(ping=pb.Ping(nonce=n)), st.integers(0, 2**64 - 1)),
    st.builds(
        lambda toks: pb.ConduitFrame(deposit=pb.Deposit(tokens=toks)),
        st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    ),
    st.builds(lambda text: pb.ConduitFrame(error=pb.Error(code=3, message=text)), st.text(max_size=200)),
)
fd_counts = st.one_of(st.integers(0, 3), st.just(SCM_MAX_FD), st.integers(0, SCM_MAX_FD))


def kernel_reads(
    length: int, cuts: set[int], sends: list[tuple[int, int, list[int]]]
) -> list[tuple[int, int, list[int]]]:
    """How ``recvmsg`` hands out a stream of ``length`` bytes: ``sends`` are the ``(start, end, fds)`` of the
    ``sendmsg`` calls that carried descriptors, ``cuts`` where the reader's buffer happened to end a read.

    As the kernel does on a Unix stream socket: a read returns the descriptors of the send whose first byte it
    reads, and ends within that send (it may begin with bytes of earlier sends). So each read gets the
    descriptors of at most one send.
    """
    cuts = {c for c in cuts if 0 < c < length}
    for start, end, _ in sorted(sends):
        read_end = min((c for c in cuts if c > start), default=length)
        if read_end > end:
            cuts.add(end)
    bounds = [0, *sorted(cuts), length]
    reads = []
    for a, b in itertools.pairwise(bounds):
        fds = [fd for start, _, send_fds in sends if a <= start < b for fd in send_fds]
        reads.append((a, b, fds))
    return reads


def feed_all(
    d: FrameDecoder, wire: bytes, reads: list[tuple[int, int, list[int]]]
) -> tuple[list[Frame], list[ConduitError], ConduitError | None, int]:
    """Feed every read; stop at a fatal error. Returns frames, non-fatal errors, the fatal error (or None) and
    the index of the read that raised it. Checks after every read that at most 253 descriptors are held."""
    frames: list[Frame] = []
    problems: list[ConduitError] = []
    for i, (a, b, fds) in enumerate(reads):
        try:
            out = d.feed(wire[a:b], fds)
        except ConduitError as err:
            assert d.pending_fds == 0
            return frames, problems, err, i
        for item in out:
            if isinstance(item, Frame):
                frames.append(item)
            else:
                problems.append(item)
        assert d.pending_fds <= SCM_MAX_FD
    return frames, problems, None, -1


def build(stream: list[tuple[pb.ConduitFrame, int]]) -> tuple[bytes, list[int], list[list[int]]]:
    wires = [encode_frame(msg, n) for msg, n in stream]
    starts = list(itertools.accumulate((len(w) for w in wires), initial=0))
    return b"".join(wires), starts, [[next(_fake_fds) for _ in range(n)] for _, n in stream]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messages, fd_counts), min_size=1, max_size=6), st.data())
def test_property_descriptors_on_first_bytes_decode_exactly(
    stream: list[tuple[pb.ConduitFrame, int]], data: st.DataObject
) -> None:
    wire, starts, fds = build(stream)
    cuts = set(data.draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=12)))
    # Each frame with descriptors goes out with a sendmsg of its own, its descriptors on its first byte.
    sends = [(starts[i], starts[i + 1], fds[i]) for i in range(len(stream)) if fds[i]]
    rec = Recorder()
    d = FrameDecoder(close=rec)
    frames, problems, fatal, _ = feed_all(d, wire, kernel_reads(len(wire), cuts, sends))
    assert fatal is None and problems == []
    assert [f.message for f in frames] == [m for m, _ in stream]
    assert [f.fds for f in frames] == fds, "each frame got exactly its own descriptors, in order"
    assert rec.closed == []
    assert d.pending_bytes == 0 and d.pending_fds == 0
    frames[0].close_fds()  # a frame hands its descriptors to the decoder's close callable
    assert rec.closed == fds[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messages, fd_counts), min_size=1, max_size=6), st.data())
def test_property_descriptors_on_any_other_byte_are_closed(
    stream: list[tuple[pb.ConduitFrame, int]], data: st.DataObject
) -> None:
    wire, starts, fds = build(stream)
    # A send that starts inside frame j (not on its first byte) carries descriptors too.
    j = data.draw(st.integers(0, len(stream) - 1))
    p = data.draw(st.integers(starts[j] + 1, starts[j + 1] - 1))
    bad = [next(_fake_fds) for _ in range(data.draw(st.integers(1, SCM_MAX_FD)))]
    cuts = set(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=12)))
    sends = [(starts[i], p if i == j else starts[i + 1], fds[i]) for i in range(len(stream)) if fds[i]]
    sends.append((p, starts[j + 1], bad))
    reads = kernel_reads(len(wire), cuts, sends)
    rec = Recorder()
    d = FrameDecoder(close=rec)
    frames, problems, fatal, at = feed_all(d, wire, reads)

    given_fds = [fd for _, _, r in reads[: at + 1 if fatal else len(reads)] for fd in r]
    returned = [fd for f in frames for fd in f.fds]
    assert sorted(returned + rec.closed) == sorted(given_fds), "every descriptor is returned or closed, once"
    assert set(bad) <= set(rec.closed), "the descriptors on a byte other than a frame's first were closed"
    # Frames decoded before any fatal error are the stream's own, each with exactly its descriptors.
    assert [f.message for f in frames] == [m for m, _ in stream[: len(frames)]]
    assert [f.fds for f in frames] == fds[: len(frames)]
    a, b, _ = next(r for r in reads if r[0] <= p < r[1])
    frame_starts_in_read = any(a <= s < b for s in starts[:-1])
    if frame_starts_in_read:
        # Only possible when frame j carries no descriptors: the read that begins it glued on the bad send, so
        # the descriptors are that read's, unclaimed: reported, closed, and the stream goes on.
        assert fatal is None and any(e.type is ErrType.BAD_CTRL_MESG for e in problems)
        assert [f.message for f in frames] == [m for m, _ in stream]
    else:
        assert fatal is not None and fatal.type is ErrType.BAD_FRAME, (fatal, problems)
        assert "unsolicited" in fatal.message and "drop the connection" in fatal.message
        assert reads[at][0] == a, "the read that brought them raised"
        with pytest.raises(ConduitError):
            d.feed(b"\x00", [next(_fake_fds)])  # broken for good, and closes what it is given
        assert d.pending_fds == 0


def test_decoder_hoarding_pattern_is_refused_at_the_first_unsolicited_batch() -> None:
    """The attack of issue 7 against the decoder alone: today it would hold 253 more per byte."""
    rec = Recorder()
    d = FrameDecoder(close=rec)
    assert d.feed(b"\x00\x00\xff\xff") == []  # a length prefix announcing 65535 bytes
    assert d.frame_remaining == 65535
    batch = [next(_fake_fds) for _ in range(SCM_MAX_FD)]
    with pytest.raises(ConduitError) as ei:
        d.feed(b"x", batch)
    assert ei.value.type is ErrType.BAD_FRAME and "unsolicited" in ei.value.message
    assert rec.closed == batch and d.pending_fds == 0 and d.pending_bytes == 0


def test_decoder_keeps_the_tail_of_one_frame_plus_the_start_of_the_next() -> None:
    rec = Recorder()
    d = FrameDecoder(close=rec)
    a = encode_frame(pb.ConduitFrame(ping=pb.Ping(nonce=1)), 2)
    b = encode_frame(pb.ConduitFrame(ping=pb.Ping(nonce=2)), 3)
    fa = [next(_fake_fds) for _ in range(2)]
    fb = [next(_fake_fds) for _ in range(3)]
    assert d.feed(a[:2], fa) == []  # inside a's length prefix
    assert d.frame_remaining == 2
    assert d.feed(a[2:5]) == []
    assert d.frame_remaining == len(a) - 5
    out = d.feed(a[5:] + b[:1], fb)  # a's tail and b's first byte, with b's descriptors
    assert [(f.message.ping.nonce, f.fds) for f in out if isinstance(f, Frame)] == [(1, fa)]
    assert d.pending_fds == 3
    out = d.feed(b[1:])
    assert [(f.message.ping.nonce, f.fds) for f in out if isinstance(f, Frame)] == [(2, fb)]
    assert rec.closed == []


def test_decoder_refuses_more_than_253_descriptors_in_one_read() -> None:
    rec = Recorder()
    d = FrameDecoder(close=rec)
    batch = [next(_fake_fds) for _ in range(SCM_MAX_FD + 1)]
    with pytest.raises(ConduitError) as ei:
        d.feed(encode_frame(pb.ConduitFrame(ping=pb.Ping()), 3), batch)
    assert ei.value.type is ErrType.BAD_FRAME
    assert rec.closed == batch
