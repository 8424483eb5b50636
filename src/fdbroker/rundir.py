"""The run directory, as both sides see it: where it is, and reaching it so no untrusted uid chose what it is.

The run directory holds ``control.sock`` (gRPC) and ``conduit.sock`` (SCM_RIGHTS). :func:`resolve_run_dir` says
which one to use (``--run-dir``, ``$FDBROKER_RUN_DIR``, or the default for this user); :func:`find_run_dir` is
the same for a client, which also finds the system broker when the user has none of its own.

Whoever can write the run directory, or any directory above it, can replace the broker's sockets with their
own. :func:`open_dir` therefore reaches the directory one component at a time from ``/`` (``openat`` with
``O_NOFOLLOW``), checks who owns and who may write each component, and returns a descriptor of the directory
itself; the caller then reaches the sockets relative to that descriptor (``/proc/self/fd/N/conduit.sock``, see
:func:`proc_path`), never through the path again. The broker claims the directory with the walk
(:mod:`fdbroker.broker.rundir`); clients use the same walk with their own set of trusted uids
(:mod:`fdbroker.client.core`). The rules are in docs/policy.md, "Run directory and who serves it".

Descriptor ownership: :func:`open_dir` returns a descriptor the caller owns and must close.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path

from fdbroker.errors import InvalidArgument

CONTROL_SOCKET = "control.sock"
CONDUIT_SOCKET = "conduit.sock"
RUN_DIR_ENV = "FDBROKER_RUN_DIR"
SYSTEM_RUN_DIR = Path("/run/fdbroker")
"""The system broker's run directory: root's default, and where a client of another user looks when it has no
broker of its own (:func:`find_run_dir`). A module constant, so tests can point it at a stand-in."""

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
        return SYSTEM_RUN_DIR
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


def find_run_dir(
    arg: str | None, *, uid: int | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The run directory a *client* uses: :func:`resolve_run_dir`, except that with neither ``arg`` nor
    ``$FDBROKER_RUN_DIR`` a caller whose own default holds no broker (no ``conduit.sock``) uses the system
    broker's :data:`SYSTEM_RUN_DIR` if that holds one (or cannot be looked into: the client then says why).

    Only clients look elsewhere: ``fdbroker serve`` uses :func:`resolve_run_dir`, so a broker is never started
    in another broker's directory. Two ``lstat`` calls, and only when nothing names the directory. ``uid`` and
    ``environ`` as for :func:`default_run_dir`.
    """
    if environ is None:
        environ = os.environ
    if arg or environ.get(RUN_DIR_ENV, ""):
        return resolve_run_dir(arg, environ=environ)
    own = default_run_dir(uid=uid, environ=environ)
    if own != SYSTEM_RUN_DIR and not _may_hold_broker(own) and _may_hold_broker(SYSTEM_RUN_DIR):
        return SYSTEM_RUN_DIR
    return own


def _may_hold_broker(path: Path) -> bool:
    try:
        os.lstat(path / CONDUIT_SOCKET)
    except PermissionError:
        return True  # there, but not for us to see: whoever connects is told
    except OSError:
        return False
    return True


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
