"""Where the broker is and whether to believe it: the run directory's sockets (:class:`Paths`) and the checks a
client makes before it sends anything (:class:`Trust`). Both clients and :mod:`fdbroker.client.quick` use these;
the directory walk itself is :func:`fdbroker.rundir.open_dir`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fdbroker.errors import InvalidArgument, Unavailable, UntrustedBroker
from fdbroker.rundir import (
    CONDUIT_SOCKET,
    CONTROL_SOCKET,
    RunDirError,
    UnsafeRunDir,
    open_dir,
    proc_path,
    resolve_run_dir,
)

if TYPE_CHECKING:
    from fdbroker.conduit.conduit import Credentials


@dataclass(frozen=True)
class Paths:
    """A broker's run directory and its two sockets (``control.sock`` for gRPC, ``conduit.sock``)."""

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
