"""The other process in the conduit tests: ``python conduit_peer.py SOCKFD COMMAND [ARGS]``.

SOCKFD is an inherited AF_UNIX stream socket. The peer does one thing and prints one JSON line on stdout with
what it saw; the test asserts on it. It never trusts the test: every received descriptor is proved by using
it.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import socket
import struct
import sys
import time

from fdbroker.conduit import Conduit, ConduitError, FramedConduit
from fdbroker.v1 import conduit_pb2 as cpb


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def report(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def recv_kind(c: Conduit, kind: str) -> None:
    """Receives one descriptor of `kind` and proves it works."""
    if kind in ("tcp-listener", "udp", "unix-stream"):
        s = c.receive_socket(timeout=10)
        info = {"family": s.family.name, "type": s.type.name, "cloexec": cloexec(s.fileno())}
        if kind == "tcp-listener":
            conn, _ = s.accept()
            conn.sendall(b"hello from peer")
            conn.close()
        elif kind == "udp":
            data, addr = s.recvfrom(100)
            s.sendto(data.upper(), addr)
        else:
            s.sendall(b"ping from peer")
        s.close()
        report(**info)
        return
    fd = c.receive_fd(timeout=10)
    info = {"cloexec": cloexec(fd)}
    if kind == "pipe-w":
        os.write(fd, b"hello from peer")
    elif kind == "pipe-r":
        info["read"] = os.read(fd, 100).decode()
    elif kind == "file":
        os.write(fd, b"def")  # at the shared offset
    elif kind == "memfd":
        info["read"] = os.pread(fd, 4, 0).decode()
        os.pwrite(fd, b"XYZ", 0)
    elif kind == "eventfd":
        os.eventfd_write(fd, 7)
    os.close(fd)
    report(**info)


def main() -> None:
    sockfd = int(sys.argv[1])
    cmd = sys.argv[2]
    args = sys.argv[3:]
    sock = socket.socket(fileno=sockfd)
    if cmd == "recv":
        with Conduit.from_socket(sock) as c:
            recv_kind(c, args[0])
    elif cmd == "send-pipe":
        # Sends the write end of a fresh pipe, then (after the test wrote through it) reads what came.
        r, w = os.pipe()
        with Conduit.from_socket(sock) as c:
            c.transfer_fd(w)
            report(open_after=os.path.exists(f"/proc/self/fd/{w}") and os.readlink(f"/proc/self/fd/{w}"))
            report(read=os.read(r, 100).decode())
    elif cmd == "send-batch":
        n = int(args[0])
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
        with Conduit.from_socket(sock) as c:
            c.transfer_fds(fds)
            report(sent=n, left=len(os.listdir("/proc/self/fd")))
            sock.recv(1)  # wait for the test to finish
    elif cmd == "recv-batch-rlimit":
        limit = int(args[0])
        with Conduit.from_socket(sock) as c:
            base = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            sock.send(b"r")  # ready
            try:
                got = c.receive_fds(timeout=10)
                report(ok=len(got))
            except ConduitError as e:
                report(error=e.type.name, before=base, after=len(os.listdir("/proc/self/fd")))
    elif cmd == "netconduit-send":
        # What net-conduit's TransferFD puts on the wire: one byte, one descriptor.
        r, w = os.pipe()
        socket.send_fds(sock, [b"\x00"], [w])
        os.close(w)
        report(read=os.read(r, 100).decode())
    elif cmd == "netconduit-recv":
        msg, fds, _flags, _ = socket.recv_fds(sock, 16, 4, socket.MSG_CMSG_CLOEXEC)
        for fd in fds:
            os.write(fd, b"via net-conduit format")
            os.close(fd)
        report(nbytes=len(msg), nfds=len(fds))
    elif cmd == "send-two":
        r, w = os.pipe()
        socket.send_fds(sock, [b"\x00"], [r, w])
        os.close(r)
        os.close(w)
        report(sent=2)
        sock.recv(1)
    elif cmd == "garbage":
        sock.sendall(bytes(args[0], "latin-1") if args else b"\xff\xff\xff\xffgarbage")
        sock.recv(1)
    elif cmd == "truncated-frame":
        # A valid length prefix, half a body, a descriptor attached, then hang up.
        body = cpb.ConduitFrame(fd_count=1, ping=cpb.Ping(nonce=1)).SerializeToString()
        r, w = os.pipe()
        socket.send_fds(sock, [struct.pack(">I", len(body)) + body[:2]], [r])
        report(sent=True)
    elif cmd == "die-mid-frame":
        body = cpb.ConduitFrame(fd_count=2, ping=cpb.Ping(nonce=1)).SerializeToString()
        r, w = os.pipe()
        socket.send_fds(sock, [struct.pack(">I", len(body) + 100) + body], [r, w])
        time.sleep(0.05)
        os._exit(3)  # dies: the kernel closes the socket mid-frame
    elif cmd == "framed-echo":
        # Echo frames back with their descriptors, until EOF.
        with FramedConduit.from_socket(sock, timeout=10) as fc:
            while True:
                try:
                    f = fc.recv()
                except ConduitError as e:
                    report(end=e.type.name)
                    return
                fc.send(f.message, f.fds)
                f.close_fds()
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
