"""Typed errors of the conduit.

One exception type, :class:`ConduitError`, whose :attr:`~ConduitError.type` says what went wrong. The first
five
types are net-conduit's (``ErrNoFD`` ... ``ErrBadCtrlMesg``); the last three are ours. The conduit knows
nothing
of entry names or gRPC: mapping these to :mod:`fdbroker.errors` is the client's job.

Rule for every function of the package: when a ``ConduitError`` is raised, every descriptor that arrived
with the
failed operation has already been closed, and every descriptor the caller passed in is still the caller's.
"""

from __future__ import annotations

import enum
import errno as _errno


class ErrType(enum.Enum):
    """What went wrong."""

    #: A message arrived without a descriptor where one was expected (net-conduit ``ErrNoFD``).
    NO_FD = "no descriptor"
    #: ``sendmsg``/``recvmsg`` failed (``errno`` says why) (``ErrFailedTransfer``).
    FAILED_TRANSFER = "failed transfer"
    #: Closing a descriptor after a successful transfer failed (``ErrFailedClose``).
    FAILED_CLOSE = "failed close"
    #: A descriptor or object could not be wrapped: not a socket, not AF_UNIX, wrong mode (``ErrBadClone``).
    BAD_CLONE = "bad clone"
    #: Bad ancillary data: truncated (``MSG_CTRUNC``), more descriptors than asked for, more than one control
    #: message, or a control message other than ``SCM_RIGHTS`` (``ErrBadCtrlMesg``).
    BAD_CTRL_MESG = "bad control message"
    #: A malformed or oversize frame or batch header: the byte stream cannot be trusted any more.
    BAD_FRAME = "bad frame"
    #: A blocking call ran past its timeout.
    TIMEOUT = "timeout"
    #: The peer hung up (EOF, ``EPIPE``, ``ECONNRESET``), possibly in the middle of a message.
    PEER_CLOSED = "peer closed"


class ConduitError(Exception):
    """A conduit operation failed.

    ``type`` is the :class:`ErrType`; ``errno`` the OS error number when a system call failed, else ``None``.
    ``data`` is only set by :func:`fdbroker.conduit.receive.recv_fds_nonblocking` for ``BAD_CTRL_MESG``: the
    stream bytes that the failed ``recvmsg`` consumed (their descriptors were closed), so that a framed
    reader can
    feed them on and keep its byte stream in sync.
    """

    def __init__(self, type: ErrType, message: str, *, errno: int | None = None, data: bytes = b"") -> None:
        self.type = type
        self.errno = errno
        self.message = message
        self.data = data
        super().__init__(message)

    def __str__(self) -> str:
        if self.errno is not None:
            return f"{self.type.value}: {self.message} ({_errno.errorcode.get(self.errno, self.errno)})"
        return f"{self.type.value}: {self.message}"

    def __repr__(self) -> str:
        return f"ConduitError({self.type.name}, {self.message!r}, errno={self.errno!r})"


def error_from_oserror(exc: OSError, what: str, default: ErrType = ErrType.FAILED_TRANSFER) -> ConduitError:
    """The :class:`ConduitError` for an ``OSError`` raised by a socket call (``what`` names the call)."""
    if isinstance(exc, TimeoutError):
        return ConduitError(ErrType.TIMEOUT, f"{what} timed out", errno=_errno.ETIMEDOUT)
    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
        return ConduitError(ErrType.PEER_CLOSED, f"{what}: the peer hung up", errno=exc.errno)
    return ConduitError(default, f"{what} failed: {exc.strerror or exc}", errno=exc.errno)
