"""The result types both clients return, defined once: :class:`Entry`, :class:`Event`, :class:`Info`,
:class:`Lease`, :class:`Listing`, and the received descriptor as its natural Python object (:func:`wrap_fd`,
:class:`OwnedFd`). No I/O here but closing a descriptor nobody owns any more.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol

from fdbroker.v1 import broker_pb2 as pb


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = int | HasFileno
"""What ``put`` accepts: a descriptor number or anything with ``fileno()`` (socket, file, :class:`OwnedFd`)."""


def fileno_of(obj: FdLike) -> int:
    fd = obj if isinstance(obj, int) else obj.fileno()
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"not an open descriptor: {obj!r}")
    return fd


class OwnedFd:
    """A descriptor that closes itself: on :meth:`close`, on leaving a ``with`` block, or when collected.

    :meth:`detach` hands the number over to the caller, who then owns it.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed descriptor")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """Give up ownership; the caller must close the returned descriptor."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:  # close_quietly, inline: a repeated get pays this once per descriptor
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        # Cheaper than a weakref.finalize per descriptor (a batch of 253 paid ~0.8 ms for those).
        self.close()

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})" if self._fd >= 0 else "OwnedFd(closed)"


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring errors (it is ours and nobody else's; a failure leaves nothing to do)."""
    try:
        os.close(fd)
    except OSError:
        pass


Received = socket.socket | IO[Any] | OwnedFd
"""What a retrieval returns: a socket for sockets, a file object for regular files, else an :class:`OwnedFd`."""

_SOCKET_KINDS = {
    pb.KIND_TCP_LISTENER,
    pb.KIND_TCP_STREAM,
    pb.KIND_UDP,
    pb.KIND_UNIX_LISTENER,
    pb.KIND_UNIX_STREAM,
    pb.KIND_UNIX_DGRAM,
    pb.KIND_SOCKET_OTHER,
}


def wrap_fd(fd: int, info: pb.DescriptorInfo) -> Received:
    """Turn a received descriptor into its natural Python object, which then owns it."""
    try:
        if info.kind in _SOCKET_KINDS:
            return socket.socket(fileno=fd)
        if info.kind == pb.KIND_FILE:
            mode = {
                pb.ACCESS_MODE_READ: "rb",
                pb.ACCESS_MODE_WRITE: "ab" if "O_APPEND" in info.flags else "wb",
                pb.ACCESS_MODE_READ_WRITE: "a+b" if "O_APPEND" in info.flags else "r+b",
            }.get(info.access_mode, "rb")
            # buffering=0: the descriptor's offset is shared with every other holder; buffering would hide that.
            return io.open(fd, mode, buffering=0, closefd=True)  # noqa: UP020
    except (OSError, ValueError):
        pass
    return OwnedFd(fd)


@dataclass(frozen=True)
class LeaseInfo:
    mode: str  # "exclusive", "shared" or ""
    epoch: int
    holders: tuple[tuple[str, int, int, float], ...]  # (lease id, pid, uid, expire time)
    waiters: int


_ACCESS = {pb.ACCESS_MODE_READ: "r", pb.ACCESS_MODE_WRITE: "w", pb.ACCESS_MODE_READ_WRITE: "rw"}
_LEASE_MODE = {pb.LeaseState.MODE_EXCLUSIVE: "exclusive", pb.LeaseState.MODE_SHARED: "shared"}


class Entry:
    """An entry as the broker described it (a snapshot: it does not follow later changes).

    A thin view over the ``fdbroker.v1.Entry`` message in ``raw``: fields are decoded when read, so listing
    20,000 entries costs one small object each, not twenty attribute conversions.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: pb.Entry) -> None:
        self.raw = raw

    @classmethod
    def from_pb(cls, m: pb.Entry) -> Entry:
        return cls(m)

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self.summary!r}, revision={self.revision})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and self.raw == other.raw

    __hash__ = None  # type: ignore[assignment]

    @property
    def name(self) -> str:
        """The entry's name."""
        return str(self.raw.name)

    @property
    def summary(self) -> str:
        """One line, e.g. "tcp listener 0.0.0.0:5432"."""
        return str(self.raw.info.summary)

    @property
    def family(self) -> str:
        """Socket family ("AF_INET", …) or ""."""
        return str(self.raw.info.family)

    @property
    def local_address(self) -> str:
        """Local address of a socket, as text."""
        return str(self.raw.info.local_address)

    @property
    def peer_address(self) -> str:
        """Peer address of a connected socket, as text."""
        return str(self.raw.info.peer_address)

    @property
    def listening(self) -> bool:
        """Whether the socket listens."""
        return bool(self.raw.info.listening)

    @property
    def path(self) -> str:
        """Path of a file, directory or FIFO; a memfd's name."""
        return str(self.raw.info.path)

    @property
    def owner_pid(self) -> int:
        """Pid of the depositor."""
        return int(self.raw.owner.pid)

    @property
    def owner_uid(self) -> int:
        """Uid of the depositor."""
        return int(self.raw.owner.uid)

    @property
    def owner_gid(self) -> int:
        """Gid of the depositor."""
        return int(self.raw.owner.gid)

    @property
    def revision(self) -> int:
        """Registry revision of the last change."""
        return int(self.raw.revision)

    @property
    def create_revision(self) -> int:
        """Registry revision of the creation."""
        return int(self.raw.create_revision)

    @property
    def ephemeral(self) -> bool:
        """Removed when the depositing session ends."""
        return bool(self.raw.ephemeral)

    @property
    def kind(self) -> str:
        """Short kind name: ``tcp-listener``, ``pipe``, ``file``, ``memfd``, …"""
        from fdbroker.fdinfo import kind_name

        return kind_name(self.raw.info.kind)

    @property
    def access_mode(self) -> str:
        """``r``, ``w``, ``rw`` or ``""``."""
        return _ACCESS.get(self.raw.info.access_mode, "")

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(self.raw.info.flags)

    @property
    def labels(self) -> Mapping[str, str]:
        return dict(self.raw.labels)

    @property
    def create_time(self) -> float:
        return float(self.raw.create_time.ToNanoseconds() / 1e9)

    @property
    def expire_time(self) -> float | None:
        m = self.raw
        return m.expire_time.ToNanoseconds() / 1e9 if m.HasField("expire_time") else None

    @property
    def lease(self) -> LeaseInfo:
        ls = self.raw.lease
        return LeaseInfo(
            mode=_LEASE_MODE.get(ls.mode, ""),
            epoch=ls.epoch,
            holders=tuple(
                (h.lease_id, h.identity.pid, h.identity.uid, h.expire_time.ToNanoseconds() / 1e9)
                for h in ls.holders
            ),
            waiters=ls.waiters,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``fdbroker ls --json`` prints per entry)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "summary": self.summary,
            "family": self.family,
            "local_address": self.local_address,
            "peer_address": self.peer_address,
            "listening": self.listening,
            "path": self.path,
            "access_mode": self.access_mode,
            "flags": list(self.flags),
            "owner": {"pid": self.owner_pid, "uid": self.owner_uid, "gid": self.owner_gid},
            "labels": dict(self.labels),
            "create_time": self.create_time,
            "revision": self.revision,
            "create_revision": self.create_revision,
            "expire_time": self.expire_time,
            "ephemeral": self.ephemeral,
            "lease": {
                "mode": self.lease.mode,
                "epoch": self.lease.epoch,
                "holders": [
                    {"lease_id": h[0], "pid": h[1], "uid": h[2], "expire_time": h[3]}
                    for h in self.lease.holders
                ],
                "waiters": self.lease.waiters,
            },
        }


@dataclass(frozen=True)
class Event:
    """One registry change from ``watch``."""

    type: str  # "put", "delete", "expire", "lease_granted", "lease_released"
    revision: int
    name: str
    entry: Entry
    reason: str  # "", "released", "expired", "holder_died", "entry_removed", "taken", "session_ended"
    lease_id: str
    epoch: int
    time: float

    @classmethod
    def from_pb(cls, m: pb.Event) -> Event:
        return cls(
            type=pb.Event.Type.Name(m.type).removeprefix("TYPE_").lower(),
            revision=m.revision,
            name=m.name,
            entry=Entry.from_pb(m.entry),
            reason=pb.Event.Reason.Name(m.reason).removeprefix("REASON_").lower() if m.reason else "",
            lease_id=m.lease_id,
            epoch=m.epoch,
            time=m.time.ToNanoseconds() / 1e9,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "revision": self.revision,
            "name": self.name,
            "reason": self.reason,
            "lease_id": self.lease_id,
            "epoch": self.epoch,
            "time": self.time,
            "entry": self.entry.to_json(),
        }


@dataclass(frozen=True)
class Info:
    """``GetInfo``: version, counts and limits."""

    version: str
    revision: int
    entries: int
    sessions: int
    pending_tokens: int
    max_entries: int
    max_entries_per_uid: int
    max_sessions_per_uid: int
    max_pending_tokens_per_uid: int
    token_ttl: float
    broker_pid: int
    start_time: float
    oldest_watch_revision: int
    caller: tuple[int, int, int] | None
    keeper_pid: int | None = None
    """The pid of the keeper that runs the broker (``serve --keeper``); None without one."""
    keeper_restarts: int = 0
    """How many times the keeper started the broker again (crash, kill, OOM, restart on request)."""
    keeper_last_exit: str = ""
    """Why the previous broker process ended ("killed by SIGKILL"); empty for the first one."""

    @classmethod
    def from_pb(cls, m: pb.GetInfoResponse) -> Info:
        return cls(
            version=m.version,
            revision=m.header.revision,
            entries=m.entries,
            sessions=m.sessions,
            pending_tokens=m.pending_tokens,
            max_entries=m.max_entries,
            max_entries_per_uid=m.max_entries_per_uid,
            max_sessions_per_uid=m.max_sessions_per_uid,
            max_pending_tokens_per_uid=m.max_pending_tokens_per_uid,
            token_ttl=m.token_ttl.ToNanoseconds() / 1e9,
            broker_pid=m.broker_pid,
            start_time=m.start_time.ToNanoseconds() / 1e9,
            oldest_watch_revision=m.oldest_watch_revision,
            caller=(m.caller.pid, m.caller.uid, m.caller.gid) if m.HasField("caller") else None,
            keeper_pid=m.keeper.pid if m.HasField("keeper") else None,
            keeper_restarts=m.keeper.restarts,
            keeper_last_exit=m.keeper.last_exit,
        )


@dataclass(frozen=True)
class Lease:
    """A granted lease. ``epoch`` is the fencing number to pass downstream."""

    lease_id: str
    name: str
    epoch: int
    ttl: float
    expire_time: float
    entry: Entry


class Listing(list[Entry]):
    """A list of entries and the registry ``revision`` of the listing's first page (watch from ``revision + 1``
    to miss nothing)."""

    revision: int = 0
