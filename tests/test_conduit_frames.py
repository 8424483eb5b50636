"""Framed protocol: the decoder's attribution rule, property tests, and framed endpoints across processes."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Callable

import pytest
from conftest import Peer, open_fds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdbroker.conduit import (
    AsyncFramedConduit,
    ConduitError,
    ErrType,
    Frame,
    FramedConduit,
    FrameDecoder,
    async_receive_fds,
    async_transfer_fds,
    encode_frame,
    send_with_fds,
)
from fdbroker.conduit.lean import redeem_frame
from fdbroker.v1 import conduit_pb2 as cpb

PeerFactory = Callable[..., Peer]


def ping(n: int = 1) -> cpb.ConduitFrame:
    return cpb.ConduitFrame(ping=cpb.Ping(nonce=n))


def devnull(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def frames_only(items: list[Frame | ConduitError]) -> list[Frame]:
    out = [i for i in items if isinstance(i, Frame)]
    assert len(out) == len(items), f"unexpected errors: {items}"
    return out


# --- encoder / decoder --------------------------------------------------------------------------------------


def test_encode_layout() -> None:
    data = encode_frame(ping(5), 2)
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    m = cpb.ConduitFrame.FromString(data[4:])
    assert m.fd_count == 2 and m.ping.nonce == 5


def test_encode_limits() -> None:
    with pytest.raises(ValueError):
        encode_frame(ping(), 254)
    with pytest.raises(ValueError):
        encode_frame(cpb.ConduitFrame(error=cpb.Error(message="x" * 70000)))
    with pytest.raises(ValueError):
        encode_frame(cpb.ConduitFrame())  # zero-length body


def test_decoder_attributes_fds_to_the_frame_that_starts_in_their_read() -> None:
    d = FrameDecoder()
    a = encode_frame(ping(1))
    b = encode_frame(ping(2), 2)
    fds = devnull(2)
    # One read holding a whole fd-less frame and the first half of the frame with descriptors.
    out = frames_only(d.feed(a + b[:3], fds))
    assert [f.message.ping.nonce for f in out] == [1] and out[0].fds == []
    assert d.pending_fds == 2
    out = frames_only(d.feed(b[3:]))
    assert out[0].message.ping.nonce == 2 and out[0].fds == fds
    out[0].close_fds()


def test_decoder_unsolicited_descriptors_are_closed() -> None:
    d = FrameDecoder()
    before = open_fds()
    out = d.feed(encode_frame(ping()), devnull(3))
    assert isinstance(out[0], Frame) and out[0].fds == []
    assert isinstance(out[1], ConduitError) and out[1].type is ErrType.BAD_CTRL_MESG
    assert open_fds().keys() == before.keys()


def test_decoder_frame_claiming_more_than_arrived() -> None:
    d = FrameDecoder()
    before = open_fds()
    out = d.feed(encode_frame(ping(), 3), devnull(2))
    assert len(out) == 1 and isinstance(out[0], ConduitError) and out[0].type is ErrType.NO_FD
    assert open_fds().keys() == before.keys()
    # Not fatal: the next frame decodes.
    assert frames_only(d.feed(encode_frame(ping(9))))[0].message.ping.nonce == 9


def test_decoder_fatal_errors_close_everything() -> None:
    for bad in (b"\x00\x00\x00\x00", struct.pack(">I", 65537), struct.pack(">I", 3) + b"\xff\xff\xff"):
        d = FrameDecoder()
        held = d.feed(encode_frame(ping(), 1)[:6], devnull(1))
        assert held == []
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            d.feed(encode_frame(ping(), 1)[6:] + bad)
        assert ei.value.type is ErrType.BAD_FRAME
        # The frame completed by this data claimed its fd, but the error came later in the same call: all
        # closed.
        assert len(open_fds()) <= len(before)
        with pytest.raises(ConduitError):
            d.feed(b"more", devnull(1))  # a broken decoder closes what it is given
        d.close()


def test_decoder_fd_count_over_limit_is_fatal() -> None:
    body = cpb.ConduitFrame(fd_count=300, ping=cpb.Ping()).SerializeToString()
    with pytest.raises(ConduitError) as ei:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert ei.value.type is ErrType.BAD_FRAME


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=300),
    st.lists(st.integers(0, 300), max_size=6),
    st.lists(st.integers(0, 3), max_size=6),
)
def test_property_arbitrary_bytes_never_crash_or_leak(data: bytes, cuts: list[int], nfds: list[int]) -> None:
    base = fd_count()
    d = FrameDecoder(max_frame_bytes=200)
    pieces = [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)]
    try:
        for i, piece in enumerate(pieces):
            fds = devnull(nfds[i] if i < len(nfds) else 0)
            for item in d.feed(piece, fds):
                if isinstance(item, Frame):
                    assert len(item.fds) == item.message.fd_count
                    item.close_fds()
                else:
                    assert isinstance(item, ConduitError)
    except ConduitError as e:
        assert e.type is ErrType.BAD_FRAME
    d.close()
    assert fd_count() == base


messages = st.builds(
    lambda kind, n, text: [
        ping(n),
        cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[text.encode()] * (n % 4))),
        cpb.ConduitFrame(error=cpb.Error(code=n % 17, message=text)),
    ][kind],
    st.integers(0, 2),
    st.integers(0, 2**32),
    st.text(max_size=40),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(messages, st.integers(0, 4)), min_size=1, max_size=8), st.data())
def test_property_round_trip_in_arbitrary_splits(
    frames: list[tuple[cpb.ConduitFrame, int]], data: st.DataObject
) -> None:
    # Draw everything first: hypothesis may abandon an example at any draw, and nothing may be open then.
    wires = [encode_frame(msg, n) for msg, n in frames]
    cuts = []
    for wire in wires:
        # The kernel gives the fds to the read holding the frame's first byte, which ends within this frame.
        cut1 = data.draw(st.integers(1, len(wire)))
        cuts.append((cut1, data.draw(st.integers(cut1, len(wire)))))
    base = fd_count()
    d = FrameDecoder()
    got: list[Frame] = []
    try:
        for wire, (n_fds, (cut1, cut2)) in zip(
            wires, zip([n for _, n in frames], cuts, strict=True), strict=True
        ):
            fds = devnull(n_fds)
            for piece, pfds in ((wire[:cut1], fds), (wire[cut1:cut2], []), (wire[cut2:], [])):
                got.extend(frames_only(d.feed(piece, pfds)))
        assert [f.message for f in got] == [m for m, _ in frames]
        assert [len(f.fds) for f in got] == [n for _, n in frames]
        assert d.pending_bytes == 0 and d.pending_fds == 0
    finally:
        for f in got:
            f.close_fds()
        d.close()
    assert fd_count() == base


# --- FramedConduit ------------------------------------------------------------------------------------------


def pair() -> tuple[FramedConduit, FramedConduit]:
    x, y = socket.socketpair()
    return FramedConduit(x), FramedConduit(y)


def test_framed_round_trip_with_echo_peer(peer: PeerFactory) -> None:
    p = peer("framed-echo")
    with FramedConduit.from_socket(p.sock, timeout=10) as fc:
        r, w = os.pipe()
        fc.send(ping(42), [w])
        os.close(w)
        f = fc.recv()
        assert f.message.ping.nonce == 42 and f.message.fd_count == 1 and len(f.fds) == 1
        os.write(f.fds[0], b"round")
        f.close_fds()
        assert os.read(r, 10) == b"round"
        os.close(r)
        many = devnull(253)
        fc.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[b"t"] * 3)), many)
        f = fc.recv()
        assert len(f.fds) == 253
        f.close_fds()
        for fd in many:
            os.close(fd)
        fc.send(ping(1))
        assert fc.recv().fds == []
        with pytest.raises(ValueError):
            fc.send(ping(), devnull(0) + list(range(254)))
    assert p.line() == {"end": "PEER_CLOSED"}
    assert p.finish() == 0


def test_framed_garbage_from_peer_is_bad_frame(peer: PeerFactory) -> None:
    p = peer("garbage")
    with FramedConduit.from_socket(p.sock, timeout=10) as fc:
        with pytest.raises(ConduitError) as ei:
            fc.recv()
        assert ei.value.type is ErrType.BAD_FRAME
    p.finish()


def test_framed_truncated_frame_then_hangup(peer: PeerFactory) -> None:
    p = peer("truncated-frame")
    with FramedConduit.from_socket(p.sock, timeout=10) as fc:
        assert p.line() == {"sent": True}
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            fc.recv()
        assert ei.value.type is ErrType.PEER_CLOSED
        assert set(open_fds()) <= set(before), "the descriptor held for the cut-off frame was closed"
    p.finish()


def test_framed_peer_dies_mid_frame(peer: PeerFactory) -> None:
    p = peer("die-mid-frame")
    with FramedConduit.from_socket(p.sock, timeout=10) as fc:
        with pytest.raises(ConduitError) as ei:
            fc.recv()
        assert ei.value.type is ErrType.PEER_CLOSED
    assert p.finish() == 3


def test_framed_frame_claiming_more_fds_than_sent_is_dropped_and_conduit_survives() -> None:
    a, b = pair()
    with a, b:
        before = open_fds()
        fds = devnull(1)
        send_with_fds(a._sock, encode_frame(ping(2), 3), fds)  # claims 3, carries 1
        os.close(fds[0])
        a.send(ping(3))
        with pytest.raises(ConduitError) as ei:
            b.recv(timeout=5)
        assert ei.value.type is ErrType.NO_FD
        assert open_fds().keys() == before.keys(), "the one that came was closed"
        f = b.recv(timeout=5)
        assert f.message.ping.nonce == 3 and f.fds == []


def test_framed_unsolicited_order() -> None:
    a, b = pair()
    with a, b:
        before = open_fds()
        fds = devnull(2)
        send_with_fds(a._sock, encode_frame(ping(1)), fds)
        for fd in fds:
            os.close(fd)
        f = b.recv(timeout=5)
        assert f.message.ping.nonce == 1 and f.fds == []
        with pytest.raises(ConduitError) as ei:
            b.recv(timeout=5)
        assert ei.value.type is ErrType.BAD_CTRL_MESG
        assert open_fds().keys() == before.keys()


def test_framed_timeout_and_threads() -> None:
    a, b = pair()
    with a, b:
        with pytest.raises(ConduitError) as ei:
            b.recv(timeout=0.05)
        assert ei.value.type is ErrType.TIMEOUT
        results: list[int] = []

        def reader() -> None:
            for _ in range(200):
                f = b.recv(timeout=10)
                results.append(f.message.ping.nonce)
                f.close_fds()

        t = threading.Thread(target=reader)
        t.start()
        for i in range(200):
            fds = devnull(i % 3)
            a.send(ping(i), fds, timeout=10)
            for fd in fds:
                os.close(fd)
        t.join()
        assert results == list(range(200))


def test_framed_close_wakes_blocked_receiver() -> None:
    a, b = pair()
    errors: list[ErrType] = []

    def reader() -> None:
        try:
            b.recv()
        except ConduitError as e:
            errors.append(e.type)

    t = threading.Thread(target=reader)
    t.start()
    import time

    time.sleep(0.05)
    b.close()
    t.join(timeout=10)
    assert not t.is_alive() and errors == [ErrType.PEER_CLOSED]
    a.close()


# --- asyncio ------------------------------------------------------------------------------------------------


def test_async_framed_and_raw_batches(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "a.sock")

    async def main() -> None:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen()
        srv.setblocking(False)
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(srv))
        client = await AsyncFramedConduit.open(path, timeout=5)
        conn, _ = await accept
        srv.close()
        server = AsyncFramedConduit(conn)
        with pytest.raises(ConduitError) as ei:
            await server.recv(timeout=0.05)
        assert ei.value.type is ErrType.TIMEOUT
        r, w = os.pipe()
        await client.send(ping(7), [w])
        os.close(w)
        f = await server.recv(timeout=5)
        assert f.message.ping.nonce == 7 and len(f.fds) == 1
        os.write(f.fds[0], b"A")
        f.close_fds()
        assert os.read(r, 1) == b"A"
        os.close(r)
        client.close()
        with pytest.raises(ConduitError) as ei:
            await server.recv(timeout=5)
        assert ei.value.type is ErrType.PEER_CLOSED
        server.close()

        x, y = socket.socketpair()
        x.setblocking(False)
        y.setblocking(False)
        fds = devnull(600)
        sender = asyncio.ensure_future(async_transfer_fds(x, fds))
        got = await async_receive_fds(y)
        await sender
        assert len(got) == 600
        for fd in got:
            os.close(fd)
        x.close()
        y.close()

    asyncio.run(main())


@pytest.mark.parametrize("token", [b"t" * 32, b"short", b""])
@pytest.mark.parametrize("refill", [0, 1, 127, 128, 256, 1024, 300_000])
def test_a_spliced_redeem_parses_as_the_generated_class_with_its_refill(token: bytes, refill: int) -> None:
    data = redeem_frame(token, refill)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    frame = cpb.ConduitFrame.FromString(data[4:])
    assert list(frame.redeem.tokens) == [token] and frame.redeem.refill == refill
    assert data[4:] == frame.SerializeToString()  # canonical: what the broker's native reader expects
