"""The :class:`Conduit` type (raw mode) and its constructors.

A conduit is an ``AF_UNIX`` socket that carries descriptors as ``SCM_RIGHTS``. In raw mode it speaks
net-conduit's wire format for single descriptors (one message = one byte of payload + one descriptor) and our
batch format for many (see docs/conduit-protocol.md). For the broker's framed protocol see
:mod:`fdbroker.conduit.frames`.

Ownership, as in net-conduit: a successful ``transfer_*`` closes the sender's copy (the receiver now has the
descriptor); ``keep=True`` keeps it. A failed transfer closes nothing of the caller's. Every ``receive_*``
hands
the caller a new descriptor (close-on-exec) or raises having closed everything that arrived.

Timeouts: every blocking method takes ``timeout`` in seconds; ``None`` means the conduit's :attr:`timeout`
(itself ``None`` = wait forever, the default). A call that runs out raises ``ConduitError(TIMEOUT)``.

A :class:`Conduit` is meant for one thread at a time (:class:`~fdbroker.conduit.frames.FramedConduit` is
thread-safe for one sender plus one receiver).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any, NamedTuple, Protocol

from .errors import ConduitError, ErrType, error_from_oserror
from .receive import SCM_MAX_FD, BatchReader, close_fds, receive_one, recv_fds_nonblocking
from .send import SINGLE_PAYLOAD, batch_messages, send_message, send_with_fds

_UCRED = struct.Struct("3i")


class Credentials(NamedTuple):
    """Kernel-verified identity of the peer process at connect time (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


class HasFileno(Protocol):
    """Anything with a descriptor: file objects, sockets, selectors' file-likes."""

    def fileno(self) -> int: ...


def peer_credentials(sock: socket.socket) -> Credentials:
    """``SO_PEERCRED`` of a connected ``AF_UNIX`` socket; ``ConduitError(FAILED_TRANSFER)`` if unavailable."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as exc:
        raise error_from_oserror(exc, "getsockopt(SO_PEERCRED)") from None
    return Credentials(*_UCRED.unpack(raw))


def _wrap_unix(fd: int) -> socket.socket:
    """A ``socket.socket`` for ``fd`` if it is an ``AF_UNIX`` socket; on failure ``fd`` is left open."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConduitError(
            ErrType.BAD_CLONE, f"descriptor {fd} is not a socket: {exc.strerror}", errno=exc.errno
        ) from None
    if sock.family != socket.AF_UNIX:
        family = sock.family
        sock.detach()
        raise ConduitError(ErrType.BAD_CLONE, f"descriptor {fd} is a {family.name} socket, not AF_UNIX")
    return sock


class Conduit:
    """A raw-mode descriptor conduit over an ``AF_UNIX`` socket it owns.

    Build one with :meth:`from_fd`, :meth:`from_file`, :meth:`from_socket`, :meth:`pair` or :meth:`connect`.
    Closing the conduit (:meth:`close`, or leaving a ``with`` block) closes its socket.
    """

    __slots__ = ("_armed", "_sock", "timeout")

    def __init__(self, sock: socket.socket, *, timeout: float | None = None) -> None:
        """Wraps ``sock`` (must be ``AF_UNIX``; the conduit owns it from now on). Prefer the constructors."""
        if sock.family != socket.AF_UNIX:
            raise ConduitError(ErrType.BAD_CLONE, f"a {sock.family.name} socket cannot carry descriptors")
        self._sock = sock
        #: Default timeout in seconds for every blocking call (``None``: wait forever).
        self.timeout: float | None = timeout
        sock.settimeout(None)
        self._armed: float | None = None

    # --- constructors ---------------------------------------------------------------------------------------

    @classmethod
    def from_fd(cls, fd: int, *, owned: bool = True, timeout: float | None = None) -> Conduit:
        """A conduit over the ``AF_UNIX`` socket descriptor ``fd``.

        ``owned=True``: the conduit takes ``fd`` and closes it on :meth:`close`. ``owned=False``: the conduit
        works on a duplicate and the caller keeps ``fd``. On failure (``BAD_CLONE``: not a socket, not
        ``AF_UNIX``) nothing is closed: ``fd`` stays the caller's.
        """
        mine = fd if owned else os.dup(fd)
        try:
            return cls(_wrap_unix(mine), timeout=timeout)
        except BaseException:
            if not owned:
                os.close(mine)
            raise

    @classmethod
    def from_file(cls, f: HasFileno, *, timeout: float | None = None) -> Conduit:
        """A conduit over a duplicate of ``f``'s descriptor (net-conduit ``FromFile``); the caller keeps
        ``f``.

        ``BAD_CLONE`` if it is not an ``AF_UNIX`` socket (the duplicate is closed, ``f`` untouched).
        """
        return cls.from_fd(f.fileno(), owned=False, timeout=timeout)

    @classmethod
    def from_socket(cls, sock: socket.socket, *, timeout: float | None = None) -> Conduit:
        """A conduit over ``sock`` itself, which the conduit owns from now on (closing it closes ``sock``).

        ``BAD_CLONE`` if ``sock`` is not ``AF_UNIX`` (then ``sock`` stays the caller's, untouched).
        """
        return cls(sock, timeout=timeout)

    @classmethod
    def pair(cls, *, timeout: float | None = None) -> tuple[Conduit, Conduit]:
        """Two connected conduits (``socketpair(AF_UNIX, SOCK_STREAM)``), e.g. to hand one end to a child."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a, timeout=timeout), cls(b, timeout=timeout)

    @classmethod
    def connect(cls, path: str | bytes | os.PathLike[str], *, timeout: float | None = None) -> Conduit:
        """Connects a ``SOCK_STREAM`` socket to ``path`` (``timeout`` bounds the connect and is the default).

        Raises ``ConduitError``: ``TIMEOUT``; ``FAILED_TRANSFER`` with ``errno`` ``ENOENT`` (no socket
        there) or
        ``ECONNREFUSED`` (nobody listening) or another connect error. Nothing stays open on failure.
        """
        return cls(_connect(path, timeout), timeout=timeout)

    # --- plumbing -------------------------------------------------------------------------------------------

    @property
    def sock(self) -> socket.socket:
        """The underlying socket (owned by the conduit; do not close it, do not change its timeout)."""
        return self._sock

    def fileno(self) -> int:
        """The conduit socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    def peer_credentials(self) -> Credentials:
        """pid, uid, gid of the peer from ``SO_PEERCRED`` (as of connect / socketpair time)."""
        return peer_credentials(self._sock)

    def close(self) -> None:
        """Closes the conduit's socket. Idempotent. Descriptors already transferred are unaffected."""
        self._sock.close()

    def __enter__(self) -> Conduit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Conduit fd={self.fileno()}>"

    def _arm(self, timeout: float | None) -> float | None:
        """Sets the socket timeout for the next call, touching the socket only when it changes."""
        t = self.timeout if timeout is None else timeout
        if t != self._armed:
            self._sock.settimeout(t)
            self._armed = t
        return t

    def _deadline_arm(self, deadline: float | None) -> None:
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConduitError(ErrType.TIMEOUT, "timed out")
        self._sock.settimeout(left)
        self._armed = left

    # --- send -----------------------------------------------------------------------------------------------

    def transfer_fd(self, fd: int, *, keep: bool = False, timeout: float | None = None) -> None:
        """Sends ``fd`` as one net-conduit message (1 byte + 1 descriptor).

        On success the sender's ``fd`` is closed unless ``keep=True`` (a close failure raises
        ``FAILED_CLOSE``;
        the descriptor did arrive). On failure ``fd`` is left open and still the caller's: ``TIMEOUT``,
        ``PEER_CLOSED``, ``FAILED_TRANSFER`` (``errno`` ``EBADF`` when ``fd`` is not open).
        """
        if self._armed is not (self.timeout if timeout is None else timeout):
            self._arm(timeout)
        try:
            if not send_with_fds(self._sock, SINGLE_PAYLOAD, (fd,)):
                raise ConduitError(ErrType.FAILED_TRANSFER, "sendmsg sent nothing")
        except OSError as exc:
            raise error_from_oserror(exc, "sendmsg") from None
        if not keep:
            _close_sent(fd)

    def transfer_file(self, f: IO[Any], *, keep: bool = False, timeout: float | None = None) -> None:
        """Sends ``f``'s descriptor (flushing ``f`` first). On success ``f`` is closed unless ``keep=True``;
        on failure it is left open. Errors as :meth:`transfer_fd`."""
        f.flush()
        self.transfer_fd(f.fileno(), keep=True, timeout=timeout)
        if not keep:
            try:
                f.close()
            except OSError as exc:
                raise error_from_oserror(exc, "close", ErrType.FAILED_CLOSE) from None

    def transfer_socket(
        self, sock: socket.socket, *, keep: bool = False, timeout: float | None = None
    ) -> None:
        """Sends ``sock``'s descriptor. On success ``sock`` is closed unless ``keep=True``; on failure it
        is left
        open. Errors as :meth:`transfer_fd`."""
        self.transfer_fd(sock.fileno(), keep=True, timeout=timeout)
        if not keep:
            sock.close()

    def transfer_fds(self, fds: Sequence[int], *, keep: bool = False, timeout: float | None = None) -> None:
        """Sends any number of descriptors (0 .. 2**32-1) as one raw batch, 253 per ``sendmsg``.

        ``timeout`` bounds the whole batch. On success every descriptor is closed unless ``keep=True`` (the
        first close failure raises ``FAILED_CLOSE`` after all were tried). On failure none is closed; the peer
        may have received part of the batch (its receiver then fails and closes what arrived).
        """
        t = self._arm(timeout)
        deadline = None if t is None or len(fds) <= SCM_MAX_FD else time.monotonic() + t
        for data, chunk in batch_messages(fds):
            self._deadline_arm(deadline)
            send_message(self._sock, data, chunk)
        if not keep:
            failed: OSError | None = None
            for fd in fds:
                try:
                    os.close(fd)
                except OSError as exc:
                    failed = failed or exc
            if failed is not None:
                raise error_from_oserror(failed, "close after transfer", ErrType.FAILED_CLOSE)

    # --- receive --------------------------------------------------------------------------------------------

    def receive_fd(self, *, timeout: float | None = None) -> int:
        """Receives one descriptor sent as a net-conduit message; the caller owns it (close-on-exec).

        Raises ``ConduitError``: ``NO_FD`` (a message without a descriptor), ``BAD_CTRL_MESG`` (more than one
        descriptor, truncation, a foreign control message — everything that arrived is closed),
        ``PEER_CLOSED``
        (EOF), ``TIMEOUT``, ``FAILED_TRANSFER``.
        """
        if self._armed is not (self.timeout if timeout is None else timeout):
            self._arm(timeout)
        return receive_one(self._sock)

    def receive_file(
        self,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        *,
        timeout: float | None = None,
    ) -> IO[Any]:
        """Receives one descriptor and wraps it with :func:`os.fdopen` (arguments as :func:`open`); the caller
        owns the file object. ``BAD_CLONE`` if it cannot be wrapped (the descriptor is closed); else as
        :meth:`receive_fd`."""
        fd = self.receive_fd(timeout=timeout)
        try:
            return os.fdopen(fd, mode, buffering, encoding, errors, newline)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise ConduitError(
                ErrType.BAD_CLONE, f"cannot open the received descriptor as {mode!r}: {exc}"
            ) from None

    def receive_socket(self, *, timeout: float | None = None) -> socket.socket:
        """Receives one descriptor as a ``socket.socket`` whose family, type and protocol are read from the
        descriptor itself; the caller owns it. ``BAD_CLONE`` if it is not a socket (the descriptor is closed);
        else as :meth:`receive_fd`. Its ``O_NONBLOCK`` flag is shared with the sender's copy and left as
        is."""
        fd = self.receive_fd(timeout=timeout)
        try:
            return socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise ConduitError(
                ErrType.BAD_CLONE, f"the received descriptor is not a socket: {exc.strerror}", errno=exc.errno
            ) from None

    def receive_fds(self, *, limit: int | None = None, timeout: float | None = None) -> list[int]:
        """Receives one raw batch; the caller owns every returned descriptor (all close-on-exec).

        ``limit`` refuses larger batches (``BAD_FRAME``). ``timeout`` bounds the whole batch. On any error
        every
        descriptor of the batch received so far is closed: ``PEER_CLOSED`` (hang-up mid-batch), ``NO_FD`` /
        ``BAD_CTRL_MESG`` (a message with too few / too many descriptors, truncation — e.g.
        ``RLIMIT_NOFILE``),
        ``BAD_FRAME`` (not a batch header), ``TIMEOUT``, ``FAILED_TRANSFER``.
        """
        t = self._arm(timeout)
        deadline = None if t is None else time.monotonic() + t
        sock = self._sock
        reader = BatchReader(limit)
        try:
            while not reader.done:
                data, fds = recv_fds_nonblocking(sock, reader.want(), SCM_MAX_FD)
                reader.feed(data, fds)
                if not reader.done:
                    self._deadline_arm(deadline)
        except OSError as exc:
            reader.abort()
            raise error_from_oserror(exc, "recvmsg") from None
        except BaseException:
            reader.abort()
            raise
        return reader.fds


def _close_sent(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        raise error_from_oserror(exc, "close after transfer", ErrType.FAILED_CLOSE) from None


def _connect(path: str | bytes | os.PathLike[str], timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise error_from_oserror(exc, f"connect to {os.fsdecode(path)!r}") from None
    return sock


__all__ = ["Conduit", "Credentials", "HasFileno", "close_fds", "peer_credentials"]
