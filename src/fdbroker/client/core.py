"""What the sync and asyncio clients share: result types, request building, status → error mapping, turning
a received descriptor into the right Python object, and deciding whether to trust what serves the run directory.
Only the I/O differs between the two clients.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import socket
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple, Protocol

from fdbroker.errors import (
    Aborted,
    BrokerError,
    Code,
    InvalidArgument,
    OutOfRange,
    Unavailable,
    UntrustedBroker,
    error_for_code,
)
from fdbroker.protocol import OLDEST_REVISION_KEY
from fdbroker.rundir import (
    CONDUIT_SOCKET,
    CONTROL_SOCKET,
    RunDirError,
    UnsafeRunDir,
    open_dir,
    proc_path,
    resolve_run_dir,
)
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

if TYPE_CHECKING:
    from fdbroker.conduit.conduit import Credentials
    from fdbroker.conduit.frames import Frame


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
            _close_quietly(fd)

    def __del__(self) -> None:
        # Cheaper than a weakref.finalize per descriptor (a batch of 253 paid ~0.8 ms for those).
        self.close()

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})" if self._fd >= 0 else "OwnedFd(closed)"


def _close_quietly(fd: int) -> None:
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


# -- request building ------------------------------------------------------------------------------------------


def put_request(
    name: str,
    *,
    labels: Mapping[str, str] | None,
    ttl: float | None,
    ephemeral: bool,
    replace: bool,
    if_revision: int,
) -> pb.PutRequest:
    req = pb.PutRequest(name=name, replace=replace, if_revision=if_revision)
    if labels:
        req.options.labels.update(labels)
    if ttl:
        req.options.ttl.FromNanoseconds(int(ttl * 1e9))
    req.options.ephemeral = ephemeral
    return req


def lease_request(name: str, ttl: float, shared: bool, wait: bool) -> pb.LeaseRequest:
    req = pb.LeaseRequest(
        name=name,
        mode=pb.LeaseState.MODE_SHARED if shared else pb.LeaseState.MODE_EXCLUSIVE,
        wait=wait,
    )
    req.ttl.FromNanoseconds(int(ttl * 1e9))
    return req


@dataclass(frozen=True)
class Paths:
    run_dir: Path
    control: Path
    conduit: Path

    @classmethod
    def resolve(cls, run_dir: str | os.PathLike[str] | None) -> Paths:
        d = resolve_run_dir(None if run_dir is None else os.fspath(run_dir))
        return cls(d, d / CONTROL_SOCKET, d / CONDUIT_SOCKET)

    def not_running(self, detail: str = "") -> Unavailable:
        extra = f" ({detail})" if detail else ""
        return Unavailable(
            f"no broker at {self.run_dir}{extra}; start one with `fdbroker serve --run-dir {self.run_dir}` "
            "or point --run-dir / FDBROKER_RUN_DIR at a running one"
        )


# -- whom to trust ---------------------------------------------------------------------------------------------

TRUST_UID_ENV = "FDBROKER_TRUST_UID"

TrustUids = Iterable[int | str] | int | str
"""What ``Client(trust_uids=...)`` accepts: uids and user names, one or several (a string may hold several,
comma-separated, as ``$FDBROKER_TRUST_UID`` does)."""


def parse_uids(values: TrustUids, *, source: str) -> frozenset[int]:
    """Uids from numbers, numeric strings and user names (comma-separated strings are split); ``source`` names
    where they came from in the :class:`InvalidArgument` raised for a user that does not exist."""
    if isinstance(values, (int, str)):
        values = [values]
    out: set[int] = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise InvalidArgument(f"{source}: {v!r} is neither a uid nor a user name")
        if isinstance(v, int):
            if v < 0:
                raise InvalidArgument(f"{source}: {v} is not a uid")
            out.add(v)
            continue
        for word in v.split(","):
            word = word.strip()
            if not word:
                continue
            if word.isdigit():
                out.add(int(word))
                continue
            import pwd

            try:
                out.add(pwd.getpwnam(word).pw_uid)
            except KeyError:
                raise InvalidArgument(
                    f"{source}: no user named {word!r} on this system; give the broker's uid as a number"
                ) from None
    return frozenset(out)


class Trust:
    """Whom a client accepts as its broker, and the checks that enforce it before anything is sent.

    Trusted: root, the client's own effective uid, and ``trust_uids`` (when None: the uids and user names in
    ``$FDBROKER_TRUST_UID``, comma-separated). The checks, each raising :class:`UntrustedBroker` naming the uid
    found and the uids trusted:

    * :meth:`open_run_dir`: the run directory and every directory above it belong to trusted uids and none is
      writable by others (sticky parents excepted), reached without untrusted symlinks
      (:func:`fdbroker.rundir.open_dir`); returns the directory's descriptor, through which the client then
      connects, so later reconnections reach the same, checked directory;
    * :meth:`check_peer`: the conduit's ``SO_PEERCRED`` uid, right after ``connect``, before any frame;
    * :meth:`check_control`: the owner of ``control.sock`` (``lstat``), before the first gRPC call. The
      directory check is what makes a file owner meaningful: only trusted uids can create or replace a file in
      it.
    """

    def __init__(
        self, trust_uids: TrustUids | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self.own_uid = os.geteuid()
        if trust_uids is None:
            env = (os.environ if environ is None else environ).get(TRUST_UID_ENV, "")
            extra = parse_uids(env, source=f"${TRUST_UID_ENV}")
        else:
            extra = parse_uids(trust_uids, source="trust_uids")
        self.uids = frozenset({0, self.own_uid, *extra})

    def __repr__(self) -> str:
        return f"Trust({sorted(self.uids)})"

    def describe(self) -> str:
        """The trusted uids for a message: ``uids 0 (root), 1000 (this client), 65534``."""
        words = []
        for uid in sorted(self.uids):
            notes = [n for n, ok in (("root", uid == 0), ("this client", uid == self.own_uid)) if ok]
            words.append(f"{uid} ({', '.join(notes)})" if notes else str(uid))
        return ("uid " if len(words) == 1 else "uids ") + ", ".join(words)

    def refuse(self, paths: Paths, uid: int, what: str, *, path: str, fix: str = "") -> UntrustedBroker:
        """The :class:`UntrustedBroker` for ``what`` (e.g. "conduit.sock is served by uid 65534")."""
        if not fix:
            fix = (
                f"if uid {uid} runs your broker, trust it with {TRUST_UID_ENV}={uid} (or Client(trust_uids="
                f"[{uid}])); otherwise another user may be impersonating the broker"
            )
        return UntrustedBroker(
            f"refusing the broker at {paths.run_dir}: {what}, but this client trusts only {self.describe()}; "
            f"nothing was sent. {fix[0].upper()}{fix[1:]}",
            uid=uid,
            trusted=tuple(sorted(self.uids)),
            path=path,
        )

    def open_run_dir(self, paths: Paths) -> int:
        """The run directory's ``O_PATH`` descriptor (the caller owns it), once it passed the checks.

        :class:`UntrustedBroker` if another uid controls it; :class:`Unavailable` if it does not exist or cannot
        be reached."""
        try:
            return open_dir(paths.run_dir, trusted=self.uids)
        except UnsafeRunDir as e:
            fix = f"chmod go-w {e.path}" if e.reason.startswith("is writable") else ""
            raise self.refuse(paths, e.uid, str(e), path=str(e.path), fix=fix) from None
        except RunDirError as e:
            if e.errno == errno.ENOENT:
                raise paths.not_running(f"{paths.run_dir} does not exist") from None
            raise Unavailable(e.message) from None

    def check_peer(self, paths: Paths, cred: Credentials) -> None:
        """Refuse a conduit served by an untrusted uid (``cred`` from ``SO_PEERCRED``, read after connect)."""
        if cred.uid not in self.uids:
            raise self.refuse(
                paths,
                cred.uid,
                f"{paths.conduit} is served by uid {cred.uid} (pid {cred.pid})",
                path=str(paths.conduit),
            )

    def check_control(self, paths: Paths, dir_fd: int) -> None:
        """Refuse a ``control.sock`` that is not a socket of a trusted uid (``lstat`` through ``dir_fd``).

        :class:`Unavailable` if there is none."""
        try:
            st = os.stat(CONTROL_SOCKET, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise paths.not_running(f"{paths.control} does not exist") from None
        except OSError as e:
            raise paths.not_running(f"{paths.control}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise Unavailable(
                f"{paths.control} is not a socket; is {paths.run_dir} a broker's run directory?"
            )
        if st.st_uid not in self.uids:
            raise self.refuse(
                paths, st.st_uid, f"{paths.control} belongs to uid {st.st_uid}", path=str(paths.control)
            )


def socket_address(dir_fd: int, path: Path) -> str:
    """Where to ``connect`` to the socket ``path`` in the run directory held open as ``dir_fd``: through the
    descriptor (``/proc/self/fd/N/NAME``), so the socket is the one in the directory that was checked; the plain
    path only where ``/proc`` is not mounted (the checked directory chain then keeps the path stable)."""
    via_fd = proc_path(dir_fd, path.name)
    return via_fd if os.path.isdir(os.path.dirname(via_fd)) else str(path)


def connect_failure(paths: Paths, err: Any) -> str:
    """Why connecting to the conduit failed (``err`` a ``ConduitError``), naming the socket by its real path
    rather than the ``/proc/self/fd`` one the client connected through."""
    if getattr(err, "errno", None):
        return f"{paths.conduit}: {os.strerror(err.errno)}"
    return str(err)


# -- errors ----------------------------------------------------------------------------------------------------


def error_from_rpc(err: Any, paths: Paths | None = None, name: str = "") -> BrokerError:
    """The one place a gRPC error becomes a :class:`BrokerError` (both clients use it)."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    num = code.value[0] if code is not None else Code.UNKNOWN
    if num == Code.UNAVAILABLE and paths is not None:
        # gRPC's text names its resolver and subchannel states; say what a person can act on instead.
        if not paths.control.exists():
            return paths.not_running(f"{paths.control} does not exist")
        return paths.not_running(f"nothing accepts connections on {paths.control}")
    if num == Code.OUT_OF_RANGE:
        oldest = 0
        md = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
        for k, v in md or ():
            if k == OLDEST_REVISION_KEY:
                oldest = int(v)
        return OutOfRange(details or "out of range", name=name, oldest_revision=oldest)
    return error_for_code(num, details or (code.name if code is not None else "unknown error"), name=name)


def error_from_frame(e: cpb.Error) -> BrokerError:
    return error_for_code(e.code, e.message, name=e.name)


def now() -> float:
    return time.monotonic()


# -- conduit answers -------------------------------------------------------------------------------------------
# What both clients do with frames once read; only how they read and wait differs.


class Mail(NamedTuple):
    """One answer on the conduit, filed under its token.

    ``kind`` is ``"deliver"`` (``message`` a ``DeliverItem``, ``fd`` the received descriptor), ``"batch"`` (the
    answer to a batch token: ``message`` is ``(items, fds)``, every item of its ``Deliver`` frame and their
    descriptors), ``"deposited"`` (a ``DepositResult``), ``"acked"`` (the ``Acked``) or ``"error"`` (an ``Error``
    naming the token); ``fd`` is -1 except for deliveries. Whoever holds a ``Mail`` owns its descriptors (close
    them with :func:`close_mail`).
    """

    kind: str
    message: Any
    fd: int


def sort_frame(frame: Frame) -> tuple[list[tuple[bytes, Mail]], BrokerError | None]:
    """Split a received frame into answers keyed by token.

    Takes ownership of ``frame.fds``: each ``Deliver`` item's descriptor moves into its :class:`Mail`; every other
    descriptor (and all of them, if a ``Deliver`` carries a different number of descriptors than items) is closed.
    The second value is an error about a whole frame (an ``Error`` frame without a token), if any.
    """
    m = frame.message
    kind = m.WhichOneof("body")
    if kind == "deliver":
        items = m.deliver.items
        if len(items) != len(frame.fds):
            n = len(frame.fds)
            frame.close_fds()
            return [], Aborted(
                f"the broker delivered {n} descriptor(s) for {len(items)} item(s); all were closed"
            )
        fds, frame.fds = frame.fds, []
        if len(items) > 1 and not items[1].token:
            # The answer to a batch token fills its frame alone; its items after the first carry no token.
            return [(items[0].token, Mail("batch", (list(items), fds), -1))], None
        return [(item.token, Mail("deliver", item, fd)) for item, fd in zip(items, fds, strict=True)], None
    frame.close_fds()
    if kind == "deposited":
        return [(r.token, Mail("deposited", r, -1)) for r in m.deposited.results], None
    if kind == "acked":
        return [(t, Mail("acked", m.acked, -1)) for t in m.acked.tokens], None
    if kind == "error":
        if m.error.token:
            return [(m.error.token, Mail("error", m.error, -1))], None
        return [], error_from_frame(m.error)
    return [], None


def close_mail(mails: Iterable[Mail]) -> None:
    """Close the descriptors of deliveries nobody will take."""
    for mail in mails:
        if mail.fd >= 0:
            _close_quietly(mail.fd)
        if mail.kind == "batch":
            for fd in mail.message[1]:
                _close_quietly(fd)


def deliveries(mails: Sequence[Mail], names: Sequence[str]) -> list[tuple[int, cpb.DeliverItem]]:
    """Deliveries → ``(fd, item)`` in order; the caller owns the fds. If any answer is not a delivery, every fd
    received is closed and the first error is raised."""
    out: list[tuple[int, cpb.DeliverItem]] = []
    first_err: BrokerError | None = None
    for mail, name in zip(mails, names, strict=True):
        if mail.kind == "deliver":
            out.append((mail.fd, mail.message))
        elif first_err is None:
            first_err = (
                error_from_frame(mail.message)
                if mail.kind == "error"
                else Aborted(f"unexpected {mail.kind} for {name!r}", name=name)
            )
    if first_err is not None:
        close_mail(Mail("deliver", None, fd) for fd, _ in out)
        raise first_err
    return out


def deposited_entries(mails: Sequence[Mail], names: Sequence[str]) -> list[Entry]:
    """``Deposited`` results → the stored entries in order; raises the first refusal (naming its entry)."""
    out: list[Entry] = []
    first_err: BrokerError | None = None
    for mail, name in zip(mails, names, strict=True):
        if mail.kind == "deposited" and not mail.message.HasField("error"):
            out.append(Entry.from_pb(mail.message.entry))
        elif first_err is None:
            first_err = error_from_frame(mail.message.error if mail.kind == "deposited" else mail.message)
            first_err.name = first_err.name or name
    if first_err is not None:
        raise first_err
    return out


# -- prefetched GET tokens -------------------------------------------------------------------------------------

PREFETCH_LIMIT = 256
# Batch tokens each carry a pre-encoded frame of the whole batch in the broker: fewer of them.
BATCH_PREFETCH_LIMIT = 64
"""Most extra GET tokens the adaptive policy asks for per ``Get`` RPC."""

_REDEEM_MARGIN = 0.25  # a token this close to expiry is not worth a round trip


class PrefetchPolicy:
    """How many extra GET tokens to ask for with a ``Get`` of ``name``.

    ``fixed`` (not None) is always the answer. Otherwise adaptive: 0 for the first get of a name, then 8, 16, …,
    256 while the name keeps being fetched within a token lifetime of the previous get: a name fetched in a
    loop pays one RPC per 257 gets (a refill of 64 cost ~21 us per get, amortized). Both clients use it.
    """

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self._recent: dict[str, tuple[float, int]] = {}

    def next(self, name: str, token_ttl: float) -> int:
        if self.fixed is not None:
            return self.fixed
        t = time.monotonic()
        last, n = self._recent.get(name, (0.0, 0))
        n = n + 1 if t - last < token_ttl else 0
        self._recent[name] = (t, n)
        if len(self._recent) > 4096:
            self._recent.clear()
        return 0 if n == 0 else min(PREFETCH_LIMIT, 4 << min(n, 6))


class PrefetchedTokens:
    """GET tokens issued ahead, per name, each with its expiry (monotonic). Tokens belong to one session."""

    def __init__(self) -> None:
        self._by_name: dict[str, collections.deque[tuple[bytes, float]]] = {}

    def add(self, name: str, tokens: Iterable[bytes], expire: float) -> None:
        self._by_name.setdefault(name, collections.deque()).extend((t, expire) for t in tokens)

    def pop(self, name: str) -> bytes | None:
        """The next token for ``name`` that is not about to expire, or None."""
        q = self._by_name.get(name)
        t = time.monotonic()
        while q:
            tok, exp = q.popleft()
            if exp - t >= _REDEEM_MARGIN:
                return tok
        self._by_name.pop(name, None)
        return None

    def count(self, name: str) -> int:
        return len(self._by_name.get(name, ()))

    def drop(self, name: str) -> None:
        self._by_name.pop(name, None)

    def clear(self) -> None:
        self._by_name.clear()
