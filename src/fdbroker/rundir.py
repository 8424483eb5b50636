"""The run directory: where it is, claiming it for one broker, and leaving it clean.

The run directory holds ``control.sock`` (gRPC), ``conduit.sock`` (SCM_RIGHTS) and ``broker.lock``. One broker
owns it at a time: :meth:`RunDir.claim` takes an exclusive ``flock`` on ``broker.lock`` and keeps that
descriptor open (close-on-exec) for the broker's lifetime, so the kernel releases the claim the moment the
broker dies, however it dies. The lock file holds the owner's pid, for messages and :func:`broker_pid`.

Because the lock is held, any socket file found at claim time belongs to a dead broker and is removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from fdbroker.errors import BrokerError, Code, InvalidArgument

CONTROL_SOCKET = "control.sock"
CONDUIT_SOCKET = "conduit.sock"
LOCK_FILE = "broker.lock"
RUN_DIR_ENV = "FDBROKER_RUN_DIR"


class RunDirError(InvalidArgument):
    """The run directory cannot be used (not a directory, wrong owner, unsafe mode, cannot be created)."""


class AlreadyRunning(BrokerError):
    """Another live broker owns the run directory. ``pid`` is its pid (0 if unknown)."""

    code = Code.FAILED_PRECONDITION

    def __init__(self, message: str, *, pid: int = 0) -> None:
        super().__init__(message)
        self.pid = pid


def default_run_dir(*, uid: int | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """``/run/fdbroker`` for root; else ``$XDG_RUNTIME_DIR/fdbroker``; else ``<tempdir>/fdbroker-<uid>``.

    ``uid`` and ``environ`` default to the process's effective uid and environment (they are parameters so
    tests can ask for another user's default without changing identity).
    """
    if uid is None:
        uid = os.geteuid()
    if environ is None:
        environ = os.environ
    if uid == 0:
        return Path("/run/fdbroker")
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return Path(xdg) / "fdbroker"
    import tempfile  # only for this fallback: it costs ~5 ms of every CLI start

    return Path(tempfile.gettempdir()) / f"fdbroker-{uid}"


def resolve_run_dir(arg: str | None, *, environ: Mapping[str, str] | None = None) -> Path:
    """The run directory to use: ``arg`` (``--run-dir``), else ``$FDBROKER_RUN_DIR``, else the default."""
    if environ is None:
        environ = os.environ
    if arg:
        return Path(arg)
    env = environ.get(RUN_DIR_ENV, "")
    if env:
        return Path(env)
    return default_run_dir(environ=environ)


class RunDir:
    """A claimed run directory. Owns the lock descriptor until :meth:`release` (or the process's death)."""

    path: Path
    control_path: Path
    conduit_path: Path
    lock_path: Path

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self.control_path = path / CONTROL_SOCKET
        self.conduit_path = path / CONDUIT_SOCKET
        self.lock_path = path / LOCK_FILE
        self._lock_fd = lock_fd

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, lock_fd={self._lock_fd})"

    @property
    def lock_fd(self) -> int:
        """The descriptor holding the claim (-1 once released). Keep it out of child processes (it is
        close-on-exec)."""
        return self._lock_fd

    @classmethod
    def claim(cls, path: Path, *, dir_mode: int = 0o755) -> RunDir:
        """Creates ``path`` (and parents) if missing, checks it is safe, and claims it for this process.

        A directory created here gets exactly ``dir_mode`` (the umask does not apply); parents get 0o777 minus
        the umask. Raises :class:`RunDirError` if the path is not a directory, is owned by another uid (unless
        we are root), or is group/world-writable without the sticky bit; :class:`AlreadyRunning` if a live
        broker holds it. Stale ``control.sock``/``conduit.sock`` are removed. The caller owns the returned
        claim and must :meth:`release` it (or exit).
        """
        path = Path(path)
        _ensure_dir(path, dir_mode)
        _check_dir(path)
        lock_fd = _take_lock(path)
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            for name in (CONTROL_SOCKET, CONDUIT_SOCKET):
                _remove_stale_socket(path / name)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, lock_fd)

    def release(self) -> None:
        """Removes the sockets and the lock file, then drops the claim. Idempotent."""
        if self._lock_fd < 0:
            return
        for p in (self.control_path, self.conduit_path, self.lock_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        # Unlink before close: a broker waiting to claim then finds no file or a new one (see _take_lock).
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


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


def _ensure_dir(path: Path, dir_mode: int) -> None:
    try:
        os.stat(path)
        return
    except FileNotFoundError:
        pass
    except OSError as e:
        raise RunDirError(
            f"cannot use run directory {path}: {e.strerror}; choose another with --run-dir or {RUN_DIR_ENV}"
        ) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=dir_mode)
        except FileExistsError:
            return  # created concurrently: checked like any existing directory
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise RunDirError(
            f"cannot create run directory {path}: {e.strerror}{where}; create it, or choose another with "
            f"--run-dir or {RUN_DIR_ENV}"
        ) from None
    os.chmod(path, dir_mode)  # mkdir's mode is filtered by the umask


def _check_dir(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise RunDirError(f"cannot use run directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(
            f"run directory {path} exists and is not a directory; remove it or choose another with --run-dir"
        )
    euid = os.geteuid()
    if euid != 0 and st.st_uid != euid:
        raise RunDirError(
            f"run directory {path} is owned by uid {st.st_uid}, not by this broker's uid {euid}; "
            "another user's directory could be swapped under us: choose your own with --run-dir"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise RunDirError(
            f"run directory {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}) "
            f"without the sticky bit, so anyone could replace its sockets; chmod go-w {path}"
        )


def _take_lock(path: Path) -> int:
    lock_path = path / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot open lock file {lock_path}: {e.strerror}") from None
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
            same = os.fstat(fd).st_ino == os.stat(lock_path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


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


def _remove_stale_socket(p: Path) -> None:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RunDirError(
            f"{p} exists and is not a socket; remove it (the broker creates its sockets itself)"
        )
    try:
        os.unlink(p)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise RunDirError(f"cannot remove stale socket {p}: {e.strerror}") from None
