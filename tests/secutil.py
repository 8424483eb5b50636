"""Helpers for the adversarial end-to-end tests: a raw conduit that sends what a well-behaved client never
would, kernel-level checks of what the broker holds, custom brokers, and clients run as another uid."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from fdbroker.conduit.frames import Frame, FrameDecoder, encode_frame
from fdbroker.testing import BrokerProcess, checked_broker
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc
from fdbroker.v1 import conduit_pb2 as cpb

SRC = str(Path(__file__).resolve().parents[1] / "src")
NOBODY = 65534


def holds(pid: int, fd: int) -> bool:
    """Does process ``pid`` have the open file description behind our ``fd`` (same inode) open?"""
    st = os.fstat(fd)
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            o = os.stat(f"/proc/{pid}/fd/{name}")
            if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


class Probe:
    """A pipe whose write end we send to the broker: it is closed by the broker iff the read end sees EOF
    once we dropped our own copy. ``send_fd`` is what goes on the wire."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    @property
    def send_fd(self) -> int:
        return self.w

    def drop_ours(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def closed_everywhere(self, timeout: float = 5.0) -> bool:
        """True once no process holds the write end any more (the read end sees EOF)."""
        self.drop_ours()
        ready, _, _ = select.select([self.r], [], [], timeout)
        return bool(ready) and os.read(self.r, 1) == b""

    def close(self) -> None:
        self.drop_ours()
        if self.r >= 0:
            os.close(self.r)
            self.r = -1


class RawConduit:
    """A conduit connection driven by hand. ``session_id`` from the Welcome frame."""

    def __init__(self, run_dir: Path | str, *, welcome: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(Path(run_dir) / "conduit.sock"))
        self.decoder = FrameDecoder()
        self.queue: list[Frame | Exception] = []
        self.session_id = ""
        if welcome:
            f = self.recv()
            assert f.message.WhichOneof("body") == "welcome", f.message
            self.session_id = f.message.welcome.session_id
            self.identity = f.message.welcome.identity

    def send(self, message: cpb.ConduitFrame, fds: Sequence[int] = (), fd_count: int | None = None) -> None:
        data = encode_frame(message, len(fds) if fd_count is None else fd_count)
        self.send_raw(data, fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            n = socket.send_fds(self.sock, [data], list(fds))
            if n < len(data):
                self.sock.sendall(data[n:])
        else:
            self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> Frame:
        """The next frame (descriptors closed: we never want the broker's copies in these tests)."""
        deadline = time.monotonic() + timeout
        while not self.queue:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the broker")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 17, 253)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise EOFError("broker closed the conduit")
            self.queue.extend(self.decoder.feed(data, fds))
        item = self.queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def recv_kind(self, kind: str, timeout: float = 10.0) -> Any:
        f = self.recv(timeout)
        got = f.message.WhichOneof("body")
        fds = list(f.fds)
        f.close_fds()
        assert got == kind, f"expected a {kind} frame, got {f.message}"
        return getattr(f.message, kind), fds

    def frames_until_eof(self, timeout: float = 10.0) -> list[cpb.ConduitFrame]:
        out: list[cpb.ConduitFrame] = []
        with contextlib.suppress(EOFError, ConnectionResetError):
            while True:
                f = self.recv(timeout)
                f.close_fds()
                out.append(f.message)
        return out

    def close(self) -> None:
        self.decoder.close()
        for item in self.queue:
            if isinstance(item, Frame):
                item.close_fds()
        self.queue.clear()
        self.sock.close()

    def __enter__(self) -> RawConduit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Control:
    """A bare gRPC stub on control.sock, calling as a session (or anonymously)."""

    def __init__(self, run_dir: Path | str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{Path(run_dir) / 'control.sock'}")
        self.stub = pb_grpc.FdBrokerStub(self.channel)

    def call(self, method: str, request: Any, session: str | None = None) -> Any:
        md = [("fdbroker-session", session)] if session else []
        return getattr(self.stub, method)(request, metadata=md, timeout=10)

    def put_token(self, session: str, name: str, **kw: Any) -> bytes:
        return bytes(self.call("Put", pb.PutRequest(name=name, **kw), session).handoff.token)

    def snapshot(self) -> list[tuple[str, int]]:
        """The registry as (name, revision) pairs, and nothing changes it."""
        return [(e.name, e.revision) for e in self.call("List", pb.ListRequest()).entries]

    def revision(self) -> int:
        return int(self.call("GetInfo", pb.GetInfoRequest()).header.revision)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_run_dir() -> Path:
    """A fresh run directory path whose parent other uids may traverse (short: sun_path is 108 bytes)."""
    parent = Path(tempfile.mkdtemp(prefix="fdb-", dir="/tmp"))
    os.chmod(parent, 0o755)
    return parent / "run"


def custom_broker(
    args: Sequence[str] = (), preexec: Sequence[str] = (), run_dir: Path | None = None
) -> contextlib.AbstractContextManager[BrokerProcess]:
    """A broker started with extra arguments; leak-checked and stopped cleanly at the end."""
    return checked_broker(args, preexec=preexec, run_dir=run_dir or new_run_dir())


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def unprivileged_python() -> list[str] | None:
    """A command prefix running Python as uid/gid 65534 with fdbroker importable, or None if impossible.

    The venv's interpreter may live under a directory other uids cannot enter (/root), so a system Python of
    the same version runs with the venv's site-packages on its path.
    """
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    env = ["env", "-i", f"PYTHONPATH={SRC}:{_site_packages()}", "PATH=/usr/bin:/bin"]
    for py in candidates:
        cmd = [*setpriv, *env, py]
        try:
            r = subprocess.run(
                [*cmd, "-c", "import fdbroker.client.sync, grpc, os; print(os.getuid())"],
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.strip() == str(NOBODY):
            return cmd
    return None


def run_as(
    prefix: list[str],
    code: str,
    *,
    timeout: float = 30,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        *prefix[:-1],
        *[f"{k}={v}" for k, v in (env or {}).items()],
        prefix[-1],
        "-c",
        textwrap.dedent(code),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    if check and r.returncode != 0:
        raise AssertionError(f"client failed ({r.returncode}):\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def error_frame(f: cpb.ConduitFrame) -> cpb.Error:
    assert f.WhichOneof("body") == "error", f
    return f.error


def prefix_only(n: int) -> bytes:
    return struct.pack(">I", n)
