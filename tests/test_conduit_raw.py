"""Raw mode (net-conduit parity): real descriptors moved between two real processes."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Callable

import pytest
from conftest import Peer, open_fds

from fdbroker.conduit import Conduit, ConduitError, ErrType, recv_fds_nonblocking, send_with_fds

PeerFactory = Callable[..., Peer]


def is_cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- to another process, proved on the other side -----------------------------------------------------------


def test_pipe_write_end(peer: PeerFactory) -> None:
    p = peer("recv", "pipe-w")
    r, w = os.pipe()
    with Conduit.from_socket(p.sock) as c:
        c.transfer_fd(w)
        assert not is_open(w), "a successful transfer closes the sender's copy"
        assert p.line() == {"cloexec": True}
    assert os.read(r, 100) == b"hello from peer"
    assert os.read(r, 100) == b"", "the only write end left was the peer's, and it closed it"
    os.close(r)
    assert p.finish() == 0


def test_pipe_read_end(peer: PeerFactory) -> None:
    p = peer("recv", "pipe-r")
    r, w = os.pipe()
    with Conduit.from_socket(p.sock) as c:
        c.transfer_fd(r)
        os.write(w, b"to the peer")
        os.close(w)
        assert p.line() == {"cloexec": True, "read": "to the peer"}
    assert p.finish() == 0


def test_tcp_listener_accepts_in_peer(peer: PeerFactory) -> None:
    p = peer("recv", "tcp-listener")
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    with Conduit.from_socket(p.sock) as c:
        c.transfer_socket(lst)
        assert lst.fileno() == -1, "transfer_socket closes the sender's socket object"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(100) == b"hello from peer"
        assert p.line() == {"family": "AF_INET", "type": "SOCK_STREAM", "cloexec": True}
    assert p.finish() == 0


def test_udp_socket(peer: PeerFactory) -> None:
    p = peer("recv", "udp")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    addr = udp.getsockname()
    with Conduit.from_socket(p.sock) as c:
        c.transfer_socket(udp)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"quiet", addr)
            assert client.recvfrom(100)[0] == b"QUIET"
        assert p.line() == {"family": "AF_INET", "type": "SOCK_DGRAM", "cloexec": True}
    assert p.finish() == 0


def test_unix_stream_socket(peer: PeerFactory) -> None:
    p = peer("recv", "unix-stream")
    x, y = socket.socketpair()
    with Conduit.from_socket(p.sock) as c, y:
        c.transfer_socket(x)
        y.settimeout(10)
        assert y.recv(100) == b"ping from peer"
        assert p.line() == {"family": "AF_UNIX", "type": "SOCK_STREAM", "cloexec": True}
    assert p.finish() == 0


def test_regular_file_shares_offset(peer: PeerFactory) -> None:
    p = peer("recv", "file")
    with tempfile.TemporaryFile() as f:
        f.write(b"abc")
        f.flush()
        with Conduit.from_socket(p.sock) as c:
            c.transfer_fd(f.fileno(), keep=True)
            assert is_open(f.fileno()), "keep=True keeps the sender's copy"
            assert p.line() == {"cloexec": True}
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 6, "the peer's write moved our shared offset"
        assert os.pread(f.fileno(), 10, 0) == b"abcdef"
    assert p.finish() == 0


def test_memfd(peer: PeerFactory) -> None:
    p = peer("recv", "memfd")
    fd = os.memfd_create("conduit-test")
    os.write(fd, b"data")
    keep = os.dup(fd)
    with Conduit.from_socket(p.sock) as c:
        c.transfer_fd(fd)
        assert p.line() == {"cloexec": True, "read": "data"}
    assert os.pread(keep, 4, 0) == b"XYZa"
    os.close(keep)
    assert p.finish() == 0


def test_eventfd(peer: PeerFactory) -> None:
    p = peer("recv", "eventfd")
    efd = os.eventfd(0)
    with Conduit.from_socket(p.sock) as c:
        c.transfer_fd(efd, keep=True)
        assert p.line() == {"cloexec": True}
    assert os.eventfd_read(efd) == 7
    os.close(efd)
    assert p.finish() == 0


def test_receive_from_peer_and_write_back(peer: PeerFactory) -> None:
    p = peer("send-pipe")
    with Conduit.from_socket(p.sock) as c:
        w = c.receive_fd(timeout=10)
        assert is_cloexec(w)
        assert p.line() == {"open_after": False}, "the sender's copy was closed after the transfer"
        os.write(w, b"back to you")
        os.close(w)
        assert p.line() == {"read": "back to you"}
    assert p.finish() == 0


# --- net-conduit wire format --------------------------------------------------------------------------------


def test_netconduit_format_sender_to_receive_fd(peer: PeerFactory) -> None:
    p = peer("netconduit-send")
    with Conduit.from_socket(p.sock) as c:
        w = c.receive_fd(timeout=10)
        os.write(w, b"interop")
        os.close(w)
        assert p.line() == {"read": "interop"}
    assert p.finish() == 0


def test_transfer_fd_to_netconduit_format_receiver(peer: PeerFactory) -> None:
    p = peer("netconduit-recv")
    r, w = os.pipe()
    with Conduit.from_socket(p.sock) as c:
        c.transfer_fd(w)
        assert p.line() == {"nbytes": 1, "nfds": 1}, "exactly one byte and one descriptor on the wire"
    assert os.read(r, 100) == b"via net-conduit format"
    os.close(r)
    assert p.finish() == 0


# --- strict receiving ---------------------------------------------------------------------------------------


def test_two_descriptors_to_receive_fd_is_bad_ctrl_mesg_and_both_closed(peer: PeerFactory) -> None:
    p = peer("send-two")
    with Conduit.from_socket(p.sock) as c:
        assert p.line() == {"sent": 2}
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            c.receive_fd(timeout=10)
        assert ei.value.type is ErrType.BAD_CTRL_MESG
        assert open_fds().keys() == before.keys(), "both received descriptors were closed"


def test_foreign_control_message_closes_everything() -> None:
    a, b = Conduit.pair()
    with a, b:
        b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # adds SCM_CREDENTIALS to every message
        r, w = os.pipe()
        a.transfer_fd(r)
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            b.receive_fd()
        assert ei.value.type is ErrType.BAD_CTRL_MESG
        assert open_fds().keys() == before.keys()
        os.close(w)


def test_message_without_descriptor_is_no_fd() -> None:
    a, b = Conduit.pair()
    with a, b:
        a.sock.send(b"x")
        with pytest.raises(ConduitError) as ei:
            b.receive_fd()
        assert ei.value.type is ErrType.NO_FD


def test_eof_is_peer_closed() -> None:
    a, b = Conduit.pair()
    a.close()
    with b, pytest.raises(ConduitError) as ei:
        b.receive_fd()
    assert ei.value.type is ErrType.PEER_CLOSED


def test_transfer_to_closed_peer_is_peer_closed_and_keeps_fd() -> None:
    a, b = Conduit.pair()
    b.close()
    r, w = os.pipe()
    with a, pytest.raises(ConduitError) as ei:
        a.transfer_fd(w)
    assert ei.value.type is ErrType.PEER_CLOSED
    assert is_open(w), "a failed transfer leaves the descriptor with the caller"
    os.close(r)
    os.close(w)


def test_transfer_bad_fd_is_failed_transfer() -> None:
    a, b = Conduit.pair()
    with a, b:
        r, w = os.pipe()
        os.close(w)
        with pytest.raises(ConduitError) as ei:
            a.transfer_fd(w)
        assert ei.value.type is ErrType.FAILED_TRANSFER
        assert ei.value.errno is not None
        os.close(r)


def test_recv_fds_nonblocking_primitive() -> None:
    x, y = socket.socketpair()
    with x, y:
        y.setblocking(False)
        with pytest.raises(BlockingIOError):
            recv_fds_nonblocking(y, 100, 4)
        r, w = os.pipe()
        assert send_with_fds(x, b"hello", [r, w]) == 5
        data, fds = recv_fds_nonblocking(y, 100, 4)
        assert data == b"hello" and len(fds) == 2 and all(is_cloexec(fd) for fd in fds)
        for fd in (r, w, *fds):
            os.close(fd)
        x.close()
        assert recv_fds_nonblocking(y, 100, 4) == (b"", [])


def test_recv_fds_nonblocking_truncation_keeps_data() -> None:
    x, y = socket.socketpair()
    with x, y:
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(10)]
        send_with_fds(x, b"abc", fds)
        for fd in fds:
            os.close(fd)
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            recv_fds_nonblocking(y, 100, 3)
        assert ei.value.type is ErrType.BAD_CTRL_MESG
        assert ei.value.data == b"abc", "the consumed bytes travel with the error"
        assert open_fds().keys() == before.keys()


def test_receivers_are_cloexec_for_every_api() -> None:
    a, b = Conduit.pair()
    with a, b:
        s1, s2 = socket.socketpair()
        a.transfer_socket(s1)
        got = b.receive_socket()
        assert is_cloexec(got.fileno()) and got.family == socket.AF_UNIX
        got.close()
        s2.close()
        with tempfile.TemporaryFile() as f:
            a.transfer_file(f, keep=True)
            g = b.receive_file("rb")
            assert is_cloexec(g.fileno())
            g.close()


def test_receive_socket_of_non_socket_is_bad_clone_and_closed() -> None:
    a, b = Conduit.pair()
    with a, b:
        r, w = os.pipe()
        a.transfer_fd(r)
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            b.receive_socket()
        assert ei.value.type is ErrType.BAD_CLONE
        assert open_fds().keys() == before.keys()
        os.close(w)


# --- constructors -------------------------------------------------------------------------------------------


def test_from_socket_rejects_tcp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(ConduitError) as ei:
            Conduit.from_socket(s)
        assert ei.value.type is ErrType.BAD_CLONE
        assert s.fileno() >= 0, "a refused socket stays the caller's"


def test_from_fd_rejects_non_socket_and_leaves_it_open() -> None:
    r, w = os.pipe()
    with pytest.raises(ConduitError) as ei:
        Conduit.from_fd(r)
    assert ei.value.type is ErrType.BAD_CLONE
    assert is_open(r)
    os.close(r)
    os.close(w)


def test_from_fd_owned_and_not_owned_and_from_file() -> None:
    x, y = socket.socketpair()
    c = Conduit.from_fd(x.fileno(), owned=False)
    c.close()
    assert is_open(x.fileno()), "owned=False works on a duplicate"
    c2 = Conduit.from_file(x)
    c2.close()
    assert is_open(x.fileno())
    fd = x.detach()
    c3 = Conduit.from_fd(fd)
    c3.close()
    assert not is_open(fd), "owned=True: closing the conduit closes the descriptor"
    y.close()


def test_connect_and_peer_credentials(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "c.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    with srv, Conduit.connect(path, timeout=5) as c:
        conn, _ = srv.accept()
        with Conduit.from_socket(conn) as s:
            assert s.peer_credentials() == (os.getpid(), os.getuid(), os.getgid())
            assert c.peer_credentials().pid == os.getpid()


def test_connect_failures_are_typed(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ConduitError) as ei:
        Conduit.connect(os.path.join(os.fspath(tmp_path), "nothing.sock"), timeout=1)
    assert ei.value.type is ErrType.FAILED_TRANSFER and ei.value.errno == 2


# --- timeouts and signals -----------------------------------------------------------------------------------


def test_receive_timeout_fires() -> None:
    a, b = Conduit.pair(timeout=0.05)
    with a, b:
        with pytest.raises(ConduitError) as ei:
            b.receive_fd()
        assert ei.value.type is ErrType.TIMEOUT
        with pytest.raises(ConduitError) as ei:
            b.receive_fds(timeout=0.05)
        assert ei.value.type is ErrType.TIMEOUT


def test_batch_timeout_midway_closes_what_arrived() -> None:
    a, b = Conduit.pair()
    with a, b:
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
        # Only the first message of a 300-descriptor batch: header + 253.
        from fdbroker.conduit.send import batch_messages, send_message

        data, chunk = next(iter(batch_messages(fds)))
        send_message(a.sock, data, chunk)
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            b.receive_fds(timeout=0.1)
        assert ei.value.type is ErrType.TIMEOUT
        assert open_fds().keys() == before.keys()
        for fd in fds:
            os.close(fd)


def test_send_timeout_fires_when_peer_does_not_read() -> None:
    a, b = Conduit.pair()
    with a, b:
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        r, w = os.pipe()
        with pytest.raises(ConduitError) as ei:
            for _ in range(100000):
                a.transfer_fd(r, keep=True, timeout=0.05)
        assert ei.value.type is ErrType.TIMEOUT
        assert is_open(r)
        os.close(r)
        os.close(w)


def test_eintr_is_retried() -> None:
    a, b = Conduit.pair()
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *_: hits.append(1))
    try:
        r, w = os.pipe()
        t = threading.Timer(0.3, a.transfer_fd, args=(w,))
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        t.start()
        fd = b.receive_fd(timeout=10)
        signal.setitimer(signal.ITIMER_REAL, 0)
        t.join()
        assert hits, "the receive was interrupted by signals"
        os.write(fd, b"!")
        assert os.read(r, 1) == b"!"
        os.close(fd)
        os.close(r)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        a.close()
        b.close()


# --- batches ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 253, 254, 506, 1000])
def test_batch_round_trip_in_process(n: int) -> None:
    a, b = Conduit.pair()
    with a, b:
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
        t = threading.Thread(target=a.transfer_fds, args=(fds,))
        t.start()
        got = b.receive_fds(timeout=10)
        t.join()
        assert len(got) == n and len(set(got)) == n
        assert all(is_cloexec(fd) for fd in got)
        assert not any(is_open(fd) for fd in fds if fd not in got), "sender copies were closed"
        for fd in got:
            os.close(fd)


def test_thousand_descriptors_from_another_process(peer: PeerFactory) -> None:
    p = peer("send-batch", "1000")
    with Conduit.from_socket(p.sock) as c:
        got = c.receive_fds(timeout=30)
        assert len(got) == 1000
        assert all(os.readlink(f"/proc/self/fd/{fd}") == "/dev/null" for fd in got)
        report = p.line()
        assert report["sent"] == 1000
        assert isinstance(report["left"], int) and report["left"] < 50, "the sender closed its copies"
        for fd in got:
            os.close(fd)
    assert p.finish() == 0


def test_batch_limit_refuses() -> None:
    a, b = Conduit.pair()
    with a, b:
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]
        a.transfer_fds(fds, keep=True)
        before = open_fds()
        with pytest.raises(ConduitError) as ei:
            b.receive_fds(limit=4)
        assert ei.value.type is ErrType.BAD_FRAME
        assert open_fds().keys() == before.keys()
        for fd in fds:
            os.close(fd)


def test_low_rlimit_receiver_gets_clean_error_without_leak(peer: PeerFactory) -> None:
    p = peer("recv-batch-rlimit", "40")
    with Conduit.from_socket(p.sock) as c:
        assert p.sock.recv(1) == b"r"
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(200)]
        c.transfer_fds(fds)
        report = p.line()
        assert report["error"] == "BAD_CTRL_MESG"
        assert report["after"] == report["before"], "nothing of the batch stayed open in the receiver"
    assert p.finish() == 0


def test_peer_dies_mid_batch_is_peer_closed_and_nothing_leaks() -> None:
    a, b = Conduit.pair()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
    from fdbroker.conduit.send import batch_messages, send_message

    data, chunk = next(iter(batch_messages(fds)))
    send_message(a.sock, data, chunk)
    a.close()
    before = open_fds()
    with b, pytest.raises(ConduitError) as ei:
        b.receive_fds(timeout=5)
    assert ei.value.type is ErrType.PEER_CLOSED
    assert set(open_fds()) <= set(before)
    for fd in fds:
        os.close(fd)
