"""Framed messages: the broker's conduit protocol.

On the wire (``SOCK_STREAM``, ``AF_UNIX``): a 4-byte big-endian unsigned length ``N`` (1 ..
``max_frame_bytes``),
then ``N`` bytes of a serialized ``fdbroker.v1.ConduitFrame``. The frame's ``fd_count`` descriptors (at most
253) ride as ``SCM_RIGHTS`` on the ``sendmsg`` that carries the frame's first byte (its length prefix); a
sender
sends every frame that has descriptors with a ``sendmsg`` of its own.

Attribution rule (the receiver's side, see docs/conduit-protocol.md): the kernel delivers a message's
descriptors with the ``recvmsg`` that reads the message's first byte and ends that read in that message. So
the
descriptors that arrive with one ``recvmsg`` belong to the frame(s) that *start* within the bytes of that
read,
in order, each frame claiming exactly its ``fd_count``. A frame that claims more than are there is refused
(the
ones it got are closed); descriptors no frame claims are unsolicited and closed.

Descriptors that arrive with a read in which *no* frame starts (every byte of it belongs to a frame that began
earlier) cannot belong to anything: a conforming sender never produces them. The decoder closes them and treats
the stream as broken, so that a receiver holds at most the descriptors of the one frame in progress (at most
253) however a peer splits its bytes: without that rule, a length prefix followed by 1-byte sends that each
carry 253 descriptors would pin descriptors without bound while the frame stays incomplete.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from fdbroker import native
from fdbroker.v1 import conduit_pb2 as cpb

from . import lean
from .conduit import Credentials, _connect, peer_credentials
from .errors import ConduitError, ErrType, error_from_oserror
from .receive import SCM_MAX_FD, ancbufsize, close_fds, fds_from_ancdata
from .send import send_with_fds

__all__ = [
    "MAX_FRAME_BYTES",
    "SCM_MAX_FD",
    "Frame",
    "FrameDecoder",
    "FrameReader",
    "FramedConduit",
    "encode_frame",
]

MAX_FRAME_BYTES = 65536
"""Default largest frame body in bytes (the length prefix not counted)."""

_PREFIX = struct.Struct(">I")
_RECV_BYTES = 65536 + 4
_ANCBUF = ancbufsize(SCM_MAX_FD)
_NATIVE = native.load()


def encode_frame(
    message: cpb.ConduitFrame, fd_count: int = 0, max_frame_bytes: int = MAX_FRAME_BYTES
) -> bytes:
    """Sets ``message.fd_count = fd_count`` and returns the length prefix + serialized body.

    ``ValueError`` if ``fd_count`` is outside 0..253 or the body is longer than ``max_frame_bytes``. (An empty
    ``ConduitFrame`` serializes to zero bytes, which is not a valid frame: ``ValueError`` too — set a body.)
    """
    if not 0 <= fd_count <= SCM_MAX_FD:
        raise ValueError(f"a frame carries 0..{SCM_MAX_FD} descriptors, not {fd_count}")
    message.fd_count = fd_count
    body = message.SerializeToString()
    n = len(body)
    if not 0 < n <= max_frame_bytes:
        raise ValueError(f"frame body of {n} bytes is outside 1..{max_frame_bytes}")
    return _PREFIX.pack(n) + body


CloseFds = Callable[[list[int]], None]
"""How a receiver gets rid of descriptors it will not hand on: takes ownership of every one in the list.
The default, :func:`~fdbroker.conduit.receive.close_fds`, closes them at once; the broker passes a callable
that closes them off its event loop (``fdbroker.broker.closer``)."""


@dataclass
class Frame:
    """One received frame and its descriptors (exactly ``message.fd_count``, close-on-exec).

    The caller owns ``fds``: keep them, or call :meth:`close_fds`. ``closer`` is how :meth:`close_fds` gets rid
    of them: the ``close`` callable of the :class:`FrameDecoder` that produced the frame.
    """

    message: cpb.ConduitFrame
    fds: list[int] = field(default_factory=list)
    closer: CloseFds = field(default=close_fds, repr=False, compare=False)

    def close_fds(self) -> None:
        """Hands every descriptor of the frame to :attr:`closer` (errors ignored) and empties :attr:`fds`."""
        fds, self.fds = self.fds, []
        if fds:
            self.closer(fds)


class _Batch:
    """Descriptors of one ``recvmsg`` and the stream offsets [start, end) of the bytes it read."""

    __slots__ = ("end", "fds", "start")

    def __init__(self, start: int, end: int, fds: list[int]) -> None:
        self.start = start
        self.end = end
        self.fds = fds


class FrameDecoder:
    """Turns the results of ``recvmsg`` calls into frames, attributing descriptors by the rule above.

    Sans-I/O: the blocking, asyncio and broker event-loop readers all feed it. Not thread-safe.

    It holds at most the descriptors of one ``recvmsg`` (at most 253), those of the frame in progress: a read
    with descriptors in which no frame starts is fatal (see :meth:`feed`).
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, *, close: CloseFds = close_fds) -> None:
        """``close`` gets every descriptor the decoder drops (unsolicited, refused, held at :meth:`close` or
        at a fatal error) and becomes the ``closer`` of the frames it returns; it must take ownership of them.
        """
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self.max_frame_bytes = max_frame_bytes
        self._close = close
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0], i.e. of the next frame's first byte
        self._batches: collections.deque[_Batch] = collections.deque()
        self._broken: ConduitError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held (non-zero at EOF means the peer hung up mid-frame)."""
        return len(self._buf)

    @property
    def pending_fds(self) -> int:
        """Descriptors held for frames not yet complete (at most 253)."""
        return sum(len(b.fds) for b in self._batches)

    @property
    def frame_remaining(self) -> int:
        """Bytes a reader may take without reaching the first byte of the next frame: 0 at a frame boundary,
        the rest of the length prefix while it is incomplete, else the rest of the frame in progress.

        A conforming sender attaches no descriptor to those bytes, so a read of at most this many bytes cannot
        legitimately bring any (the broker reads this way while a uid is over its descriptor cap).
        """
        have = len(self._buf)
        if have == 0 or self._broken is not None:
            return 0
        if have < 4:
            return 4 - have
        n: int = _PREFIX.unpack_from(self._buf)[0]
        return max(0, 4 + n - have)

    def close(self) -> None:
        """Hands every descriptor the decoder still holds to its ``close`` callable and drops buffered bytes.
        Idempotent."""
        batches, self._batches = self._batches, collections.deque()
        for b in batches:
            if b.fds:
                self._close(b.fds)
        self._buf.clear()

    def _fatal(self, msg: str, why: str = "the stream is out of sync") -> ConduitError:
        self.close()
        self._broken = ConduitError(ErrType.BAD_FRAME, f"{msg}; {why}, drop the connection")
        return self._broken

    def _frame_starts_in(self, data: bytes | bytearray) -> bool:
        """Does a frame's first byte lie in ``data``, the next bytes of the stream?"""
        if not data:
            return False
        have = len(self._buf)
        if have == 0:
            return True  # data[0] is the next frame's first byte
        head = self._buf[:4] if have >= 4 else bytes(self._buf) + bytes(data[: 4 - have])
        if len(head) < 4:
            return False  # still inside the length prefix of the frame in progress
        n: int = _PREFIX.unpack_from(head)[0]
        if n == 0 or n > self.max_frame_bytes:
            return True  # a bad length; _parse reports it
        return 4 + n - have < len(data)  # the frame in progress ends inside data, and the next one begins

    def feed(self, data: bytes | bytearray, fds: Sequence[int] = ()) -> list[Frame | ConduitError]:
        """Takes the bytes and descriptors of one ``recvmsg`` (the decoder owns ``fds`` from now on).

        Returns what this data completed, in order: :class:`Frame` (the caller owns its ``fds``), or a
        non-fatal ``ConduitError`` whose descriptors were already given to ``close`` — ``NO_FD`` (a frame
        claimed more descriptors than came with it; the frame is dropped) or ``BAD_CTRL_MESG`` (descriptors
        that came with a frame's first byte but that no frame claimed). The connection can go on after those.

        Raises ``ConduitError(BAD_FRAME)`` for fatal problems — descriptors with a read in which no frame
        starts, more than 253 descriptors in one read, a length of 0 or over ``max_frame_bytes``, a body that
        is not a ``ConduitFrame``, ``fd_count`` over 253 — after giving every descriptor it holds or was given
        to ``close``; the caller must drop the connection (later calls raise the same error and close what
        they are given).
        """
        if self._broken is not None:
            if fds:
                self._close(list(fds))
            raise self._broken
        buf = self._buf
        start = self._base + len(buf)
        if fds:
            n = len(fds)
            if n > SCM_MAX_FD:
                self._close(list(fds))
                raise self._fatal(f"{n} descriptors arrived with one read, more than {SCM_MAX_FD}")
            if not self._frame_starts_in(data):
                self._close(list(fds))
                raise self._fatal(
                    f"{n} unsolicited descriptor(s) arrived with a read of {len(data)} bytes that began "
                    f"{start - self._base} bytes into a frame; descriptors ride only on a frame's first byte, "
                    "so they were closed",
                    "the peer does not follow the protocol",
                )
            self._batches.append(_Batch(start, start + len(data), list(fds)))
        buf += data
        out: list[Frame | ConduitError] = []
        try:
            self._parse(out)
        except ConduitError:
            # Fatal: frames this call completed are dropped too, with their descriptors.
            for item in out:
                if isinstance(item, Frame):
                    item.close_fds()
            raise
        return out

    def _parse(self, out: list[Frame | ConduitError]) -> None:
        buf = self._buf
        batches = self._batches
        while len(buf) >= 4:
            (n,) = _PREFIX.unpack_from(buf)
            if n == 0 or n > self.max_frame_bytes:
                raise self._fatal(f"frame length {n} is outside 1..{self.max_frame_bytes}")
            if len(buf) < 4 + n:
                break
            msg = cpb.ConduitFrame()
            try:
                msg.ParseFromString(bytes(buf[4 : 4 + n]))
            except Exception as exc:  # DecodeError, and whatever else a hostile body provokes
                raise self._fatal(f"undecodable frame body ({exc})") from None
            want = msg.fd_count
            if want > SCM_MAX_FD:
                raise self._fatal(f"frame claims {want} descriptors, more than {SCM_MAX_FD}")
            frame_start = self._base
            del buf[: 4 + n]
            self._base += 4 + n
            # Batches that ended before this frame began can no longer be claimed.
            while batches and batches[0].end <= frame_start:
                b = batches.popleft()
                if b.fds:
                    out.append(self._unsolicited(b))
            if want == 0:
                out.append(Frame(msg, [], self._close))
                continue
            owner = batches[0] if batches and batches[0].start <= frame_start else None
            if owner is None or len(owner.fds) < want:
                got: list[int] = []
                if owner is not None:
                    got, owner.fds = owner.fds, []
                if got:
                    self._close(got)
                out.append(
                    ConduitError(
                        ErrType.NO_FD,
                        f"a frame claimed {want} descriptors but {len(got)} arrived with it; "
                        "the frame was dropped and its descriptors closed",
                    )
                )
                continue
            mine, owner.fds = owner.fds[:want], owner.fds[want:]
            out.append(Frame(msg, mine, self._close))
        # Batches whose bytes are all consumed: no frame can still start in them.
        while batches and batches[0].end <= self._base:
            b = batches.popleft()
            if b.fds:
                out.append(self._unsolicited(b))

    def _unsolicited(self, b: _Batch) -> ConduitError:
        fds, b.fds = b.fds, []
        self._close(fds)
        return ConduitError(ErrType.BAD_CTRL_MESG, f"{len(fds)} unsolicited descriptor(s) closed")


class FrameReader:
    """The receive side shared by :class:`FramedConduit` and the asyncio endpoint: one non-blocking
    ``recvmsg`` at a time into a reused buffer, decoded into a queue of frames and non-fatal problems, with the
    peer's end remembered. Only the waiting differs between the two endpoints (``poll`` or the event loop).
    """

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(max_frame_bytes)
        self.ready: collections.deque[Frame | ConduitError] = collections.deque()
        self.eof: ConduitError | None = None
        # Reused: a fresh 64 KiB buffer per recvmsg is an allocation (and page faults) per message.
        self._buf = bytearray(_RECV_BYTES)

    def next_ready(self) -> Frame | None:
        """The next decoded frame, None if none is decoded yet. Raises a queued non-fatal ``ConduitError``, or
        the end-of-stream error once everything before it was returned."""
        if self.ready:
            item = self.ready.popleft()
            if isinstance(item, ConduitError):
                raise item
            return item
        if self.eof is not None:
            raise self.eof
        return None

    @property
    def quiet(self) -> bool:
        """Nothing received and not yet returned: no frame or problem queued, no partial frame, no end."""
        return not self.ready and self.eof is None and not self.decoder.pending_bytes

    def read(self) -> bool:
        """One non-blocking ``recvmsg``; False when there is nothing to read yet (wait until readable)."""
        try:
            n, ancdata, flags, _ = self.sock.recvmsg_into((self._buf,), _ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise self.failed(exc) from None
        self.consume(n, ancdata, flags)
        return True

    def failed(self, exc: OSError) -> ConduitError:
        """The error a failed ``recvmsg`` stands for (the end of the stream, when the peer is gone)."""
        err = error_from_oserror(exc, "recvmsg")
        if err.type is ErrType.PEER_CLOSED:
            self.set_eof(err)
        return err

    def consume(self, n: int, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        """Decode one ``recvmsg`` into the buffer (``n`` bytes, its ancillary data and flags, as
        ``recvmsg_into`` returns them), whoever did it; the decoder owns its descriptors."""
        data: bytes | bytearray = self._buf[:n]
        fds: list[int] = []
        if ancdata or flags & socket.MSG_CTRUNC:
            try:
                fds = fds_from_ancdata(ancdata, flags, SCM_MAX_FD, bytes(data))
            except ConduitError as exc:
                self.ready.append(exc)
                data, fds = exc.data, []
                if not data:
                    return
        if not data:
            pending = self.decoder.pending_bytes
            self.set_eof(
                ConduitError(
                    ErrType.PEER_CLOSED,
                    f"the peer hung up in the middle of a frame ({pending} bytes held, closed)"
                    if pending
                    else "the peer closed the conduit",
                )
            )
            return
        self.ready.extend(self.decoder.feed(data, fds))

    def set_eof(self, err: ConduitError) -> None:
        self.eof = err
        self.decoder.close()

    def close(self) -> None:
        """Close every descriptor held for frames not yet returned."""
        self.decoder.close()
        while self.ready:
            item = self.ready.popleft()
            if isinstance(item, Frame):
                item.close_fds()


class FramedConduit:
    """A blocking framed endpoint for clients, over a ``SOCK_STREAM`` ``AF_UNIX`` socket it owns.

    Thread-safe for one sender and one receiver at a time (separate locks). The socket is kept non-blocking
    and
    waits use ``poll``, so the send and receive timeouts never disturb each other.

    Timeouts: ``timeout=None`` in a call means the conduit's :attr:`timeout` (``None`` = wait forever).
    """

    def __init__(
        self, sock: socket.socket, *, timeout: float | None = None, max_frame_bytes: int = MAX_FRAME_BYTES
    ) -> None:
        """Wraps ``sock``, which the conduit owns from now on. ``BAD_CLONE`` if it is not ``AF_UNIX`` (then
        ``sock`` stays the caller's)."""
        if sock.family != socket.AF_UNIX:
            raise ConduitError(ErrType.BAD_CLONE, f"a {sock.family.name} socket cannot carry descriptors")
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        #: Default timeout in seconds for :meth:`send` and :meth:`recv` (``None``: wait forever).
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self._reader = FrameReader(sock, max_frame_bytes)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._rpoll = select.poll()
        self._rpoll.register(self._fd, select.POLLIN)
        self._wpoll = select.poll()
        self._wpoll.register(self._fd, select.POLLOUT)
        self._send_broken: ConduitError | None = None

    @classmethod
    def connect(
        cls,
        path: str | bytes | os.PathLike[str],
        *,
        timeout: float | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> FramedConduit:
        """Connects to ``path`` (``timeout`` bounds the connect and becomes the default). Errors as
        :meth:`fdbroker.conduit.Conduit.connect`."""
        return cls(_connect(path, timeout), timeout=timeout, max_frame_bytes=max_frame_bytes)

    @classmethod
    def from_socket(
        cls, sock: socket.socket, *, timeout: float | None = None, max_frame_bytes: int = MAX_FRAME_BYTES
    ) -> FramedConduit:
        """A framed conduit over ``sock`` (which it owns from now on)."""
        return cls(sock, timeout=timeout, max_frame_bytes=max_frame_bytes)

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    def peer_credentials(self) -> Credentials:
        """pid, uid, gid of the peer from ``SO_PEERCRED``."""
        return peer_credentials(self._sock)

    def _deadline(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _wait(poller: select.poll, deadline: float | None, what: str) -> None:
        while True:
            if deadline is None:
                ms: int | None = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConduitError(ErrType.TIMEOUT, f"{what} timed out")
                ms = max(1, int(left * 1000 + 0.999))
            if poller.poll(ms):
                return

    def send(self, message: cpb.ConduitFrame, fds: Sequence[int] = (), timeout: float | None = None) -> None:
        """Sends one frame with ``fds`` attached (sets ``message.fd_count``).

        The caller's descriptors are NOT closed, on success or failure (the peer got copies on success).
        ``ValueError`` for more than 253 descriptors or an oversize/empty body. ``ConduitError``: ``TIMEOUT``,
        ``PEER_CLOSED``, ``FAILED_TRANSFER`` (e.g. ``EBADF``). If a frame was cut off part-way (timeout or
        error
        after its first bytes went out) the stream is unusable: later sends raise the same error.
        """
        self.send_raw(encode_frame(message, len(fds), self.max_frame_bytes), fds, timeout)

    def send_raw(self, data: bytes, fds: Sequence[int] = (), timeout: float | None = None) -> None:
        """Sends one frame already encoded (length prefix + ``ConduitFrame`` whose ``fd_count`` is ``len(fds)``,
        at most 253), as :meth:`send` does: for frames spliced from cached bytes. Nothing checks ``data``.

        Ownership and errors as :meth:`send`."""
        with self._send_lock:
            if self._send_broken is not None:
                raise self._send_broken
            self._send_all(data, self._deadline(timeout), fds)

    def exchange(
        self, data: bytes, token: bytes, count: int = 1, timeout: float | None = None
    ) -> tuple[list[int], bytes] | None:
        """Send ``data`` — a ``Redeem`` of ``token`` (:func:`lean.redeem_frame`) — and do one receive: when that
        is exactly the ``Deliver`` answering ``token`` with ``count`` descriptors, return them (the caller owns
        them) and the serialized item (one descriptor) or frame (a batch). Otherwise None: what arrived (if
        anything) is decoded as :meth:`recv` would, and the answer is to be read from there.

        For one reader that knows nothing else is pending: with frames already decoded and not yet returned, the
        frame is only sent. Errors as :meth:`send` and :meth:`recv`.
        """
        with self._send_lock, self._recv_lock:
            if self._send_broken is not None:
                raise self._send_broken
            reader = self._reader
            if not reader.quiet:
                self._send_all(data, self._deadline(timeout))
                return None
            t = self.timeout if timeout is None else timeout
            wait = -1.0 if t is None else t
            got: Any
            try:
                if _NATIVE is not None:
                    got = _NATIVE.exchange(self._fd, data, token, count, reader._buf, wait)
                else:
                    got = lean.exchange(self._sock, data, token, count, reader._buf, wait)
            except OSError as exc:
                raise reader.failed(exc) from None
            if got is None:
                return None
            if len(got) == 2:
                fds, body = got
                return fds, body
            if got[0] < 0:
                _, sent, errnum = got
                err = error_from_oserror(OSError(errnum, os.strerror(errnum)), "sendmsg")
                if sent:
                    self._send_broken = ConduitError(
                        err.type,
                        f"a frame was cut off after {sent} bytes ({err.message}); the conduit is unusable",
                    )
                raise err
            reader.consume(*got)
            return None

    def _send_all(self, data: bytes, deadline: float | None, fds: Sequence[int] = ()) -> None:
        """Send all of one frame, ``fds`` with its first byte (under the send lock); a frame cut off part-way
        leaves the stream unusable."""
        sent = 0
        view = memoryview(data)
        try:
            while sent < len(data):
                try:
                    sent += send_with_fds(self._sock, view[sent:], fds if sent == 0 else ())
                except BlockingIOError:
                    self._wait(self._wpoll, deadline, "send")
        except (ConduitError, OSError) as exc:
            err = exc if isinstance(exc, ConduitError) else error_from_oserror(exc, "sendmsg")
            if sent:
                self._send_broken = ConduitError(
                    err.type,
                    f"a frame was cut off after {sent} bytes ({err.message}); the conduit is unusable",
                )
            raise err from None

    def recv(self, timeout: float | None = None) -> Frame:
        """Receives the next frame; the caller owns its ``fds`` (exactly ``fd_count``, close-on-exec).

        Raises ``ConduitError``: ``TIMEOUT`` (nothing lost; call again); ``PEER_CLOSED`` (EOF, possibly
        mid-frame: everything held is closed); ``BAD_FRAME`` (fatal: the stream is out of sync, close the
        conduit). Non-fatal problems are raised too but the conduit stays usable, their descriptors already
        closed: ``NO_FD`` (a frame claimed more descriptors than came with it; it was dropped),
        ``BAD_CTRL_MESG`` (unsolicited descriptors, truncated control data).
        """
        with self._recv_lock:
            reader = self._reader
            deadline: float | None = None
            first = True
            while True:
                item = reader.next_ready()
                if item is not None:
                    return item
                if first:
                    deadline = self._deadline(timeout)
                    first = False
                if not reader.read():
                    self._wait(self._rpoll, deadline, "recv")

    def close(self) -> None:
        """Closes the conduit: shuts the socket down (waking a thread blocked in send/recv, which then gets
        ``PEER_CLOSED``), then closes it and every descriptor held for unreturned frames. Idempotent."""
        if self._sock.fileno() < 0:
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        got_s = self._send_lock.acquire(timeout=5)
        got_r = self._recv_lock.acquire(timeout=5)
        try:
            self._sock.close()
            self._reader.close()
        finally:
            if got_r:
                self._recv_lock.release()
            if got_s:
                self._send_lock.release()

    def __enter__(self) -> FramedConduit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
