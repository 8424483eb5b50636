"""fdbroker.fdinfo: every kind, described from real descriptors."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fdbroker.fdinfo import describe, kind_name
from fdbroker.v1 import broker_pb2 as pb

_libc = ctypes.CDLL(None, use_errno=True)
TFD_CLOEXEC = SFD_CLOEXEC = os.O_CLOEXEC
CLOCK_MONOTONIC = 1


class Closer:
    """Closes every descriptor or object registered, so no test leaks."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()

    def fd(self, fd: int) -> int:
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.stack.callback(os.close, fd)
        return fd

    def obj(self, o: socket.socket) -> socket.socket:
        self.stack.callback(o.close)
        return o


@pytest.fixture
def closer() -> Iterator[Closer]:
    c = Closer()
    with c.stack:
        yield c


def check_untouched(fd: int, fn: Callable[[int], pb.DescriptorInfo]) -> pb.DescriptorInfo:
    """describe() must neither close the caller's descriptor nor change its flags."""
    before = fcntl.fcntl(fd, fcntl.F_GETFL), fcntl.fcntl(fd, fcntl.F_GETFD), os.fstat(fd).st_ino
    info = fn(fd)
    after = fcntl.fcntl(fd, fcntl.F_GETFL), fcntl.fcntl(fd, fcntl.F_GETFD), os.fstat(fd).st_ino
    assert before == after
    return info


def d(fd: int) -> pb.DescriptorInfo:
    return check_untouched(fd, describe)


# --- sockets


def test_tcp_listener_ipv4(closer: Closer) -> None:
    s = closer.obj(socket.socket())
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    info = d(s.fileno())
    assert info.kind == pb.KIND_TCP_LISTENER
    assert info.family == "AF_INET"
    assert info.listening
    assert info.local_address == f"127.0.0.1:{port}"
    assert info.peer_address == ""
    assert info.summary == f"tcp listener 127.0.0.1:{port}"
    assert info.access_mode == pb.ACCESS_MODE_READ_WRITE
    # Still a working listener afterwards.
    c = closer.obj(socket.create_connection(("127.0.0.1", port)))
    conn, _ = s.accept()
    closer.obj(conn)
    assert c.send(b"x") == 1
    assert conn.recv(1) == b"x"


def test_tcp_listener_any_and_ipv6(closer: Closer) -> None:
    s = closer.obj(socket.socket())
    s.bind(("0.0.0.0", 0))
    s.listen()
    assert d(s.fileno()).summary == f"tcp listener 0.0.0.0:{s.getsockname()[1]}"
    s6 = closer.obj(socket.socket(socket.AF_INET6))
    s6.bind(("::1", 0))
    s6.listen()
    info = d(s6.fileno())
    assert info.family == "AF_INET6"
    assert info.local_address == f"[::1]:{s6.getsockname()[1]}"
    assert info.summary == f"tcp listener [::1]:{s6.getsockname()[1]}"


def test_tcp_stream_connected_and_unbound(closer: Closer) -> None:
    srv = closer.obj(socket.socket())
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = closer.obj(socket.create_connection(srv.getsockname()))
    info = d(c.fileno())
    assert info.kind == pb.KIND_TCP_STREAM
    assert not info.listening
    assert info.local_address == f"127.0.0.1:{c.getsockname()[1]}"
    assert info.peer_address == f"127.0.0.1:{srv.getsockname()[1]}"
    assert info.summary == f"tcp stream {info.local_address} -> {info.peer_address}"
    unbound = closer.obj(socket.socket(socket.AF_INET6))
    info = d(unbound.fileno())
    assert info.kind == pb.KIND_TCP_STREAM
    assert (info.local_address, info.peer_address) == ("", "")
    assert info.summary == "tcp stream (unbound)"


def test_udp(closer: Closer) -> None:
    u = closer.obj(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    u.bind(("::", 0))
    info = d(u.fileno())
    assert info.kind == pb.KIND_UDP
    assert info.summary == f"udp [::]:{u.getsockname()[1]}"
    assert not info.listening
    u4 = closer.obj(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    u4.connect(("127.0.0.1", 9))
    info = d(u4.fileno())
    assert info.kind == pb.KIND_UDP
    assert info.peer_address == "127.0.0.1:9"
    assert info.summary.startswith("udp 127.0.0.1:") and info.summary.endswith(" -> 127.0.0.1:9")


def test_unix_listener_path_and_abstract(closer: Closer, tmp_path: Path) -> None:
    path = str(tmp_path / "x.sock")
    s = closer.obj(socket.socket(socket.AF_UNIX))
    s.bind(path)
    s.listen()
    info = d(s.fileno())
    assert info.kind == pb.KIND_UNIX_LISTENER
    assert info.family == "AF_UNIX"
    assert info.local_address == path
    assert info.summary == f"unix listener {path}"
    a = closer.obj(socket.socket(socket.AF_UNIX))
    name = f"fdbroker-test-{os.getpid()}"
    a.bind("\0" + name)
    a.listen()
    info = d(a.fileno())
    assert info.local_address == "@" + name
    assert info.summary == f"unix listener @{name}"
    # A connected client: local unbound, peer the listener's path.
    c = closer.obj(socket.socket(socket.AF_UNIX))
    c.connect(path)
    info = d(c.fileno())
    assert info.kind == pb.KIND_UNIX_STREAM
    assert info.peer_address == path
    assert info.summary == f"unix stream (unbound) -> {path}"


def test_unix_socketpair_seqpacket_dgram(closer: Closer, tmp_path: Path) -> None:
    a, b = socket.socketpair()
    closer.obj(a), closer.obj(b)
    info = d(a.fileno())
    assert info.kind == pb.KIND_UNIX_STREAM
    assert info.summary == "unix stream (unbound)"
    sp = closer.obj(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    sp.bind(str(tmp_path / "sp.sock"))
    sp.listen()
    info = d(sp.fileno())
    assert info.kind == pb.KIND_UNIX_LISTENER
    assert "seqpacket" in info.summary
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    closer.obj(x), closer.obj(y)
    assert d(x.fileno()).kind == pb.KIND_UNIX_STREAM
    dg = closer.obj(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    dg.bind(str(tmp_path / "dg.sock"))
    info = d(dg.fileno())
    assert info.kind == pb.KIND_UNIX_DGRAM
    assert info.summary == f"unix dgram {tmp_path / 'dg.sock'}"


def test_other_socket(closer: Closer) -> None:
    n = closer.obj(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    info = d(n.fileno())
    assert info.kind == pb.KIND_SOCKET_OTHER
    assert info.family == "AF_NETLINK"
    assert info.summary == "socket AF_NETLINK/SOCK_RAW (unbound)"


def test_socket_flags_survive_default_timeout(closer: Closer) -> None:
    # socket.socket(fileno=...) sets O_NONBLOCK when a default timeout is set; describe() must undo that.
    s = closer.obj(socket.socket())
    assert not fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    socket.setdefaulttimeout(1.0)
    try:
        info = d(s.fileno())
    finally:
        socket.setdefaulttimeout(None)
    assert "O_NONBLOCK" not in info.flags
    s.setblocking(False)
    assert "O_NONBLOCK" in d(s.fileno()).flags


# --- files and the rest


def test_regular_file_modes(closer: Closer, tmp_path: Path) -> None:
    p = tmp_path / "x.log"
    p.write_text("")
    ap = closer.fd(os.open(p, os.O_WRONLY | os.O_APPEND))
    info = d(ap)
    assert info.kind == pb.KIND_FILE
    assert info.path == str(p)
    assert info.access_mode == pb.ACCESS_MODE_WRITE
    assert info.flags == ["O_APPEND"]
    assert info.summary == f"file {p} (append)"
    ro = closer.fd(os.open(p, os.O_RDONLY))
    info = d(ro)
    assert info.access_mode == pb.ACCESS_MODE_READ
    assert list(info.flags) == []
    assert info.summary == f"file {p} (read)"
    rw = closer.fd(os.open(p, os.O_RDWR | os.O_NONBLOCK | os.O_SYNC | os.O_APPEND))
    info = d(rw)
    assert info.access_mode == pb.ACCESS_MODE_READ_WRITE
    assert set(info.flags) == {"O_APPEND", "O_NONBLOCK", "O_SYNC"}
    assert info.summary == f"file {p} (read-write, append)"
    ds = closer.fd(os.open(p, os.O_WRONLY | os.O_DSYNC))
    assert list(d(ds).flags) == ["O_DSYNC"]


def test_o_direct(closer: Closer, tmp_path: Path) -> None:
    p = tmp_path / "direct"
    p.write_text("")
    try:
        fd = closer.fd(os.open(p, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    assert "O_DIRECT" in d(fd).flags


def test_deleted_file(closer: Closer, tmp_path: Path) -> None:
    p = tmp_path / "gone"
    p.write_text("x")
    fd = closer.fd(os.open(p, os.O_RDONLY))
    p.unlink()
    info = d(fd)
    assert info.kind == pb.KIND_FILE
    assert info.path == f"{p} (deleted)"


def test_directory_and_o_path(closer: Closer, tmp_path: Path) -> None:
    fd = closer.fd(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    info = d(fd)
    assert info.kind == pb.KIND_DIRECTORY
    assert info.path == str(tmp_path)
    assert info.summary == f"directory {tmp_path}"
    pfd = closer.fd(os.open(tmp_path, os.O_PATH))
    info = d(pfd)
    assert info.kind == pb.KIND_DIRECTORY
    assert "O_PATH" in info.flags
    assert info.access_mode == pb.ACCESS_MODE_UNSPECIFIED


def test_pipe_ends(closer: Closer) -> None:
    r, w = os.pipe()
    closer.fd(r), closer.fd(w)
    ri, wi = d(r), d(w)
    assert ri.kind == wi.kind == pb.KIND_PIPE
    assert ri.summary == "pipe (read end)"
    assert wi.summary == "pipe (write end)"
    assert ri.path == ""
    assert ri.access_mode == pb.ACCESS_MODE_READ
    assert wi.access_mode == pb.ACCESS_MODE_WRITE
    # Still a working pipe.
    os.write(w, b"ok")
    assert os.read(r, 2) == b"ok"


def test_fifo(closer: Closer, tmp_path: Path) -> None:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    r = closer.fd(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
    info = d(r)
    assert info.kind == pb.KIND_FIFO
    assert info.path == str(p)
    assert info.summary == f"fifo {p} (read end)"
    assert "O_NONBLOCK" in info.flags


def test_memfd(closer: Closer) -> None:
    fd = closer.fd(os.memfd_create("db-snapshot"))
    info = d(fd)
    assert info.kind == pb.KIND_MEMFD
    assert info.path == "db-snapshot"
    assert info.summary == "memfd:db-snapshot"


def test_eventfd(closer: Closer) -> None:
    fd = closer.fd(os.eventfd(0, os.EFD_CLOEXEC))
    info = d(fd)
    assert info.kind == pb.KIND_EVENTFD
    assert info.summary == "eventfd"


def test_timerfd(closer: Closer) -> None:
    fd = closer.fd(_libc.timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC))
    info = d(fd)
    assert info.kind == pb.KIND_TIMERFD
    assert info.summary == "timerfd"


def test_signalfd(closer: Closer) -> None:
    mask = (ctypes.c_ulong * 16)()  # empty sigset_t (glibc's is 128 bytes)
    fd = closer.fd(_libc.signalfd(-1, ctypes.byref(mask), SFD_CLOEXEC))
    info = d(fd)
    assert info.kind == pb.KIND_SIGNALFD
    assert info.summary == "signalfd"


def test_pidfd(closer: Closer) -> None:
    fd = closer.fd(os.pidfd_open(os.getpid()))
    info = d(fd)
    assert info.kind == pb.KIND_PIDFD
    assert info.summary == "pidfd"


def test_char_device(closer: Closer) -> None:
    fd = closer.fd(os.open("/dev/null", os.O_RDWR))
    info = d(fd)
    assert info.kind == pb.KIND_CHAR_DEVICE
    assert info.path == "/dev/null"
    assert info.summary == "char device /dev/null (read-write)"


def test_other_anon_inode() -> None:
    ep = select.epoll()
    try:
        info = d(ep.fileno())
    finally:
        ep.close()
    assert info.kind == pb.KIND_OTHER
    assert info.summary == "other anon_inode:[eventpoll]"


def test_closed_descriptor_raises(closer: Closer) -> None:
    r, w = os.pipe()
    closer.fd(w)
    os.close(r)
    with pytest.raises(OSError) as ei:
        describe(r)
    assert ei.value.errno == errno.EBADF


def test_kind_names_cover_the_enum() -> None:
    names = {v: kind_name(v) for v in pb.Kind.values()}
    assert len(set(names.values())) == len(names)  # unique
    for v, n in names.items():
        assert n == n.lower() and " " not in n
        enum_tail = pb.Kind.Name(v).removeprefix("KIND_").lower().replace("_", "-")
        assert n == enum_tail or (v, n) in {(pb.KIND_SOCKET_OTHER, "socket")}
    assert kind_name(pb.KIND_TCP_LISTENER) == "tcp-listener"
    assert kind_name(999) == "other"


def test_every_kind_is_reachable_by_describe() -> None:
    # Guard against a Kind added to the proto without a test here (UNSPECIFIED is never produced).
    tested = {
        pb.KIND_TCP_LISTENER,
        pb.KIND_TCP_STREAM,
        pb.KIND_UDP,
        pb.KIND_UNIX_LISTENER,
        pb.KIND_UNIX_STREAM,
        pb.KIND_UNIX_DGRAM,
        pb.KIND_SOCKET_OTHER,
        pb.KIND_FILE,
        pb.KIND_DIRECTORY,
        pb.KIND_PIPE,
        pb.KIND_FIFO,
        pb.KIND_MEMFD,
        pb.KIND_EVENTFD,
        pb.KIND_TIMERFD,
        pb.KIND_SIGNALFD,
        pb.KIND_PIDFD,
        pb.KIND_CHAR_DEVICE,
        pb.KIND_OTHER,
    }
    assert tested | {pb.KIND_UNSPECIFIED} == set(pb.Kind.values())
