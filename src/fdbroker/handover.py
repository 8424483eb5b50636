"""Live handover: a running broker gives every entry to its successor (``fdbroker serve --takeover``).

The running broker listens on ``handover.sock`` in its run directory (mode 0600; a peer is admitted only if its
``SO_PEERCRED`` uid is the broker's own uid or 0). The successor connects and the two speak the conduit's framing
(``ConduitFrame`` with the ``Handover*`` bodies, descriptors as ``SCM_RIGHTS``, at most 253 per ``sendmsg``)::

    old -> new  HandoverBegin     version, pid, registry revision, fencing epoch, entry count
    old -> new  HandoverEntries   up to 253 entries (metadata) + their descriptors      (repeated)
    old -> new  HandoverDone      + the run directory's lock descriptor
    new -> old  HandoverAck       every entry installed
    old -> new  HandoverReleased  the old broker closed its sockets (it exits 0 right after)

The old broker does the whole exchange up to the ack synchronously on its event loop: no RPC, conduit frame or
timer runs meanwhile, so its registry is frozen without touching the code that changes it, and it only ever sends
copies (the kernel duplicates descriptors into the successor). Any failure before the ack (successor killed,
refused, timed out, bad frame) therefore leaves the old broker exactly as it was: it logs why and goes on
serving. After the ack it closes its listener and every conduit connection at once (before the loop runs again,
so nothing can change its registry any more), stops gRPC, closes its descriptors, closes (without unlinking) the
lock, and sends ``HandoverReleased``.

The successor receives the lock descriptor: ``flock`` belongs to the open file description, which both processes
share, so the run directory stays claimed throughout and no third broker can slip in. Once released it removes
the old sockets and binds its own.

Sessions cannot move (they are the old process's conduit connections), so they end: the successor releases every
lease that was held (``LEASE_RELEASED``, reason ``HANDOVER``) and removes ephemeral entries (``DELETE``, reason
``SESSION_ENDED``), as events after the old broker's last revision. See docs/survival.md.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fdbroker import __version__
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import SCM_MAX_FD, Frame, FramedConduit
from fdbroker.errors import BrokerError, Code
from fdbroker.leases import EpochCounter
from fdbroker.registry import Entry, Owner, Registry
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb
from fdbroker.v1 import handover_pb2 as hpb

log = logging.getLogger("fdbroker.handover")

HANDOVER_SOCKET = "handover.sock"
MAX_FRAME_BYTES = 32 * 1024 * 1024  # 253 entries with 32 labels of 318 bytes each fit comfortably
DEFAULT_TIMEOUT = 30.0

Progress = Callable[[int, int], None]


class HandoverError(BrokerError):
    """A handover could not be done; the old broker (if any) goes on serving with every entry."""

    code = Code.FAILED_PRECONDITION


def _allowed(uid: int) -> bool:
    return uid == os.geteuid() or uid == 0


# -- the old broker's side ---------------------------------------------------------------------------------------


class HandoverServer:
    """Listens on ``handover.sock`` and hands the broker's entries to an admitted successor.

    ``lock_fd()`` returns the run directory's lock descriptor; ``commit(conn)`` is called right after the
    successor's ack and must stop everything that could change the registry before it returns (the server then
    finishes with :meth:`released`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: Path,
        registry: Registry,
        epochs: Callable[[], EpochCounter],
        clock: Callable[[], float],
        lock_fd: Callable[[], int],
        commit: Callable[[FramedConduit], None],
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.loop = loop
        self.path = path
        self.registry = registry
        self._epochs = epochs
        self._clock = clock
        self._lock_fd = lock_fd
        self._commit = commit
        self.timeout = timeout
        remove_stale_socket(path)
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
        if not _allowed(cred.uid):
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
        t0 = time.monotonic()
        try:
            n = self._send_all(conn)
            self._wait_ack(conn, n)
        except (ConduitError, OSError, ValueError, HandoverError) as err:
            msg = err.message if isinstance(err, (ConduitError, BrokerError)) else str(err)
            log.error(
                "handover to pid %d failed (%s); still serving with all %d entries",
                cred.pid,
                msg,
                len(self.registry),
            )
            conn.close()
            return
        log.info(
            "handover: pid %d installed %d entries in %.3f s; stopping and releasing the run directory",
            cred.pid,
            n,
            time.monotonic() - t0,
        )
        self.committed = True
        self._commit(conn)

    def _send_all(self, conn: FramedConduit) -> int:
        reg = self.registry
        entries: list[Entry] = sorted(reg, key=lambda e: e.name)
        n = len(entries)
        begin = hpb.HandoverBegin(
            version=__version__,
            pid=os.getpid(),
            revision=reg.revision,
            epoch=self._epochs().next(),
            entries=n,
        )
        conn.send(cpb.ConduitFrame(handover_begin=begin))
        now = self._clock()
        for i in range(0, n, SCM_MAX_FD):
            chunk = entries[i : i + SCM_MAX_FD]
            items = []
            for e in chunk:
                item = hpb.HandoverEntry(entry=e.to_pb())
                if e.expires_at is not None:
                    item.ttl_remaining.FromNanoseconds(int(max(0.0, e.expires_at - now) * 1e9))
                items.append(item)
            conn.send(
                cpb.ConduitFrame(handover_entries=hpb.HandoverEntries(entries=items)), [e.fd for e in chunk]
            )
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


def released(conn: FramedConduit) -> None:
    """Tell the successor the sockets are closed (best effort: it also watches for this process's exit)."""
    try:
        conn.send(cpb.ConduitFrame(handover_released=hpb.HandoverReleased()), timeout=5.0)
    except (ConduitError, OSError) as err:
        log.warning("handover: could not confirm the release to the successor: %s", err)
    conn.close()


# -- the successor's side ----------------------------------------------------------------------------------------


@dataclass
class Takeover:
    """What a completed takeover left the successor: the lock and where its counters continue from."""

    lock_fd: int
    old_pid: int
    entries: int
    revision: int
    epoch: int
    seconds: float


def take_over(
    run_dir: Path,
    registry: Registry,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    on_progress: Progress | None = None,
) -> Takeover:
    """Receive every entry of the broker serving ``run_dir`` into ``registry`` (which must be empty), ack, and
    wait until the old broker released its sockets. Raises :class:`HandoverError` with what went wrong; then
    ``registry`` is empty again, nothing was kept, and the old broker goes on serving."""
    t0 = time.monotonic()
    path = Path(run_dir) / HANDOVER_SOCKET
    try:
        conn = FramedConduit.connect(path, timeout=timeout, max_frame_bytes=MAX_FRAME_BYTES)
    except ConduitError as err:
        raise HandoverError(
            f"cannot take over {run_dir}: no broker answers on {path} ({err.message}); "
            "start without --takeover if none is running"
        ) from None
    lock_fd = -1
    pidfd = -1
    try:
        cred = conn.peer_credentials()
        if not _allowed(cred.uid):
            raise HandoverError(
                f"the broker on {path} runs as uid {cred.uid}, not as this uid ({os.geteuid()}) or root; "
                "a successor must run as the same user"
            )
        try:
            pidfd = os.pidfd_open(cred.pid)
        except OSError:
            pidfd = -1
        begin = _expect(conn, "handover_begin").handover_begin
        total = begin.entries
        free = registry.capacity - len(registry)
        if total > free:
            raise HandoverError(
                f"the broker (pid {begin.pid}) holds {total} entries but this one can hold {free}; "
                "raise RLIMIT_NOFILE or lower --reserve-fds"
            )
        leases: list[tuple[str, str, int]] = []
        lock_fd = _receive_entries(conn, registry, total, on_progress, leases)
        got = len(registry)
        registry.raise_revision(begin.revision)
        _end_sessions(registry, leases)
        conn.send(cpb.ConduitFrame(handover_ack=hpb.HandoverAck(entries=got)))
        _wait_released(conn, pidfd, begin.pid, timeout)
    except BaseException as exc:
        registry.close_all()
        if lock_fd >= 0:
            os.close(lock_fd)
        conn.close()
        if pidfd >= 0:
            os.close(pidfd)
        if isinstance(exc, ConduitError):
            raise HandoverError(
                f"handover from the broker on {run_dir} failed: {exc.message}; it keeps serving every entry"
            ) from None
        raise
    conn.close()
    if pidfd >= 0:
        os.close(pidfd)
    return Takeover(
        lock_fd=lock_fd,
        old_pid=begin.pid,
        entries=got,
        revision=registry.revision,
        epoch=begin.epoch,
        seconds=time.monotonic() - t0,
    )


def _expect(conn: FramedConduit, kind: str) -> cpb.ConduitFrame:
    frame = conn.recv()
    got = frame.message.WhichOneof("body")
    if got != kind:
        frame.close_fds()
        raise HandoverError(f"handover protocol: expected {kind}, got {got or 'an empty frame'}")
    if frame.fds:
        frame.close_fds()
        raise HandoverError(f"handover protocol: {kind} carries no descriptors")
    return frame.message


def _receive_entries(
    conn: FramedConduit,
    registry: Registry,
    total: int,
    on_progress: Progress | None,
    leases: list[tuple[str, str, int]],
) -> int:
    """Install entries until HandoverDone; return the lock descriptor it carries. Appends the lease holders
    seen (name, lease id, epoch) to ``leases``."""
    n = 0
    while True:
        frame: Frame = conn.recv()
        kind = frame.message.WhichOneof("body")
        if kind == "handover_done":
            done = frame.message.handover_done
            if len(frame.fds) != 1 or done.entries != n or n != total:
                frame.close_fds()
                raise HandoverError(
                    f"handover protocol: done after {n} of {total} entries (old broker says {done.entries})"
                )
            return frame.fds[0]
        if kind != "handover_entries":
            frame.close_fds()
            raise HandoverError(f"handover protocol: expected entries, got {kind or 'an empty frame'}")
        items = frame.message.handover_entries.entries
        fds = frame.fds
        if len(items) != len(fds) or n + len(items) > total:
            frame.close_fds()
            raise HandoverError(
                f"handover protocol: {len(items)} entries with {len(fds)} descriptors ({n} of {total} so far)"
            )
        for i, (item, fd) in enumerate(zip(items, fds, strict=True)):
            try:
                _install(registry, item, fd)
                leases.extend((item.entry.name, h.lease_id, h.epoch) for h in item.entry.lease.holders)
            except BaseException:
                for rest in fds[i:]:
                    _close(rest)
                raise
        n += len(items)
        if on_progress is not None:
            on_progress(n, total)


def _install(registry: Registry, item: hpb.HandoverEntry, fd: int) -> None:
    e = item.entry
    expires_in = expire_time = None
    if item.HasField("ttl_remaining"):
        expires_in = item.ttl_remaining.ToNanoseconds() / 1e9
        expire_time = e.expire_time.ToNanoseconds() / 1e9 if e.HasField("expire_time") else None
    registry.restore(
        e.name,
        fd,
        e.info,
        Owner(e.owner.pid, e.owner.uid, e.owner.gid),
        labels=dict(e.labels),
        create_time=e.create_time.ToNanoseconds() / 1e9,
        create_revision=e.create_revision,
        revision=e.revision,
        expires_in=expires_in,
        expire_time=expire_time,
        ephemeral=e.ephemeral,
        session_id="handover" if e.ephemeral else "",
        lease_epoch=e.lease.epoch,
    )


def _end_sessions(registry: Registry, leases: list[tuple[str, str, int]]) -> None:
    """The old broker's sessions do not survive: release their leases, drop their ephemeral entries (events)."""
    for name, lease_id, epoch in leases:
        e = registry.find(name)
        if e is not None:
            registry.touch(
                e, pb.Event.TYPE_LEASE_RELEASED, pb.Event.REASON_HANDOVER, lease_id=lease_id, epoch=epoch
            )
    for name in sorted(e.name for e in registry if e.ephemeral):
        registry.remove(name, event=pb.Event.TYPE_DELETE, reason=pb.Event.REASON_SESSION_ENDED)


def _wait_released(conn: FramedConduit, pidfd: int, pid: int, timeout: float) -> None:
    try:
        frame = conn.recv()
        frame.close_fds()
        if frame.message.WhichOneof("body") == "handover_released":
            return
    except ConduitError as err:
        if err.type not in (ErrType.PEER_CLOSED, ErrType.TIMEOUT):
            raise
    # No explicit release: proceed only once the old broker is gone (it had our ack, so it was stopping).
    if pidfd >= 0 and select.select([pidfd], [], [], timeout)[0]:
        log.warning("handover: the old broker (pid %d) exited without confirming; taking over", pid)
        return
    raise HandoverError(
        f"the old broker (pid {pid}) acknowledged the handover but neither released the run directory nor "
        f"exited within {timeout:.0f} s; check it"
    )


def remove_stale_socket(p: Path) -> None:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HandoverError(f"{p} exists and is not a socket; remove it")
    try:
        os.unlink(p)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def continue_epochs(epoch: int) -> EpochCounter:
    """An epoch counter that stays above ``epoch`` (and keeps following the clock)."""
    return EpochCounter(seed=max(epoch, int(time.time() * 1_000_000)))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
