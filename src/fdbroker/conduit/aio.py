"""asyncio variants: a framed endpoint and raw-mode batch functions.

They drive non-blocking ``AF_UNIX`` sockets with the running loop's ``add_reader``/``add_writer`` and call
``recvmsg``/``sendmsg`` directly (asyncio streams cannot carry ``SCM_RIGHTS``). The same sans-I/O pieces as
the
blocking side do the protocol work (:class:`~fdbroker.conduit.frames.FrameDecoder`,
:class:`~fdbroker.conduit.receive.BatchReader`), so behaviour and errors are identical.

Cancellation: cancelling a receive loses nothing (bytes read are kept in the decoder). Cancelling a send after
part of a frame went out leaves the stream unusable; later sends raise ``ConduitError``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from types import TracebackType

from fdbroker.v1 import conduit_pb2 as cpb

from .conduit import Credentials, peer_credentials
from .errors import ConduitError, ErrType, error_from_oserror
from .frames import MAX_FRAME_BYTES, Frame, FrameReader, encode_frame
from .receive import SCM_MAX_FD, BatchReader, recv_fds_nonblocking
from .send import SINGLE_PAYLOAD, batch_messages, send_with_fds

__all__ = [
    "AsyncFramedConduit",
    "async_receive_fd",
    "async_receive_fds",
    "async_transfer_fd",
    "async_transfer_fds",
]


async def _wait(sock: socket.socket, writing: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    if fd < 0:
        raise ConduitError(ErrType.FAILED_TRANSFER, "the conduit is closed")

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writing:
        loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            loop.remove_writer(fd)
    else:
        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)


async def _send_all(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
    """Sends all of ``data`` with ``fds`` on its first byte; returns bytes sent (raises with ``.sent`` info
    lost)."""
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        try:
            sent += send_with_fds(sock, view[sent:], fds if sent == 0 else ())
        except BlockingIOError:
            await _wait(sock, True)
    return sent


async def _recv(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    while True:
        try:
            return recv_fds_nonblocking(sock, bufsize, maxfds)
        except BlockingIOError:
            await _wait(sock, False)


# --- raw mode -----------------------------------------------------------------------------------------------


async def async_transfer_fd(sock: socket.socket, fd: int, *, keep: bool = False) -> None:
    """Async :meth:`fdbroker.conduit.Conduit.transfer_fd` on a non-blocking ``AF_UNIX`` socket: one
    net-conduit message. On success ``fd`` is closed unless ``keep``; on failure it stays the caller's."""
    try:
        await _send_all(sock, SINGLE_PAYLOAD, (fd,))
    except OSError as exc:
        raise error_from_oserror(exc, "sendmsg") from None
    if not keep:
        os.close(fd)


async def async_receive_fd(sock: socket.socket) -> int:
    """Async :meth:`fdbroker.conduit.Conduit.receive_fd` on a non-blocking socket; same errors, same
    closing."""
    try:
        data, fds = await _recv(sock, 1, 1)
    except OSError as exc:
        raise error_from_oserror(exc, "recvmsg") from None
    if len(fds) == 1:
        return fds[0]
    if not data:
        raise ConduitError(ErrType.PEER_CLOSED, "the peer hung up before sending a descriptor")
    raise ConduitError(ErrType.NO_FD, "a message arrived without a descriptor")


async def async_transfer_fds(sock: socket.socket, fds: Sequence[int], *, keep: bool = False) -> None:
    """Async :meth:`fdbroker.conduit.Conduit.transfer_fds`: one raw batch, 253 per ``sendmsg``. On success
    every
    descriptor is closed unless ``keep``; on failure none is."""
    try:
        for data, chunk in batch_messages(fds):
            await _send_all(sock, data, chunk)
    except OSError as exc:
        raise error_from_oserror(exc, "sendmsg") from None
    if not keep:
        for fd in fds:
            os.close(fd)


async def async_receive_fds(sock: socket.socket, *, limit: int | None = None) -> list[int]:
    """Async :meth:`fdbroker.conduit.Conduit.receive_fds`: the caller owns the result; on any error or
    cancellation every descriptor received so far is closed."""
    reader = BatchReader(limit)
    try:
        while not reader.done:
            data, fds = await _recv(sock, reader.want(), SCM_MAX_FD)
            reader.feed(data, fds)
    except OSError as exc:
        reader.abort()
        raise error_from_oserror(exc, "recvmsg") from None
    except BaseException:
        reader.abort()
        raise
    return reader.fds


# --- framed -------------------------------------------------------------------------------------------------


class AsyncFramedConduit:
    """The asyncio counterpart of :class:`~fdbroker.conduit.frames.FramedConduit`; same frames, errors and
    descriptor ownership. One sender and one receiver task at a time (each side has an ``asyncio.Lock``)."""

    def __init__(self, sock: socket.socket, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        """Wraps ``sock`` (owned from now on; made non-blocking). ``BAD_CLONE`` if it is not ``AF_UNIX``."""
        if sock.family != socket.AF_UNIX:
            raise ConduitError(ErrType.BAD_CLONE, f"a {sock.family.name} socket cannot carry descriptors")
        sock.setblocking(False)
        self._sock = sock
        self.max_frame_bytes = max_frame_bytes
        self._reader = FrameReader(sock, max_frame_bytes)
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._send_broken: ConduitError | None = None

    @classmethod
    async def open(
        cls,
        path: str | bytes | os.PathLike[str],
        *,
        timeout: float | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> AsyncFramedConduit:
        """Connects to ``path``. ``ConduitError``: ``TIMEOUT``, ``FAILED_TRANSFER`` (``errno`` ENOENT,
        ECONNREFUSED, ...). Nothing stays open on failure."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, os.fspath(path))
        except TimeoutError:
            sock.close()
            raise ConduitError(ErrType.TIMEOUT, f"connect to {os.fsdecode(path)!r} timed out") from None
        except OSError as exc:
            sock.close()
            raise error_from_oserror(exc, f"connect to {os.fsdecode(path)!r}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, max_frame_bytes=max_frame_bytes)

    connect = open

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    def peer_credentials(self) -> Credentials:
        """pid, uid, gid of the peer from ``SO_PEERCRED``."""
        return peer_credentials(self._sock)

    async def send(
        self, message: cpb.ConduitFrame, fds: Sequence[int] = (), timeout: float | None = None
    ) -> None:
        """Sends one frame with ``fds`` (not closed: the caller keeps its copies). Errors as
        :meth:`FramedConduit.send`; ``timeout`` (seconds, ``None`` = none) gives ``TIMEOUT``."""
        await self.send_raw(encode_frame(message, len(fds), self.max_frame_bytes), fds, timeout)

    async def send_raw(self, data: bytes, fds: Sequence[int] = (), timeout: float | None = None) -> None:
        """Sends one frame already encoded (length prefix included; ``fd_count`` must be ``len(fds)``), as
        :meth:`send` does: for frames spliced from bytes. Nothing checks ``data``."""
        async with self._send_lock:
            if self._send_broken is not None:
                raise self._send_broken
            sock = self._sock
            view = memoryview(data)
            sent = 0
            try:
                async with asyncio.timeout(timeout):
                    while sent < len(data):
                        try:
                            sent += send_with_fds(sock, view[sent:], fds if sent == 0 else ())
                        except BlockingIOError:
                            await _wait(sock, True)
            except BaseException as exc:
                if isinstance(exc, TimeoutError):
                    err = ConduitError(ErrType.TIMEOUT, "send timed out")
                elif isinstance(exc, OSError):
                    err = error_from_oserror(exc, "sendmsg")
                elif isinstance(exc, ConduitError):
                    err = exc
                else:
                    err = ConduitError(ErrType.FAILED_TRANSFER, f"send interrupted ({type(exc).__name__})")
                if 0 < sent < len(data):
                    self._send_broken = ConduitError(
                        err.type,
                        f"a frame was cut off after {sent} bytes ({err.message}); the conduit is unusable",
                    )
                if err is exc or not isinstance(exc, (OSError, TimeoutError)):
                    raise
                raise err from None

    async def recv(self, timeout: float | None = None) -> Frame:
        """Receives the next frame; the caller owns its ``fds``. Errors as :meth:`FramedConduit.recv`."""
        async with self._recv_lock:
            try:
                async with asyncio.timeout(timeout):
                    return await self._recv_locked()
            except TimeoutError:
                raise ConduitError(ErrType.TIMEOUT, "recv timed out") from None

    async def _recv_locked(self) -> Frame:
        reader = self._reader
        while True:
            item = reader.next_ready()
            if item is not None:
                return item
            if not reader.read():
                await _wait(self._sock, False)

    def close(self) -> None:
        """Closes the socket and every descriptor held for frames not yet returned. Idempotent. Call it
        from the
        loop's thread with no send/recv in progress (cancel them first)."""
        self._sock.close()
        self._reader.close()

    async def __aenter__(self) -> AsyncFramedConduit:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
