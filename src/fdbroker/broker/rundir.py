"""Claiming the run directory for one broker, and leaving it clean.

One broker owns a run directory at a time: :meth:`RunDir.claim` reaches it with :func:`fdbroker.rundir.open_dir`
(every directory on the way owned by root or the broker's uid, none writable by others), takes an exclusive
``flock`` on ``broker.lock`` and keeps that descriptor open (close-on-exec) for the broker's lifetime, so the
kernel releases the claim the moment the broker dies, however it dies. The lock file holds the owner's pid, for
messages and :func:`broker_pid`. The broker then creates its sockets relative to the directory's descriptor
(:meth:`RunDir.address`), never through the path again.

Because the lock is held, any socket file found at claim time belongs to a dead broker and is removed
(:func:`remove_stale_socket`, the one place that does it).

Descriptor ownership: a :class:`RunDir` owns its directory and lock descriptors until :meth:`RunDir.release` or
:meth:`RunDir.abandon` (or the process's death).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from fdbroker.errors import BrokerError, Code
from fdbroker.rundir import (
    CONDUIT_SOCKET,
    CONTROL_SOCKET,
    RUN_DIR_ENV,
    RunDirError,
    UnsafeRunDir,
    open_dir,
    proc_path,
)

LOCK_FILE = "broker.lock"
HANDOVER_SOCKET = "handover.sock"
BROKER_SOCKETS = (CONTROL_SOCKET, CONDUIT_SOCKET, HANDOVER_SOCKET)
"""Every socket a broker binds in its run directory: found at claim time, each is a dead broker's."""


class AlreadyRunning(BrokerError):
    """Another live broker owns the run directory. ``pid`` is its pid (0 if unknown)."""

    code = Code.FAILED_PRECONDITION

    def __init__(self, message: str, *, pid: int = 0) -> None:
        super().__init__(message)
        self.pid = pid


class RunDir:
    """A claimed run directory. Owns the directory descriptor and the lock descriptor until :meth:`release`
    (or :meth:`abandon`, or the process's death)."""

    path: Path
    control_path: Path
    conduit_path: Path
    lock_path: Path

    def __init__(self, path: Path, lock_fd: int, dir_fd: int) -> None:
        self.path = path
        self.control_path = path / CONTROL_SOCKET
        self.conduit_path = path / CONDUIT_SOCKET
        self.lock_path = path / LOCK_FILE
        self._lock_fd = lock_fd
        self._dir_fd = dir_fd

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, lock_fd={self._lock_fd}, dir_fd={self._dir_fd})"

    @property
    def lock_fd(self) -> int:
        """The descriptor holding the claim (-1 once released). Keep it out of child processes (it is
        close-on-exec)."""
        return self._lock_fd

    @property
    def dir_fd(self) -> int:
        """The ``O_PATH`` descriptor of the directory (-1 once released): create and remove files with it as
        ``dir_fd``."""
        return self._dir_fd

    def address(self, name: str) -> str:
        """Where to ``bind`` the socket ``name``: ``/proc/self/fd/N/name``, resolved through the held
        directory descriptor, so the socket lands in the directory that was checked whatever happens to its
        path (gRPC accepts ``unix:`` + this too)."""
        return proc_path(self._dir_fd, name)

    @staticmethod
    def open(path: Path, *, dir_mode: int | None = None) -> int:
        """The broker's :func:`open_dir`: every directory on the way owned by root or this broker's uid, the
        run directory itself by this broker's uid, none writable by others (sticky parents excepted). With
        ``dir_mode``, missing directories are created. Returns the directory descriptor (the caller owns it);
        raises :class:`RunDirError` naming the offending path, its owner and mode."""
        euid = os.geteuid()
        try:
            fd = open_dir(path, trusted={0, euid}, owners={euid}, create_mode=dir_mode)
        except UnsafeRunDir as e:
            raise UnsafeRunDir(
                _broker_refusal(Path(path), e, euid),
                path=e.path,
                uid=e.uid,
                mode=e.mode,
                reason=e.reason,
                final=e.final,
            ) from None
        except RunDirError as e:
            if e.errno == errno.ENOENT and dir_mode is None:
                raise RunDirError(
                    f"run directory {path} does not exist; start the broker without --takeover to create it",
                    errno=e.errno,
                ) from None
            raise
        if not os.path.isdir(proc_path(fd, "")):
            os.close(fd)
            raise RunDirError(
                f"cannot serve from {path}: /proc is not mounted, and the broker binds its sockets through "
                "/proc/self/fd/N (the run directory's descriptor); mount /proc",
                errno=errno.ENOENT,
            )
        return fd

    @classmethod
    def claim(cls, path: Path, *, dir_mode: int = 0o755) -> RunDir:
        """Creates ``path`` (and parents) if missing, checks it is safe, and claims it for this process.

        A directory created here gets exactly ``dir_mode`` (the umask does not apply); parents get 0755.
        Raises :class:`RunDirError` if the path is not a directory, or (:class:`UnsafeRunDir`) if it or a
        directory above it could be changed by another uid (see :func:`open_dir` and :meth:`open`);
        :class:`AlreadyRunning` if a live broker holds it. Stale sockets (:data:`BROKER_SOCKETS`) are
        removed. The caller owns the returned claim and must :meth:`release` it (or exit).
        """
        path = Path(path)
        dir_fd = cls.open(path, dir_mode=dir_mode)
        try:
            lock_fd = _take_lock(path, dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            _write_pid(lock_fd)
            for name in BROKER_SOCKETS:
                remove_stale_socket(path, dir_fd, name)
        except BaseException:
            os.close(lock_fd)
            os.close(dir_fd)
            raise
        return cls(path, lock_fd, dir_fd)

    @classmethod
    def adopt(cls, path: Path, dir_fd: int, lock_fd: int) -> RunDir:
        """A claim handed over by a predecessor (``serve --takeover``): ``lock_fd`` is its lock, already
        held; ``dir_fd`` comes from :meth:`open` (done before the handover, so an unsafe directory is refused
        while the predecessor still serves). Records our pid and removes the predecessor's sockets
        (:data:`BROKER_SOCKETS`). Takes ownership of both descriptors, on failure
        too."""
        try:
            _write_pid(lock_fd)
            for name in BROKER_SOCKETS:
                remove_stale_socket(path, dir_fd, name)
        except BaseException:
            os.close(lock_fd)
            os.close(dir_fd)
            raise
        return cls(Path(path), lock_fd, dir_fd)

    def release(self) -> None:
        """Removes the sockets and the lock file, then drops the claim and closes the directory. Idempotent.

        Stop the gRPC server first: it unlinks ``control.sock`` through :meth:`address`, which needs the
        directory descriptor still open."""
        if self._lock_fd < 0:
            return
        for name in (CONTROL_SOCKET, CONDUIT_SOCKET, LOCK_FILE):
            try:
                os.unlink(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
        # Unlink before close: a broker waiting to claim then finds no file or a new one (see _take_lock).
        self.abandon()

    def abandon(self) -> None:
        """Closes both descriptors and removes nothing: after a handover, the successor holds the same lock
        and serves from the same directory. Idempotent."""
        for fd in (self._lock_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._dir_fd = -1

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _broker_refusal(path: Path, e: UnsafeRunDir, euid: int) -> str:
    real = "" if e.path == Path(os.path.abspath(path)) else f" (reached as {e.path})"
    if e.final and e.reason.startswith("is owned by"):
        return (
            f"run directory {path}{real} is owned by uid {e.uid}, not by this broker's uid {euid} (mode "
            f"{e.mode:04o}); another user's directory could be swapped under us: choose your own with "
            "--run-dir"
        )
    if e.final:
        return (
            f"run directory {path}{real} is writable by group or others (mode {e.mode:04o}, owner uid "
            f"{e.uid}), so anyone could plant or replace its sockets; chmod go-w {path}"
        )
    return (
        f"refusing run directory {path}: {e}; whoever controls {e.path} could replace the run directory. "
        f"Every directory and symlink above it must belong to root or uid {euid}, and no directory be "
        f"writable by others (sticky ones like /tmp excepted): fix {e.path} or choose another with --run-dir "
        f"or {RUN_DIR_ENV}"
    )


def broker_pid(path: Path) -> int | None:
    """The pid of the live broker owning ``path``, or None when no broker holds it.

    Probes the lock with a non-blocking shared ``flock``: if it can be taken, nobody owns the directory (the
    pid in a leftover lock file is a dead broker's). Returns None as well if the pid cannot be read.
    """
    try:
        fd = os.open(Path(path) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or None
        return None  # closing the descriptor drops the probe lock
    finally:
        os.close(fd)


def _take_lock(path: Path, dir_fd: int) -> int:
    lock_path = path / LOCK_FILE
    while True:
        try:
            fd = os.open(
                LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd
            )
        except OSError as e:
            raise RunDirError(
                f"cannot open lock file {lock_path}: {e.strerror}", errno=e.errno or 0
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"another broker (pid {pid})" if pid else "another broker"
            raise AlreadyRunning(
                f"{who} owns {path}; stop it or use --run-dir for a separate broker", pid=pid
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # A releasing broker unlinks the file before it closes its descriptor: if we locked an unlinked (or
        # replaced) inode, the claim is worthless; try again with the file now at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_pid(lock_fd: int) -> None:
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


def _read_pid(fd: int) -> int:
    try:
        data = os.pread(fd, 32, 0)
    except OSError:
        return 0
    try:
        pid = int(data.strip() or b"0")
    except ValueError:
        return 0
    return pid if pid > 0 else 0


def remove_stale_socket(path: Path, dir_fd: int, name: str) -> None:
    """Remove the socket ``name`` of the run directory ``dir_fd`` (``path``, for messages) if there is one; a dead
    broker left it (the caller holds the lock). :class:`RunDirError` if something else is there, or it cannot be
    removed."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RunDirError(
            f"{path / name} exists and is not a socket; remove it (the broker creates its sockets itself)"
        )
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise RunDirError(
                f"cannot remove stale socket {path / name}: {e.strerror}", errno=e.errno or 0
            ) from None
