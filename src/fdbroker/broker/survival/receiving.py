"""Live handover, the successor's side: :func:`take_over` receives every entry of the broker serving a run
directory, and its lock.

The protocol is in :mod:`fdbroker.broker.survival`. Sessions cannot move (they are the old process's conduit
connections), so they end here: :meth:`Broker.end_handed_over_sessions` releases every lease that was held
(``LEASE_RELEASED``, reason ``HANDOVER``, through the broker's one ``end_lease``) and removes ephemeral entries
(``DELETE``, reason ``SESSION_ENDED``), as events after the old broker's last revision.

Descriptor ownership: each received descriptor becomes an entry's (the registry owns it) or is closed; on any
failure every one received is closed, the registry is emptied, and the old broker goes on serving. On success the
caller owns :attr:`Takeover.lock_fd`.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fdbroker.broker.leasing import LeaseTable
from fdbroker.broker.registry import Entry, Owner, Registry
from fdbroker.broker.survival.carry import (
    DEFAULT_TIMEOUT,
    HANDOVER_SOCKET,
    MAX_FRAME_BYTES,
    MAX_RESTORED_TTL,
    HandoverError,
    Progress,
    allowed,
)
from fdbroker.conduit import close_fds
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import Frame, FramedConduit
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb
from fdbroker.v1 import handover_pb2 as hpb

if TYPE_CHECKING:
    from fdbroker.broker.core import Broker

log = logging.getLogger("fdbroker.handover")

HandedLease = tuple[str, pb.LeaseHolder]
"""A lease the old broker's sessions held: the entry's name and the holder as the old broker described it."""


@dataclass
class Takeover:
    """What a completed takeover left the successor: the lock and where its counters continue from."""

    lock_fd: int
    old_pid: int
    entries: int
    revision: int
    epoch: int
    seconds: float
    #: From HandoverBegin to the ack sent (receiving and installing every entry), wall clock and this thread's CPU.
    install_seconds: float = 0.0
    install_cpu_seconds: float = 0.0


def take_over(
    run_dir: Path,
    broker: Broker,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    on_progress: Progress | None = None,
) -> Takeover:
    """Receive every entry of the broker serving ``run_dir`` into ``broker`` (whose registry must be empty), end
    the old broker's sessions, continue its revision and fencing epochs, ack, and wait until the old broker
    released its sockets. Raises :class:`HandoverError` with what went wrong; then the registry is empty again,
    nothing was kept, and the old broker goes on serving."""
    t0 = time.monotonic()
    registry = broker.registry
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
        if not allowed(cred.uid):
            raise HandoverError(
                f"the broker on {path} runs as uid {cred.uid}, not as this uid ({os.geteuid()}) or root; "
                "a successor must run as the same user"
            )
        try:
            pidfd = os.pidfd_open(cred.pid)
        except OSError:
            pidfd = -1
        begin = _expect(conn, "handover_begin").handover_begin
        t1 = time.monotonic()
        c1 = time.thread_time()
        total = begin.entries
        free = registry.capacity - len(registry)
        if total > free:
            raise HandoverError(
                f"the broker (pid {begin.pid}) holds {total} entries but this one can hold {free}; "
                "raise RLIMIT_NOFILE or lower --reserve-fds"
            )
        leases: list[HandedLease] = []
        lock_fd = _receive_entries(conn, registry, begin, on_progress, leases)
        got = len(registry)
        registry.raise_revision(begin.revision)
        broker.continue_epochs(begin.epoch)
        broker.end_handed_over_sessions(leases)
        conn.send(cpb.ConduitFrame(handover_ack=hpb.HandoverAck(entries=got)))
        install_s = time.monotonic() - t1
        install_cpu = time.thread_time() - c1
        log.info(
            "handover: installed %d entries from pid %d in %.4f s (cpu %.4f s); waiting for its release",
            got,
            begin.pid,
            install_s,
            install_cpu,
        )
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
        install_seconds=install_s,
        install_cpu_seconds=install_cpu,
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
    begin: hpb.HandoverBegin,
    on_progress: Progress | None,
    leases: list[HandedLease],
) -> int:
    """Install entries until HandoverDone, a frame at a time, while the old broker sends the next ones; return
    the lock descriptor it carries. Appends the lease holders seen to ``leases``."""
    n = 0
    total = begin.entries
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
        try:
            registry.install(decode_entries(items, fds, registry, begin.revision, leases))
        except BaseException:
            close_fds(fds)  # none of them was installed
            raise
        n += len(items)
        if on_progress is not None:
            on_progress(n, total)


def decode_entries(
    items: Sequence[hpb.HandoverEntry],
    fds: Sequence[int],
    registry: Registry,
    floor: int,
    leases: list[HandedLease],
) -> list[Entry]:
    """The entries of one ``HandoverEntries`` frame (``items[i]`` with ``fds[i]``) as :func:`.carry.restore` builds
    them, with no message built per entry: the description is the old broker's (it passed the uid check: it is
    this broker, in an earlier version), and so is the serialized form (it sets ``expire_time`` exactly when it
    sends ``ttl_remaining``), kept unless it differs from the entry installed (lease state came along: holders
    and waiters stay behind; or a revision 0, which means ``floor``). Appends the lease holders to ``leases``."""
    clock = registry.clock()
    wall = registry.wall()
    owners: dict[tuple[int, int, int], Owner] = {}
    out: list[Entry] = []
    for item, fd in zip(items, fds, strict=True):
        e = item.entry
        o = e.owner
        key = (o.pid, o.uid, o.gid)
        owner = owners.get(key)
        if owner is None:
            owner = owners[key] = Owner(*key)
        created = e.create_time
        labels = e.labels
        revision = e.revision or floor
        entry = Entry(
            id=0,
            name=e.name,
            fd=fd,
            info_bytes=e.info.SerializeToString(),
            owner=owner,
            session_id="handover" if e.ephemeral else "",
            labels=dict(labels) if labels else {},
            create_time=(created.seconds * 1_000_000_000 + created.nanos) / 1e9,
            create_revision=e.create_revision or revision,
            revision=revision,
            ephemeral=e.ephemeral,
        )
        if item.HasField("ttl_remaining"):
            ttl = item.ttl_remaining
            left = min(max(0.0, (ttl.seconds * 1_000_000_000 + ttl.nanos) / 1e9), MAX_RESTORED_TTL)
            entry.expires_at = clock + left
            if e.HasField("expire_time"):
                at = e.expire_time
                entry.expire_time = (at.seconds * 1_000_000_000 + at.nanos) / 1e9
            else:
                entry.expire_time = wall + left
        if e.HasField("lease"):
            if e.lease.epoch:
                entry.lease = LeaseTable(epoch=e.lease.epoch)
            leases.extend((entry.name, h) for h in e.lease.holders)
        elif e.revision and e.create_revision:
            entry.keep_form(e.SerializeToString())
        out.append(entry)
    return out


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
