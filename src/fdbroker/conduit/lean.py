"""The lean ``Redeem``: one prefetched token sent and its ``Deliver`` recognised by its bytes, for clients.

A repeated get of a prefetched name is one conduit round trip, and on the client its cost was Python: encoding
the ``Redeem``, the receive machinery, a protobuf parse of a ``Deliver`` whose shape is known in advance. Here
the ``Redeem`` is spliced from bytes (:func:`redeem_frame`), and :meth:`FramedConduit.exchange
<fdbroker.conduit.frames.FramedConduit.exchange>` sends it and does one receive, answering at once when that
read is exactly the ``Deliver`` of the token (:func:`match_deliver`): the C extension's ``exchange`` when it is
built (the GIL released while it waits), :func:`exchange` here otherwise; they answer alike. Anything else the
read brought goes to the conduit's frame decoder as any read does, and the caller waits for its answer the
usual way.

Ownership: the descriptors of a recognised ``Deliver`` are the caller's; those of any other read belong to the
decoder (and then to whoever takes the frames).
"""

from __future__ import annotations

import array
import select
import socket
import time

from .receive import SCM_MAX_FD, ancbufsize

TOKEN_BYTES = 32
# ConduitFrame{redeem(6): Redeem{tokens(1): 32 bytes}}: field 6 length-delimited (0x32), 34 bytes; field 1 (0x0a),
# 32 bytes; behind a 4-byte length of 36.
_REDEEM_HEAD = b"\x00\x00\x00\x24\x32\x22\x0a\x20"
_ANCBUF = ancbufsize(SCM_MAX_FD)
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)

Exchanged = (
    tuple[list[int], bytes] | tuple[int, list[tuple[int, int, bytes]], int] | tuple[int, int, int] | None
)
"""What an exchange returns: ``(fds, body)`` (recognised; the caller owns ``fds``; ``body`` is the item's
serialized ``DeliverItem``, or for a batch the whole serialized ``ConduitFrame``), ``(n, ancdata, flags)`` (a read
for the decoder, as ``recvmsg_into`` returns it), ``(-1, sent, errno)`` (the send failed after ``sent`` bytes) or
None (nothing arrived in time; the frame was sent)."""


def redeem_frame(token: bytes, refill: int = 0) -> bytes:
    """The framed ``Redeem`` of one token (the broker's are 32 bytes; another length is sent as it is, and
    refused by the broker), asking for ``refill`` more tokens of its entry if not 0 (``Redeem.refill``)."""
    if len(token) == TOKEN_BYTES and not refill:
        return _REDEEM_HEAD + token
    if len(token) > 0x7F - 2:
        raise ValueError(f"a token of {len(token)} bytes")
    inner = b"\x0a" + bytes((len(token),)) + token
    if refill:
        inner += b"\x10" + varint(refill)  # Redeem.refill = 2, a varint
    body = b"\x32" + varint(len(inner)) + inner
    return len(body).to_bytes(4, "big") + body


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (the broker's encoders use it too)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint(b: bytes | bytearray | memoryview, n: int, p: int) -> tuple[int, int] | None:
    x = shift = 0
    while p < n and shift <= 63:
        c = b[p]
        p += 1
        x |= (c & 0x7F) << shift
        if not c & 0x80:
            return x, p
        shift += 7
    return None


def match_deliver(
    b: bytes | bytearray | memoryview, n: int, token: bytes, count: int
) -> tuple[int, int] | None:
    """Whether ``b[:n]`` is exactly the framed ``Deliver`` that answers ``token`` with ``count`` descriptors (one
    item, or a batch whose later items carry no token): the offset and length of its first item's body, or None."""
    if n < 4 or int.from_bytes(b[:4], "big") != n - 4:
        return None
    p = 4
    if b[p] != 0x08 or (v := _varint(b, n, p + 1)) is None or v[0] != count:
        return None
    p = v[1]
    if p >= n or b[p] != 0x2A or (v := _varint(b, n, p + 1)) is None or v[0] != n - v[1]:
        return None
    p = v[1]
    first: tuple[int, int] | None = None
    for i in range(count):
        if p >= n or b[p] != 0x0A or (v := _varint(b, n, p + 1)) is None or v[0] > n - v[1]:
            return None
        size, p = v
        if i == 0:
            if (
                size < 2 + TOKEN_BYTES
                or b[p] != 0x0A
                or b[p + 1] != TOKEN_BYTES
                or b[p + 2 : p + 34] != token
            ):
                return None
            first = (p, size)
        elif size == 0 or b[p] == 0x0A:
            return None
        p += size
    return first if p == n else None


def _wait(fd: int, event: int, deadline: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, event)
    while True:
        ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        if poller.poll(ms):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def exchange(
    sock: socket.socket, data: bytes, token: bytes, count: int, buf: bytearray, timeout: float
) -> Exchanged:
    """The pure-Python twin of the extension's ``exchange``: send ``data`` whole on the non-blocking ``sock``, wait
    up to ``timeout`` seconds (negative: for ever) for one read into ``buf``; see :data:`Exchanged`."""
    deadline = None if timeout < 0 else time.monotonic() + timeout
    fd = sock.fileno()
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(view[sent:], _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            if not _wait(fd, select.POLLOUT, deadline):
                return (-1, sent, 110)  # ETIMEDOUT
        except OSError as err:
            return (-1, sent, err.errno or 5)
    if not _wait(fd, select.POLLIN, deadline):  # the answer cannot be there yet: wait before reading
        return None
    while True:
        try:
            n, anc, flags, _ = sock.recvmsg_into((buf,), _ANCBUF, socket.MSG_CMSG_CLOEXEC)
            break
        except (BlockingIOError, InterruptedError):
            if not _wait(fd, select.POLLIN, deadline):
                return None
    if (
        len(anc) == 1
        and not flags & socket.MSG_CTRUNC
        and anc[0][0] == socket.SOL_SOCKET
        and anc[0][1] == socket.SCM_RIGHTS
        and len(anc[0][2]) == 4 * count
        and (m := match_deliver(buf, n, token, count)) is not None
    ):
        fds = array.array("i", anc[0][2]).tolist()
        return fds, bytes(buf[m[0] : m[0] + m[1]] if count == 1 else buf[4:n])
    return n, anc, flags
