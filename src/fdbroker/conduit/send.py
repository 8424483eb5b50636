"""The send side: one ``sendmsg`` primitive, complete sends, and the raw single and batch send protocols.

Descriptors ride only with the first byte of a message: if ``sendmsg`` sends part of the data, the rest
goes out
with plain sends and no ancillary data, so the receiver sees the descriptors exactly once.
"""

from __future__ import annotations

import socket
from array import array
from collections.abc import Iterator, Sequence

from .errors import ConduitError, ErrType, error_from_oserror
from .receive import BATCH_CONT, BATCH_HEADER, BATCH_MAGIC, SCM_MAX_FD

_SCM_RIGHTS = socket.SCM_RIGHTS
_SOL_SOCKET = socket.SOL_SOCKET
_NOSIGNAL = socket.MSG_NOSIGNAL
SINGLE_PAYLOAD = b"\x00"
"""The one payload byte of a net-conduit single-descriptor message (its value is not checked by receivers)."""


def send_with_fds(sock: socket.socket, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> int:
    """One ``sendmsg`` of ``data`` with ``fds`` as ``SCM_RIGHTS`` (no ancillary data when ``fds`` is empty).

    Returns the number of bytes sent, which may be less than ``len(data)``; the descriptors went with the
    first
    byte either way, so the rest must be sent without them. ``BlockingIOError`` (non-blocking socket, nothing
    sent, no descriptor passed) and every other ``OSError`` pass through unchanged; ``EINTR`` is retried.
    ``MSG_NOSIGNAL`` is set, so a hung-up peer gives ``BrokenPipeError``, never ``SIGPIPE``. The
    descriptors stay
    the caller's: the kernel passes copies.
    """
    if fds:
        return sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, array("i", fds))], _NOSIGNAL)
    return sock.sendmsg([data], (), _NOSIGNAL)


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int], what: str = "sendmsg") -> None:
    """Sends all of ``data`` on a blocking socket, ``fds`` attached to its first byte.

    Raises ``ConduitError``: ``TIMEOUT`` (socket timeout), ``PEER_CLOSED`` (``EPIPE``/``ECONNRESET``),
    ``FAILED_TRANSFER`` otherwise (e.g. ``EBADF`` for a descriptor that is not open). The descriptors stay the
    caller's on success and on failure. After a failure part of ``data`` may have gone out.
    """
    try:
        n = send_with_fds(sock, data, fds)
        if n < len(data):
            sock.sendall(memoryview(data)[n:], _NOSIGNAL)
    except OSError as exc:
        raise error_from_oserror(exc, what) from None


def batch_messages(fds: Sequence[int]) -> Iterator[tuple[bytes, Sequence[int]]]:
    """The messages of a raw batch: the header (``b"B"`` + uint32 count) with the first up to 253 descriptors,
    then one ``b"C"`` message per further chunk of up to 253."""
    total = len(fds)
    if total > 0xFFFFFFFF:
        raise ConduitError(ErrType.FAILED_TRANSFER, f"batch of {total} descriptors is too large")
    yield BATCH_HEADER.pack(BATCH_MAGIC, total), fds[:SCM_MAX_FD]
    for i in range(SCM_MAX_FD, total, SCM_MAX_FD):
        yield BATCH_CONT, fds[i : i + SCM_MAX_FD]
