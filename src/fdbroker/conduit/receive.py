"""The receive side: one ``recvmsg`` primitive, and the raw single and batch receive protocols.

Every ``recvmsg`` here uses ``MSG_CMSG_CLOEXEC``, so no received descriptor survives an ``exec`` by accident.
Ancillary data is checked strictly: ``MSG_CTRUNC``, a second control message, or one that is not
``SCM_RIGHTS``
is ``BAD_CTRL_MESG`` and every descriptor that did arrive is closed before the error is raised.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Callable
from functools import lru_cache

from .errors import ConduitError, ErrType, error_from_oserror

SCM_MAX_FD = 253
"""The kernel's limit of descriptors per ``sendmsg`` (``SCM_MAX_FD`` in include/net/scm.h)."""

# Linux SCM_PIDFD (6.5+): a pidfd the kernel attaches when SO_PASSPIDFD is on. Not in every Python's socket
# module;
# it carries a descriptor, so a foreign message of this type must be closed too.
_SCM_PIDFD = 0x04
_FD_SIZE = array.array("i").itemsize

BATCH_HEADER = struct.Struct(">cI")
"""Raw batch header: the byte ``b"B"`` and the big-endian uint32 count of descriptors that follow."""
BATCH_MAGIC = b"B"
BATCH_CONT = b"C"
"""The one payload byte of each continuation message of a raw batch."""


@lru_cache(maxsize=64)
def ancbufsize(maxfds: int) -> int:
    """The control buffer for ``maxfds`` descriptors (what every receive here passes to ``recvmsg``)."""
    return socket.CMSG_SPACE(maxfds * _FD_SIZE)


_ancbufsize = ancbufsize


def close_fds(fds: list[int] | tuple[int, ...]) -> None:
    """Closes every descriptor in ``fds``, ignoring errors (used on failure paths, where nothing else can
    be done)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_fds_nonblocking(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg(bufsize)`` with room for ``maxfds`` descriptors, with ``MSG_CMSG_CLOEXEC``.

    Returns ``(data, fds)``; ``data == b""`` means EOF (then ``fds`` is empty). The caller owns the returned
    descriptors. Meant for non-blocking sockets (``BlockingIOError`` passes through unchanged, nothing
    consumed);
    on a blocking socket it blocks, and with a socket timeout ``TimeoutError`` passes through. ``EINTR`` is
    retried (by Python, PEP 475). Other ``OSError``\\ s pass through unchanged.

    Raises ``ConduitError(BAD_CTRL_MESG)`` when the control data was truncated (``MSG_CTRUNC``: more
    descriptors
    than ``maxfds``, or the receiver could not install them all, e.g. ``RLIMIT_NOFILE``), when more than
    ``maxfds`` arrived, when there was more than one control message, or when one was not ``SCM_RIGHTS``.
    Every
    descriptor that arrived is closed first; the bytes consumed are in the error's ``data`` attribute.
    """
    data, ancdata, flags, _ = sock.recvmsg(bufsize, _ancbufsize(maxfds), socket.MSG_CMSG_CLOEXEC)
    if not ancdata and not flags & socket.MSG_CTRUNC:
        return data, []
    return data, fds_from_ancdata(ancdata, flags, maxfds, data)


def recv_fds_into(
    sock: socket.socket,
    buf: bytearray | memoryview,
    maxfds: int,
    *,
    close: Callable[[list[int]], None] = close_fds,
) -> tuple[int, list[int]]:
    """Like :func:`recv_fds_nonblocking`, but reads into the caller's ``buf`` and returns ``(nbytes, fds)``.

    For hot loops: a fresh ``recvmsg(bufsize)`` allocates ``bufsize`` bytes per call, which for 64 KiB and more
    means an mmap/munmap (and page faults) per message; a reused buffer costs nothing. Same errors and
    descriptor ownership as :func:`recv_fds_nonblocking` (``0`` bytes means EOF), except that the descriptors
    of a bad control message are given to ``close`` (which takes ownership; default: closed at once).
    """
    n, ancdata, flags, _ = sock.recvmsg_into((buf,), _ancbufsize(maxfds), socket.MSG_CMSG_CLOEXEC)
    if not ancdata and not flags & socket.MSG_CTRUNC:
        return n, []
    return n, fds_from_ancdata(ancdata, flags, maxfds, bytes(buf[:n]), close)


def fds_from_ancdata(
    ancdata: list[tuple[int, int, bytes]],
    flags: int,
    maxfds: int,
    data: bytes,
    close: Callable[[list[int]], None] = close_fds,
) -> list[int]:
    """The descriptors of one ``recvmsg``'s ancillary data (as ``socket.recvmsg`` returns it), checked as every
    receive here checks them: on bad control data (``MSG_CTRUNC``, a foreign or second control message, more than
    ``maxfds``) every descriptor goes to ``close`` and ``ConduitError(BAD_CTRL_MESG, data=data)`` is raised."""
    fds: list[int] = []
    foreign = 0
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and (ctype == socket.SCM_RIGHTS or ctype == _SCM_PIDFD):
            a = array.array("i")
            a.frombytes(cdata[: len(cdata) - (len(cdata) % _FD_SIZE)])
            fds.extend(a)
            if ctype != socket.SCM_RIGHTS:
                foreign += 1
        else:
            foreign += 1
    problem = ""
    if flags & socket.MSG_CTRUNC:
        problem = "control data truncated (MSG_CTRUNC: too many descriptors, or RLIMIT_NOFILE reached)"
    elif foreign:
        problem = "a control message other than SCM_RIGHTS arrived"
    elif len(ancdata) > 1:
        problem = f"{len(ancdata)} control messages in one message"
    elif len(fds) > maxfds:
        problem = f"{len(fds)} descriptors arrived where at most {maxfds} were expected"
    if problem:
        close(fds)
        raise ConduitError(
            ErrType.BAD_CTRL_MESG, problem + "; every descriptor that arrived was closed", data=data
        )
    return fds


class BatchReader:
    """The raw batch protocol's receive state, shared by the blocking and the asyncio receivers.

    Drive it with: ``while not r.done: r.feed(*recv(r.want(), SCM_MAX_FD))``. :meth:`feed` raises
    ``ConduitError`` after closing every descriptor collected so far; :meth:`abort` closes them on any other
    failure (timeout, hang-up). When :attr:`done`, :attr:`fds` belongs to the caller.
    """

    __slots__ = ("_header", "_limit", "_total", "done", "fds")

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self._header = b""
        self._total = -1
        self.fds: list[int] = []
        self.done = False

    def want(self) -> int:
        """How many bytes the next ``recvmsg`` may read (never beyond the current message)."""
        if self._total < 0:
            return BATCH_HEADER.size - len(self._header)
        return 1

    def abort(self) -> None:
        """Closes every descriptor received so far."""
        fds, self.fds = self.fds, []
        close_fds(fds)

    def _fail(self, kind: ErrType, msg: str, fds: list[int]) -> ConduitError:
        close_fds(fds)
        self.abort()
        return ConduitError(kind, msg + "; every descriptor received was closed")

    def feed(self, data: bytes, fds: list[int]) -> None:
        """Takes the result of one ``recvmsg`` (ownership of ``fds`` passes to the reader)."""
        if not data:
            raise self._fail(ErrType.PEER_CLOSED, "the peer hung up in the middle of a descriptor batch", fds)
        if self._total < 0:
            if self._header and fds:
                raise self._fail(ErrType.BAD_CTRL_MESG, "descriptors arrived inside a batch header", fds)
            first = not self._header
            self._header += data
            if first:
                self.fds.extend(fds)
                fds = []
            if len(self._header) < BATCH_HEADER.size:
                return
            magic, total = BATCH_HEADER.unpack(self._header)
            if magic != BATCH_MAGIC:
                raise self._fail(ErrType.BAD_FRAME, f"not a batch header (first byte {magic!r})", fds)
            if self._limit is not None and total > self._limit:
                raise self._fail(
                    ErrType.BAD_FRAME, f"batch of {total} descriptors exceeds {self._limit}", fds
                )
            self._total = total
            have, want = len(self.fds), min(total, SCM_MAX_FD)
        else:
            if data != BATCH_CONT:
                raise self._fail(ErrType.BAD_FRAME, f"bad batch continuation byte {data!r}", fds)
            have, want = len(fds), min(self._total - len(self.fds), SCM_MAX_FD)
            self.fds.extend(fds)
        if have != want:
            raise self._fail(
                ErrType.NO_FD if have < want else ErrType.BAD_CTRL_MESG,
                f"a batch message carried {have} descriptors, expected {want}",
                [],
            )
        if len(self.fds) == self._total:
            self.done = True


def receive_one(sock: socket.socket) -> int:
    """Receives one net-conduit message (1 byte + 1 descriptor) on a blocking socket; see
    ``Conduit.receive_fd``."""
    try:
        data, fds = recv_fds_nonblocking(sock, 1, 1)
    except ConduitError:
        raise
    except OSError as exc:
        raise error_from_oserror(exc, "recvmsg") from None
    if len(fds) == 1:
        return fds[0]
    if not data:
        raise ConduitError(ErrType.PEER_CLOSED, "the peer hung up before sending a descriptor")
    close_fds(fds)
    raise ConduitError(ErrType.NO_FD, "a message arrived without a descriptor")
