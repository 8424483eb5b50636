"""The run directory: where it is, who controls it, claiming it for one broker, and leaving it clean.

The run directory holds ``control.sock`` (gRPC), ``conduit.sock`` (SCM_RIGHTS) and ``broker.lock``. One broker
owns it at a time: :meth:`RunDir.claim` takes an exclusive ``flock`` on ``broker.lock`` and keeps that
descriptor open (close-on-exec) for the broker's lifetime, so the kernel releases the claim the moment the
broker dies, however it dies. The lock file holds the owner's pid, for messages and :func:`broker_pid`.

Whoever can write the run directory, or any directory above it, can replace the broker's sockets with their
own. :func:`open_dir` therefore reaches the directory one component at a time from ``/`` (``openat`` with
``O_NOFOLLOW``), checks who owns and who may write each component, and returns a descriptor of the directory
itself; the broker then creates its lock and sockets relative to that descriptor (``bind`` to
``/proc/self/fd/N/conduit.sock``, see :meth:`RunDir.address`), never through the path again. Clients use the
same walk with their own set of trusted uids (:mod:`fdbroker.client.core`). The rules are in docs/policy.md,
"Run directory and who serves it".

Because the lock is held, any socket file found at claim time belongs to a dead broker and is removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from types import TracebackType

from fdbroker.errors import BrokerError, Code, InvalidArgument

CONTROL_SOCKET = "control.sock"
CONDUIT_SOCKET = "conduit.sock"
LOCK_FILE = "broker.lock"
RUN_DIR_ENV = "FDBROKER_RUN_DIR"

MAX_SYMLINKS = 40  # as the kernel's own limit (ELOOP)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_PARENT_MODE = 0o755  # directories created on the way to a run directory


class RunDirError(InvalidArgument):
    """The run directory cannot be used (not a directory, wrong owner, unsafe mode, cannot be created).

    ``errno`` is the system error behind it, when there is one (``ENOENT``: it does not exist)."""

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class UnsafeRunDir(RunDirError):
    """A component of the run directory's path (or the directory itself) is controlled by a uid not trusted.

    ``path``: that component; ``uid``: its owner; ``mode``: its permission bits; ``reason``: what is wrong
    with it, as a phrase ("is owned by uid 65534", "is writable by group or others without the sticky bit",
    "is a symlink owned by uid 65534"); ``final``: whether it is the run directory itself rather than a
    directory (or symlink) on the way. The message says it all for a person."""

    def __init__(self, message: str, *, path: Path, uid: int, mode: int, reason: str, final: bool) -> None:
        super().__init__(message)
        self.path = path
        self.uid = uid
        self.mode = mode
        self.reason = reason
        self.final = final


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


# -- reaching a directory safely ---------------------------------------------------------------------------------


def open_dir(
    path: str | os.PathLike[str],
    *,
    trusted: Collection[int],
    owners: Collection[int] | None = None,
    create_mode: int | None = None,
) -> int:
    """Opens the directory ``path`` so that no uid outside ``trusted`` can have chosen what it is.

    Walks from ``/`` one component at a time (``openat`` with ``O_PATH | O_DIRECTORY | O_NOFOLLOW``) and
    requires of every directory on the way: owned by a uid in ``trusted``; not writable by group or others,
    except with the sticky bit (``/tmp``), where only the owner of an entry can rename or remove it and the
    next component is itself checked. The directory itself must be owned by a uid in ``owners`` (default
    ``trusted``) and not writable by group or others at all, sticky or not: anyone who may create files in
    it could plant a socket where the broker's is missing. A symlink is followed only if a trusted uid owns
    it (it sits in a directory that passed, so nobody else can replace it): ``/var/run`` works, a link planted
    in ``/tmp`` by another user does not.

    With ``create_mode``, missing directories are created: the last one with exactly that mode, the ones
    above it 0755 (each minus nothing: the umask cannot widen them). The new directories belong to the
    caller, and pass the checks like any other.

    Returns an ``O_PATH`` descriptor of the directory (close-on-exec): good as ``dir_fd`` for ``*at`` calls
    and, through ``/proc/self/fd/N/NAME``, for ``bind``/``connect``. The caller owns it and must close it.
    Raises :class:`UnsafeRunDir` naming the offending component, its owner and mode; :class:`RunDirError`
    for anything else (``errno`` ENOENT when it does not exist and ``create_mode`` is None, ENOTDIR, EACCES,
    ELOOP).
    """
    target = os.path.abspath(os.fspath(path))
    owners = trusted if owners is None else owners
    hops = 0
    while True:  # once per symlink followed: the walk starts over on the resolved path
        parts = [p for p in target.split("/") if p]
        fd = os.open("/", _DIR_FLAGS)
        here = Path("/")
        restart = ""
        try:
            _check_dir(fd, here, target, trusted=trusted if parts else owners, final=not parts)
            for i, name in enumerate(parts):
                final = i == len(parts) - 1
                here = here / name
                st = _lstat_or_create(
                    fd,
                    name,
                    here,
                    target,
                    None if create_mode is None else (create_mode if final else _PARENT_MODE),
                )
                if stat.S_ISLNK(st.st_mode):
                    if st.st_uid not in trusted:
                        raise _unsafe(here, target, st, f"is a symlink owned by uid {st.st_uid}", final=False)
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise RunDirError(
                            f"cannot use run directory {target}: too many symlinks on the way",
                            errno=errno.ELOOP,
                        )
                    link = os.readlink(name, dir_fd=fd)
                    restart = os.path.normpath(os.path.join(str(here.parent), link, *parts[i + 1 :]))
                    break
                if not stat.S_ISDIR(st.st_mode):
                    raise _not_a_directory(here, target)
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise _os_error(e, here, target) from None
                os.close(fd)
                fd = nfd
                _check_dir(fd, here, target, trusted=owners if final else trusted, final=final)
        except BaseException:
            os.close(fd)
            raise
        if not restart:
            return fd
        os.close(fd)
        target = restart


def _lstat_or_create(dir_fd: int, name: str, here: Path, target: str, mode: int | None) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        if mode is None:
            raise RunDirError(f"{here} does not exist", errno=errno.ENOENT) from None
    except OSError as e:
        raise _os_error(e, here, target) from None
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
        # mkdir's mode is filtered by the umask; the parent is checked, so nobody else can swap the new entry.
        os.chmod(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass  # created concurrently: checked like any existing directory
    except OSError as e:
        raise RunDirError(
            f"cannot create run directory {target}: {e.strerror} ({here}); create it, or choose another with "
            f"--run-dir or {RUN_DIR_ENV}",
            errno=e.errno or 0,
        ) from None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        raise _os_error(e, here, target) from None


def _check_dir(fd: int, here: Path, target: str, *, trusted: Collection[int], final: bool) -> None:
    st = os.fstat(fd)
    if st.st_uid not in trusted:
        raise _unsafe(here, target, st, f"is owned by uid {st.st_uid}", final=final)
    if st.st_mode & _WRITABLE_BY_OTHERS:
        if final:
            raise _unsafe(here, target, st, "is writable by group or others", final=final)
        if not st.st_mode & stat.S_ISVTX:
            raise _unsafe(
                here, target, st, "is writable by group or others without the sticky bit", final=final
            )


def _unsafe(here: Path, target: str, st: os.stat_result, reason: str, *, final: bool) -> UnsafeRunDir:
    mode = stat.S_IMODE(st.st_mode)
    where = "" if final else f" (on the way to {target})"
    detail = f"mode {mode:04o}" if "uid" in reason else f"mode {mode:04o}, owner uid {st.st_uid}"
    return UnsafeRunDir(
        f"{here}{where} {reason} ({detail})",
        path=here,
        uid=st.st_uid,
        mode=mode,
        reason=reason,
        final=final,
    )


def _not_a_directory(here: Path, target: str) -> RunDirError:
    if str(here) == target:
        return RunDirError(
            f"run directory {target} exists and is not a directory; remove it or choose another with "
            "--run-dir",
            errno=errno.ENOTDIR,
        )
    return RunDirError(
        f"cannot use run directory {target}: Not a directory ({here}); choose another with --run-dir or "
        f"{RUN_DIR_ENV}",
        errno=errno.ENOTDIR,
    )


def _os_error(e: OSError, here: Path, target: str) -> RunDirError:
    return RunDirError(
        f"cannot use run directory {target}: {e.strerror} ({here}); choose another with --run-dir or "
        f"{RUN_DIR_ENV}",
        errno=e.errno or 0,
    )


def proc_path(dir_fd: int, name: str) -> str:
    """``/proc/self/fd/DIR_FD/NAME``: a path that reaches ``name`` through the open directory ``dir_fd`` (for
    ``bind``/``connect`` of ``AF_UNIX`` sockets, which take no ``dir_fd``; 30-odd bytes, whatever the length
    of the directory's own path, so ``sun_path``'s 108 bytes are never the limit)."""
    return f"/proc/self/fd/{dir_fd}/{name}"


# -- the broker's claim ------------------------------------------------------------------------------------------


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
        :class:`AlreadyRunning` if a live broker holds it. Stale ``control.sock``/``conduit.sock`` are
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
            for name in (CONTROL_SOCKET, CONDUIT_SOCKET):
                _remove_stale_socket(path, dir_fd, name)
        except BaseException:
            os.close(lock_fd)
            os.close(dir_fd)
            raise
        return cls(path, lock_fd, dir_fd)

    @classmethod
    def adopt(cls, path: Path, dir_fd: int, lock_fd: int, stale: Collection[str] = ()) -> RunDir:
        """A claim handed over by a predecessor (``serve --takeover``): ``lock_fd`` is its lock, already
        held; ``dir_fd`` comes from :meth:`open` (done before the handover, so an unsafe directory is refused
        while the predecessor still serves). Records our pid and removes the predecessor's sockets
        (``control.sock``, ``conduit.sock`` and ``stale``). Takes ownership of both descriptors, on failure
        too."""
        try:
            _write_pid(lock_fd)
            for name in (CONTROL_SOCKET, CONDUIT_SOCKET, *stale):
                _remove_stale_socket(path, dir_fd, name)
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


def _remove_stale_socket(path: Path, dir_fd: int, name: str) -> None:
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
