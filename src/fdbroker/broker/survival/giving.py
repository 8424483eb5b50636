"""Live handover, the running broker's side: :class:`HandoverServer` gives every entry to an admitted successor.

The protocol is in :mod:`fdbroker.broker.survival`. The whole exchange up to the successor's ack runs
synchronously on the event loop, so the registry is frozen without touching the code that changes it; any failure
before the ack leaves this broker exactly as it was. After the ack ``commit`` stops everything that could change
the registry, and :func:`released` tells the successor the sockets are closed.

Descriptor ownership: only copies leave (the kernel duplicates each entry's descriptor, and the run directory's
lock descriptor, into the successor); the registry keeps its own until the broker stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fdbroker import __version__
from fdbroker.broker.registry import Entry, Registry
from fdbroker.broker.survival.carry import DEFAULT_TIMEOUT, MAX_FRAME_BYTES, HandoverError, allowed
from fdbroker.conduit.errors import ConduitError
from fdbroker.conduit.frames import SCM_MAX_FD, FramedConduit
from fdbroker.conduit.lean import varint
from fdbroker.errors import BrokerError
from fdbroker.v1 import conduit_pb2 as cpb
from fdbroker.v1 import handover_pb2 as hpb

log = logging.getLogger("fdbroker.handover")


class HandoverServer:
    """Listens on ``handover.sock`` and hands the broker's entries to an admitted successor.

    ``path``: where to bind (the run directory claimed it, so nothing stale is there); ``next_epoch()`` draws the
    fencing epoch the successor continues above; ``lock_fd()`` returns the run directory's lock descriptor;
    ``commit(conn)`` is called right after the successor's ack and must stop everything that could change the
    registry before it returns (the server then finishes with :func:`released`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: Path,
        registry: Registry,
        next_epoch: Callable[[], int],
        clock: Callable[[], float],
        lock_fd: Callable[[], int],
        commit: Callable[[FramedConduit], None],
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.loop = loop
        self.path = path
        self.registry = registry
        self._next_epoch = next_epoch
        self._clock = clock
        self._lock_fd = lock_fd
        self._commit = commit
        self.timeout = timeout
        old_umask = os.umask(0o177)
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._ino = os.lstat(path).st_ino
        self.sock.listen(4)
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_accept)
        self.committed = False
        self.failures = 0  # handovers that failed (the broker went on serving): a metric

    def close(self) -> None:
        """Stop listening and remove ``handover.sock`` (only if it is still ours). Idempotent."""
        if self.sock.fileno() < 0:
            return
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    def _on_accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("handover: accept failed: %s", err)
            return
        sock.set_inheritable(False)
        try:
            conn = FramedConduit(sock, timeout=self.timeout, max_frame_bytes=MAX_FRAME_BYTES)
        except ConduitError:
            sock.close()
            return
        cred = conn.peer_credentials()
        if not allowed(cred.uid):
            log.warning(
                "handover: refused pid %d uid %d (only uid %d or root may take over)",
                cred.pid,
                cred.uid,
                os.geteuid(),
            )
            conn.close()
            return
        log.info(
            "handover: successor pid %d connected; freezing with %d entries", cred.pid, len(self.registry)
        )
        # The freeze (docs/survival.md): from the first handover frame to the ack, on this side. CPU is this
        # thread's, the one frozen (gRPC's own threads go on queueing calls meanwhile).
        t0 = time.monotonic()
        c0 = time.thread_time()
        try:
            n = self._send_all(conn)
            self._wait_ack(conn, n)
        except (ConduitError, OSError, ValueError, HandoverError) as err:
            msg = err.message if isinstance(err, (ConduitError, BrokerError)) else str(err)
            self.failures += 1
            log.error(
                "handover to pid %d failed (%s); still serving with all %d entries",
                cred.pid,
                msg,
                len(self.registry),
            )
            conn.close()
            return
        log.info(
            "handover: pid %d installed %d entries in %.4f s (cpu %.4f s); "
            "stopping and releasing the run directory",
            cred.pid,
            n,
            time.monotonic() - t0,
            time.thread_time() - c0,
        )
        self.committed = True
        self._commit(conn)

    def _send_all(self, conn: FramedConduit) -> int:
        reg = self.registry
        entries = reg.in_order()
        n = len(entries)
        begin = hpb.HandoverBegin(
            version=__version__,
            pid=os.getpid(),
            revision=reg.revision,
            epoch=self._next_epoch(),
            entries=n,
        )
        conn.send(cpb.ConduitFrame(handover_begin=begin))
        now = self._clock()
        for i in range(0, n, SCM_MAX_FD):
            chunk = entries[i : i + SCM_MAX_FD]
            conn.send_raw(encode_entries(chunk, now, conn.max_frame_bytes), [e.fd for e in chunk])
        conn.send(
            cpb.ConduitFrame(handover_done=hpb.HandoverDone(entries=n, revision=reg.revision)),
            [self._lock_fd()],
        )
        return n

    def _wait_ack(self, conn: FramedConduit, n: int) -> None:
        frame = conn.recv()
        frame.close_fds()
        kind = frame.message.WhichOneof("body")
        if kind == "error":
            raise HandoverError(f"the successor refused: {frame.message.error.message}")
        if kind != "handover_ack" or frame.message.handover_ack.entries != n:
            raise HandoverError(f"expected an ack of {n} entries, got {kind or 'an empty frame'}")


# Field keys, (field number << 3) | wire type (0 varint, 2 length-delimited), of what encode_entries splices.
_FRAME_FD_COUNT = b"\x08"  # ConduitFrame.fd_count = 1
_FRAME_ENTRIES = b"\x6a"  # ConduitFrame.handover_entries = 13
_ENTRIES_ITEM = b"\x0a"  # HandoverEntries.entries = 1
_ITEM_ENTRY = b"\x0a"  # HandoverEntry.entry = 1
_ITEM_TTL = b"\x12"  # HandoverEntry.ttl_remaining = 2
_SECONDS = b"\x08"  # Duration.seconds = 1
_NANOS = b"\x10"  # Duration.nanos = 2
_PREFIX = struct.Struct(">I")


def encode_entries(chunk: Sequence[Entry], now: float, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One whole ``HandoverEntries`` frame (length prefix + ``ConduitFrame{fd_count, handover_entries}``) for
    ``chunk`` (1..253 entries, whose descriptors go with it in order), spliced from each entry's cached
    serialized ``pb.Entry``: building a ``HandoverEntry`` message per entry was most of the freeze.

    ``now``: the monotonic clock ``ttl_remaining`` counts from. It parses as the message the generated classes
    would build (tests/test_handover_wire.py holds it there). ``ValueError`` if it exceeds ``max_frame_bytes``.
    """
    parts: list[bytes] = []
    add = parts.extend
    for e in chunk:
        data = e.pb_bytes()
        head = varint(len(data))
        if e.expires_at is None:
            add((_ENTRIES_ITEM, varint(1 + len(head) + len(data)), _ITEM_ENTRY, head, data))
        else:
            left = int(max(0.0, e.expires_at - now) * 1e9)
            seconds, nanos = divmod(left, 1_000_000_000)
            ttl = (_SECONDS + varint(seconds) if seconds else b"") + (
                _NANOS + varint(nanos) if nanos else b""
            )
            item = b"".join((_ITEM_ENTRY, head, data, _ITEM_TTL, varint(len(ttl)), ttl))
            add((_ENTRIES_ITEM, varint(len(item)), item))
    body = b"".join(parts)
    frame = b"".join((_FRAME_FD_COUNT, varint(len(chunk)), _FRAME_ENTRIES, varint(len(body)), body))
    if len(frame) > max_frame_bytes:
        raise ValueError(f"a frame of {len(chunk)} entries is {len(frame)} bytes, over {max_frame_bytes}")
    return _PREFIX.pack(len(frame)) + frame


def released(conn: FramedConduit) -> None:
    """Tell the successor the sockets are closed (best effort: it also watches for this process's exit)."""
    try:
        conn.send(cpb.ConduitFrame(handover_released=hpb.HandoverReleased()), timeout=5.0)
    except (ConduitError, OSError) as err:
        log.warning("handover: could not confirm the release to the successor: %s", err)
    conn.close()
