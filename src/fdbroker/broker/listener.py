"""The broker's side of the conduit: a listening Unix socket and one non-blocking connection per session.

Connections are driven by ``loop.add_reader``/``add_writer`` callbacks that call ``recvmsg``/``sendmsg``
directly; asyncio streams cannot carry SCM_RIGHTS, and a callback per readable event keeps a handoff to one
recvmsg, one decode and one sendmsg. This module knows frames and descriptors, not names: every decoded frame
goes to the ``on_frame`` callback (the broker), which owns the frame's descriptors from then on.

Descriptors a client sent that the broker does not keep (unsolicited ones, those of a frame cut off by a hang-up
or a fatal error, duplicates queued for a delivery that never went out) and the connection's own socket (whose
receive queue may still hold a client's descriptors) go to :func:`fdbroker.broker.closer.discard`, attributed to the
connection's uid: a ``close`` on the event loop could block it (a lingering socket).

The native data plane: with the C table of prefetched tokens (:mod:`.fastpath`), a connection's reader callback is
that table's ``Reader``, which does the ``recvmsg`` itself and answers a read made only of ``Redeem`` frames whose
tokens all deliver (one ``sendmsg`` each, no Python); every other read — and every read while this connection
holds part of a frame or has output queued (:meth:`Connection._sync_native`) — comes back here through
:meth:`Connection._consume` exactly as :meth:`Connection._readable` would have handled it.

Descriptors in flight: a connection holds at most the descriptors of its one frame in progress (the decoder's
rule). Across a uid's connections, those plus the uid's descriptors waiting in the closer are its descriptors in
flight (:data:`in_flight`); at ``max_fds_in_flight_per_uid`` the connections of that uid stop reading (see
:meth:`Connection._read_size`) and look again every :data:`PAUSE_RECHECK` seconds. Descriptors still in a
socket's receive queue are not in the broker's table, so waiting costs the broker nothing.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fdbroker.broker import closer
from fdbroker.broker.policy import Identity, Limits
from fdbroker.conduit.errors import ConduitError
from fdbroker.conduit.frames import SCM_MAX_FD, Frame, FrameDecoder, encode_frame
from fdbroker.conduit.receive import ancbufsize, fds_from_ancdata
from fdbroker.conduit.send import send_with_fds
from fdbroker.errors import Code
from fdbroker.v1 import conduit_pb2 as cpb

log = logging.getLogger("fdbroker.conduit")

RECV_BYTES = 64 * 1024 + 4
MAX_QUEUED_BYTES = 8 * 1024 * 1024  # a peer that does not read is cut off past this
MAX_QUEUED_FDS = 4096
ACCEPT_PAUSE = 0.1  # seconds without accepting after EMFILE/ENFILE
PAUSE_RECHECK = 0.05
"""Seconds between looks at a uid's descriptors in flight while its connections are paused."""
DEFAULT_MAX_FDS_IN_FLIGHT = Limits().max_fds_in_flight_per_uid
ANCBUFSIZE = ancbufsize(SCM_MAX_FD)


class FdsInFlight:
    """Per uid: descriptors held in the incomplete frames of its connections, plus (:meth:`total`) those waiting
    in the closer. Event-loop only; connections report their changes through :meth:`add`."""

    def __init__(self) -> None:
        self._held: collections.Counter[int] = collections.Counter()

    def add(self, uid: int, n: int) -> None:
        """``n`` (possibly negative) more descriptors held in incomplete frames of ``uid``'s connections."""
        left = self._held[uid] + n
        if left > 0:
            self._held[uid] = left
        else:
            del self._held[uid]

    def held(self, uid: int) -> int:
        """Descriptors held in incomplete frames of ``uid``'s connections."""
        return self._held.get(uid, 0)

    def total(self, uid: int) -> int:
        """``uid``'s descriptors in flight: :meth:`held` plus its descriptors waiting in the closer."""
        return self._held.get(uid, 0) + closer.pending_for_uid(uid)

    def accounts(self) -> tuple[dict[int, int], ...]:
        """The dicts behind :meth:`total` for every uid — held per uid, waiting in the closer per uid — which are
        all empty when no uid has a descriptor in flight (a uid is in them only while it has some); never to be
        written."""
        return (self._held, closer.per_uid_counts())


in_flight = FdsInFlight()
"""The process's account of descriptors in flight, shared by every :class:`Connection`."""

ACCOUNTS = in_flight.accounts()
"""What the native reader looks at before each read: while every dict is empty and the connection is not
throttled (``_throttled``), :meth:`Connection._read_size` would answer a full read (every cap is at least 1:
:class:`~fdbroker.broker.policy.Limits` refuses less), so it is not asked."""


class Connection:
    """One accepted conduit connection. Sends never block: what the kernel does not take is queued.

    Descriptors passed to :meth:`send` stay the caller's; a send that has to wait keeps its own duplicates until
    they are on the wire, so the caller may close or replace its descriptor right after the call.
    """

    # A queued duplicate must not take a descriptor number at or above this: the server sets it to keep half
    # its reserve free, so a peer that does not read cannot starve the broker (accept, recvmsg) of descriptors.
    fd_ceiling = 1 << 30

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        identity: Identity,
        on_frame: Callable[[Connection, Frame], None],
        on_close: Callable[[Connection], None],
        *,
        max_frame_bytes: int,
        max_fds_in_flight: Callable[[], int] | None = None,
        on_pause: Callable[[], None] = lambda: None,
        native: Any = None,
    ) -> None:
        """``max_fds_in_flight`` returns the uid's cap on descriptors in flight (read on every ``recvmsg``, so a
        policy reload applies at once; default: ``Limits``' default). ``on_pause``: called at each pause at that
        cap (a metric). ``native``: the C table of prefetched tokens; its reader serves ``Redeem`` frames."""
        self.loop = loop
        self.sock = sock
        self.identity = identity
        self._on_frame = on_frame
        self._on_close = on_close
        self._max_in_flight = max_fds_in_flight or (lambda: DEFAULT_MAX_FDS_IN_FLIGHT)
        self._on_pause = on_pause
        # Client descriptors go to the closer (off the event loop), counted against our uid until closed.
        self._discard = functools.partial(closer.discard, uid=identity.uid)
        self._decoder = FrameDecoder(max_frame_bytes, close=self._discard)
        self._held = 0  # descriptors of our decoder counted in in_flight
        self._paused = False  # reader removed until _resume
        self._resume_handle: asyncio.TimerHandle | None = None
        self._throttled = False  # logged the current pause episode
        self._rbuf = bytearray(RECV_BYTES)  # reused: a fresh 64 KiB buffer per recvmsg costs an mmap
        self._rview = memoryview(self._rbuf)
        self._out: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._out_bytes = 0
        self._out_fds = 0
        self._writing = False
        self.closed = False
        self.session: object | None = None
        sock.setblocking(False)
        self._fd = sock.fileno()
        #: The native reader (``native.reader``), whose ``key`` is the session's in the table; or None.
        self.native: Any = None
        if native is not None:
            self.native = native.reader(self, self._fd, self._rbuf, max_frame_bytes, RECV_BYTES, ACCOUNTS)
        self._reader = self.native or self._readable
        loop.add_reader(self._fd, self._reader)

    def _sync_native(self) -> None:
        """The native reader may answer frames itself only at a frame boundary with nothing queued to send."""
        if self.native is not None:
            self.native.python_only = bool(self._out) or self._decoder.pending_bytes > 0

    # -- receiving -----------------------------------------------------------------------------------------------

    def _account(self) -> None:
        held = self._decoder.pending_fds
        if held != self._held:
            in_flight.add(self.identity.uid, held - self._held)
            self._held = held

    def _read_size(self) -> int:
        """How many bytes the next ``recvmsg`` may read; 0: none now (the uid is over its cap).

        Below the cap, a read may bring up to 253 descriptors. At the cap, a connection in the middle of a frame
        may still read up to the frame's end (:attr:`FrameDecoder.frame_remaining`): a conforming peer attaches
        no descriptor there, so this finishes frames already started (and releases their descriptors) without
        letting new ones in; a peer that attaches some anyway is dropped. That slack is allowed while the uid is
        less than 253 over its cap, so a uid's descriptors in flight stay below cap + 2 * 253, and a uid whose
        connections all hold unfinished frames cannot deadlock itself.
        """
        uid = self.identity.uid
        used = in_flight.total(uid)
        cap = self._max_in_flight()
        if used < cap:
            if self._throttled:
                self._throttled = False
                log.info("uid %d is below its descriptor cap again; reading pid %d", uid, self.identity.pid)
            return RECV_BYTES
        if used < cap + SCM_MAX_FD:
            return min(RECV_BYTES, self._decoder.frame_remaining)
        return 0

    def _pause(self) -> None:
        if not self._throttled:
            self._throttled = True
            self._on_pause()
            log.warning(
                "uid %d has %d descriptors in flight (limit %d); pausing reads from pid %d",
                self.identity.uid,
                in_flight.total(self.identity.uid),
                self._max_in_flight(),
                self.identity.pid,
            )
        if not self._paused:
            self._paused = True
            self.loop.remove_reader(self._fd)
        self._resume_handle = self.loop.call_later(PAUSE_RECHECK, self._resume)

    def _resume(self) -> None:
        self._resume_handle = None
        if self.closed or not self._paused:
            return
        if _hung_up(self._fd):
            # Fully closed by the peer: nothing it sent can be answered; release what it holds now rather than
            # when the uid is below its cap again.
            self.close()
            return
        self._paused = False
        self.loop.add_reader(self._fd, self._reader)  # called again at once if there is something to read

    def _readable(self) -> None:
        if self.closed:
            return
        size = self._read_size()
        if size == 0:
            self._pause()
            return
        try:
            n, ancdata, flags, _ = self.sock.recvmsg_into(
                (self._rview[:size],), ANCBUFSIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            n, ancdata, flags = -(err.errno or errno.EIO), None, 0
        self._consume(n, ancdata, flags)

    def _consume(self, n: int, ancdata: list[tuple[int, int, bytes]] | None, flags: int) -> None:
        """One ``recvmsg`` into the buffer: ``n`` bytes (negative: ``-errno``), its ancillary data, its flags.
        The native reader hands every read it does not answer itself here."""
        if n < 0:
            log.debug("conduit read failed for pid %d: %s", self.identity.pid, os.strerror(-n))
            self.close()
            return
        data, fds, report = _descriptors(self._rbuf[:n], ancdata, flags, self._discard)
        if report is not None and not data:
            self.send(cpb.ConduitFrame(error=cpb.Error(code=int(Code.INVALID_ARGUMENT), message=str(report))))
            return
        if not data:
            self._discard(fds)
            self.close()
            return
        try:
            items = self._decoder.feed(data, fds)
        except ConduitError as err:
            self._account()
            log.warning("pid %d sent a bad frame (%s); dropping its connection", self.identity.pid, err)
            self.send(cpb.ConduitFrame(error=cpb.Error(code=int(Code.INVALID_ARGUMENT), message=str(err))))
            self._flush_best_effort()
            self.close()
            return
        self._account()
        self._sync_native()
        if report is not None:
            items.insert(0, report)
        for item in items:
            if self.closed:
                if isinstance(item, Frame):
                    item.close_fds()
                continue
            if isinstance(item, ConduitError):
                self.send(
                    cpb.ConduitFrame(error=cpb.Error(code=int(Code.INVALID_ARGUMENT), message=str(item)))
                )
                continue
            try:
                self._on_frame(self, item)
            except Exception:
                log.exception("error handling a frame from pid %d", self.identity.pid)
            finally:
                # What the handler did not take out of item.fds is still ours (Broker.on_frame's contract),
                # on return as on error: to the closer, as the client's.
                item.close_fds()

    # -- sending -------------------------------------------------------------------------------------------------

    def send(self, message: cpb.ConduitFrame, fds: Sequence[int] = ()) -> None:
        """Send one frame with ``fds`` attached (at most 253). Never blocks; the caller keeps its descriptors."""
        if not self.closed:
            self.send_raw(encode_frame(message, len(fds)), fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one already-encoded frame (length prefix included) with ``fds``; as :meth:`send`."""
        if self.closed:
            return
        if not self._out:
            try:
                n = send_with_fds(self.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as err:
                log.debug("conduit write to pid %d failed: %s", self.identity.pid, err)
                self.close()
                return
            if n == len(data):
                return
            if n > 0:
                data, fds = data[n:], ()  # the descriptors went with the first byte
        self._queue(data, fds)

    def _queue(self, data: bytes, fds: Sequence[int]) -> None:
        """Queue what the socket did not take, with duplicates of ``fds`` (the caller keeps its own)."""
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
                if dups[-1] >= Connection.fd_ceiling:  # lowest-free numbering: the table is this full
                    raise OSError(errno.EMFILE, "queued descriptors would eat the broker's reserve")
        except OSError as err:
            self._discard(dups)
            log.warning(
                "pid %d does not read its conduit and %d descriptor(s) cannot be queued (%s); dropping it",
                self.identity.pid,
                len(fds),
                err.strerror or err,
            )
            self.close()
            return
        self._out.append((data, dups))
        if self.native is not None:
            self.native.python_only = True
        self._out_bytes += len(data)
        self._out_fds += len(dups)
        if self._out_bytes > MAX_QUEUED_BYTES or self._out_fds > MAX_QUEUED_FDS:
            log.warning(
                "pid %d does not read its conduit (%d bytes, %d descriptors queued); dropping it",
                self.identity.pid,
                self._out_bytes,
                self._out_fds,
            )
            self.close()
            return
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        while self._out and not self.closed:
            data, fds = self._out[0]
            try:
                n = send_with_fds(self.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.debug("conduit write to pid %d failed: %s", self.identity.pid, err)
                self.close()
                return
            # Duplicates of the broker's entries: closing one may drop the last reference once the entry is gone.
            self._discard(fds)
            self._out_fds -= len(fds)
            self._out_bytes -= n
            if n < len(data):
                self._out[0] = (data[n:], [])
                return
            self._out.popleft()
        if self._writing and not self.closed:
            self._writing = False
            self.loop.remove_writer(self._fd)
            self._sync_native()

    def _flush_best_effort(self) -> None:
        if self._out:
            self._writable()

    def close(self) -> None:
        """Close the connection (idempotent); the session ends through ``on_close``."""
        if self.closed:
            return
        self.closed = True
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        if not self._paused:
            self.loop.remove_reader(self._fd)
        if self._writing:
            self.loop.remove_writer(self._fd)
        for _, fds in self._out:
            self._discard(fds)
        self._out.clear()
        self._out_fds = self._out_bytes = 0
        self._decoder.close()
        self._account()
        if self.native is not None:
            self.native.detach()  # it holds this connection: no cycle left behind
        # The socket's receive queue may still hold descriptors a client sent: the last close of the socket
        # releases them, which can block like closing them one by one. On the loop's next turn (_later).
        _later(self.loop, self._discard, self.sock.detach())
        self._on_close(self)


class Listener:
    """Accepts conduit connections and reads each peer's SO_PEERCRED."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_connect: Callable[[socket.socket, Identity], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self._on_connect = on_connect
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._acceptable)

    def _acceptable(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # EMFILE/ENFILE: leave it in the backlog and pause, or the level-triggered reader spins (and logs)
                # until a descriptor frees up.
                log.warning("conduit accept failed: %s; pausing accepts for %.1fs", err, ACCEPT_PAUSE)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid, uid, gid = struct.unpack("3i", creds)
            except OSError:
                closer.discard(conn.detach())  # its receive queue may hold a client's descriptors
                continue
            self._on_connect(conn, Identity(pid, uid, gid))

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._acceptable)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _descriptors(
    data: bytearray,
    ancdata: list[tuple[int, int, bytes]] | None,
    flags: int,
    discard: Callable[[list[int]], None],
) -> tuple[bytes | bytearray, list[int], ConduitError | None]:
    """The bytes and descriptors of one read. On bad control data (truncated, foreign) its descriptors go to
    ``discard`` and the error is returned with the bytes, which still belong to the stream (the frame they start
    then claims descriptors it did not get: NO_FD)."""
    if not ancdata and not flags & socket.MSG_CTRUNC:
        return data, [], None
    try:
        return data, fds_from_ancdata(ancdata or [], flags, SCM_MAX_FD, bytes(data), discard), None
    except ConduitError as err:
        return err.data, [], err


def _later(loop: asyncio.AbstractEventLoop, discard: Callable[[int], None], fd: int) -> None:
    """``discard(fd)`` on the loop's next turn, once the loop let go of the descriptor (uvloop's libuv releases a
    watched descriptor only then: one closed and reused before could leave the next connection unwatched)."""
    try:
        loop.call_soon(discard, fd)
    except RuntimeError:  # the loop is closed (shutdown)
        discard(fd)


_REAP_EVERY = 0.25
_reaped_at = 0.0


def reap_errored(conns: Iterable[Connection]) -> None:
    """Let every connection whose socket has an error pending meet it (its peer reset the connection: it closed
    with our frames unread), at most every 0.25 s.

    The standard loop reports such a socket readable, and the reader's ``recvmsg`` gets ``ECONNRESET`` and closes
    the connection. uvloop (libuv) instead stops watching a descriptor that reports ``POLLERR`` and never calls its
    reader again, which would leave the session open for good: this finds them, with one ``poll`` for all."""
    global _reaped_at
    now = time.monotonic()
    if now - _reaped_at < _REAP_EVERY:
        return
    _reaped_at = now
    live = {c._fd: c for c in conns if not c.closed and not c._paused}  # a paused one looks itself (_resume)
    if not live:
        return
    p = select.poll()
    for fd in live:
        p.register(fd, 0)  # POLLERR, POLLHUP and POLLNVAL are reported whatever is asked
    for fd, ev in p.poll(0):
        if ev & select.POLLERR:
            live[fd]._readable()


def _hung_up(fd: int) -> bool:
    """Has the peer of stream socket ``fd`` closed both directions (``POLLHUP``)? Never blocks."""
    p = select.poll()
    p.register(fd, select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in p.poll(0))
