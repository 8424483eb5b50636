"""What ``put`` deposits: the descriptor it opens or binds in this process, and how that is undone.

The broker decides a put only once the descriptor exists (the Put RPC, then the descriptor on the conduit), so
whatever opening or binding does happens before its answer. Hence: opening never changes a file (no O_TRUNC, no
O_CREAT unless --create); --truncate waits for the broker's yes; and a path this command created (a unix:
socket file, a --create'd file) is removed again when the broker refused — but only while it is still the
very file this command created, so a path that existed before, or was replaced meanwhile, is never touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from fdbroker.cli.exitcodes import (
    ALREADY_EXISTS,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OTHER,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    CliError,
)

if TYPE_CHECKING:
    import socket


def note(message: str) -> None:
    """Tell the caller on stderr what a put left behind, or could not clean up."""
    print(f"fdbroker put: note: {message}", file=sys.stderr)


class Created:
    """A directory entry this command created (a unix socket file, or a file made by ``--create``).

    It is identified by device and inode and reached through a descriptor of the directory it was created in, so
    a parent directory renamed or swapped for a symlink meanwhile cannot point the clean-up anywhere else.
    """

    def __init__(self, dir_fd: int, name: str, ident: tuple[int, int], path: str, *, file: bool) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.ident = ident
        self.path = path
        self.file = file

    def remove(self) -> None:
        """Unlink it if it is still ours: the same inode and, for a file, still empty (data someone wrote into it
        meanwhile is not ours to drop). Never raises; what it leaves is said on stderr."""
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as err:
            note(f"left {self.path} in place: cannot check it ({err.strerror})")
            return
        if (st.st_dev, st.st_ino) != self.ident or (self.file and st.st_size):
            what = "empty file" if self.file else "socket file"
            note(f"left {self.path} in place: it is no longer the {what} this command created")
            return
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as err:
            note(f"could not remove {self.path}, which this command created: {err.strerror}")

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _parent_dir(path: str) -> tuple[int, str]:
    """An ``O_PATH`` descriptor of ``path``'s directory and the last component (the caller closes the fd)."""
    import errno

    head, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise OSError(errno.EINVAL, "not a file name", path)
    return os.open(head or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), name


def _bind_unix(path: str, backlog: int) -> tuple[socket.socket, Created | None]:
    """A listening Unix socket at ``path`` (``@NAME``: abstract) and, if its socket file could be told apart
    from anything else, the record of that file. ``bind`` never replaces an existing path (``EADDRINUSE``)."""
    import socket
    import stat

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if path.startswith("@"):
        try:
            sock.bind("\0" + path[1:])
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock, None
    created: Created | None = None
    try:
        dir_fd, name = _parent_dir(path)
    except BaseException:
        sock.close()
        raise
    try:
        sock.bind(path)
        # Ours only if the name seen through the directory descriptor and through the path is one socket inode:
        # otherwise something moved between bind and now, and we shall never remove anything.
        try:
            here = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            there = os.lstat(path)
        except OSError:
            pass
        else:
            ident = (here.st_dev, here.st_ino)
            if stat.S_ISSOCK(here.st_mode) and ident == (there.st_dev, there.st_ino):
                created = Created(dir_fd, name, ident, path, file=False)
        sock.listen(backlog)
    except BaseException:
        if created is not None:
            created.remove()
        os.close(dir_fd)
        sock.close()
        raise
    if created is None:
        os.close(dir_fd)
    return sock, created


def open_listen(addr: str, backlog: int) -> tuple[socket.socket, Created | None]:
    """Bind (and listen on) ``addr``: the socket, and the socket file it created (``unix:PATH`` only)."""
    import socket

    if addr.startswith("unix:"):
        path = addr[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise CliError(
                f"invalid address {addr!r}: expected unix:PATH or unix:@ABSTRACT", INVALID_ARGUMENT
            )
        return _bind_unix(path, backlog)
    scheme, sep, rest = addr.partition("://")
    if not sep or scheme not in ("tcp", "udp"):
        raise CliError(
            f"invalid address {addr!r}: expected tcp://HOST:PORT, udp://HOST:PORT or unix:PATH",
            INVALID_ARGUMENT,
        )
    host, colon, port_s = rest.rpartition(":")
    if not colon or not port_s.isdigit() or int(port_s) > 65535:
        raise CliError(
            f"invalid address {addr!r}: expected a port number after the last ':'", INVALID_ARGUMENT
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    stype = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(host or None, int(port_s), type=stype, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise CliError(f"cannot resolve {host!r} in {addr!r}: {err.strerror}", INVALID_ARGUMENT) from None
    family, _, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, stype, proto)
    try:
        if stype == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        if stype == socket.SOCK_STREAM:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, None


# What each --mode opens. None of them truncates or creates: that is --truncate (after the broker said yes) and
# --create.
FILE_MODES = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY,
    "a": os.O_WRONLY | os.O_APPEND,
    "rw": os.O_RDWR,
}


def open_file(path: str, mode: str, *, create: bool) -> tuple[int, Created | None]:
    """Open ``path`` for ``mode``; with ``create``, make it (empty, 0666 minus the umask) if it is missing.

    O_NOCTTY: opening a terminal must not make it ours. O_NOFOLLOW for the writable modes: a symlink planted at
    PATH would aim the writes (and --truncate) of whoever gets the descriptor at any file the caller may write,
    root's included; reading through one changes nothing. O_CREAT always with O_EXCL, which never follows a
    symlink either, so a created file is known to be ours. O_CLOEXEC: no child of ours inherits it.
    """
    import errno

    flags = FILE_MODES[mode] | os.O_CLOEXEC | os.O_NOCTTY
    if mode != "r":
        flags |= os.O_NOFOLLOW
    if not create:
        return os.open(path, flags), None
    dir_fd, name = _parent_dir(path)
    try:
        for _ in range(3):  # missing, then created by someone else before us: open theirs
            try:
                return os.open(name, flags, dir_fd=dir_fd), None
            except FileNotFoundError:
                pass
            try:
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
            except FileExistsError:
                continue
            st = os.fstat(fd)
            created = Created(dir_fd, name, (st.st_dev, st.st_ino), path, file=True)
            dir_fd = -1  # created owns it now
            return fd, created
        raise FileExistsError(
            errno.EEXIST, "it exists but cannot be opened (a dangling symbolic link?)", path
        )
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def os_error(err: OSError, what: str) -> CliError:
    """A failure opening or binding a source, with the exit code a broker error of that kind has."""
    import errno

    exit_code = {
        errno.EACCES: PERMISSION_DENIED,
        errno.EPERM: PERMISSION_DENIED,
        errno.EADDRINUSE: ALREADY_EXISTS,
        errno.EEXIST: ALREADY_EXISTS,
        errno.ENOENT: NOT_FOUND,
        errno.EADDRNOTAVAIL: INVALID_ARGUMENT,
        errno.EBADF: INVALID_ARGUMENT,
        errno.EINVAL: INVALID_ARGUMENT,
        errno.EISDIR: INVALID_ARGUMENT,
        errno.ELOOP: INVALID_ARGUMENT,
        errno.EMFILE: RESOURCE_EXHAUSTED,
        errno.ENFILE: RESOURCE_EXHAUSTED,
    }.get(err.errno or 0, OTHER)
    return CliError(f"{what}: {err.strerror or err}", exit_code)


class Source:
    """What ``put`` deposits: the descriptor opened or bound here, the object that closes it, and the path it
    created (if any). The broker stores its own duplicate, so ours is closed in every case."""

    def __init__(self, fd: int, what: str, closer: Any, created: Created | None, *, truncate: bool) -> None:
        self.fd = fd
        self.what = what
        self._closer = closer
        self.created = created
        self.truncate = truncate

    def undo(self) -> None:
        """Remove what opening created (nothing was deposited)."""
        if self.created is not None:
            self.created.remove()

    def refused(self, err: BaseException, name: str) -> None:
        """The put failed with ``err``: remove what opening created if the broker certainly stored nothing;
        if the outcome is unknown (no answer, a broken conduit, Ctrl-C), leave it and say so."""
        if self.created is None:
            return
        if _certainly_refused(err):
            self.undo()
        else:
            note(
                f"left {self.created.path} in place: whether the broker stored {name!r} is unknown "
                f"(see `fdbroker stat {name}`; remove it yourself if the entry is not there)"
            )

    def accepted(self, name: str) -> None:
        """The broker holds the entry: truncate now if asked (never before), then close our copy."""
        try:
            if self.truncate:
                os.ftruncate(self.fd, 0)
        except OSError as err:
            raise os_error(
                err, f"{name!r} was stored, but truncating {self.what} failed (it is unchanged)"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            if isinstance(closer, int):
                os.close(closer)
            else:
                closer.close()
        if self.created is not None:
            self.created.close()


def _certainly_refused(err: BaseException) -> bool:
    """Whether a failed put certainly stored nothing: the broker answered no (to the Put RPC, or in its
    Deposited result, after which it closed its copy) or was never reached. A deadline, a broken conduit, an
    internal error or an interrupt leave it open whether the entry exists."""
    from fdbroker.errors import BrokerError, Code

    return isinstance(err, BrokerError) and err.code in (
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
        Code.PERMISSION_DENIED,
        Code.UNAUTHENTICATED,
        Code.RESOURCE_EXHAUSTED,
        Code.OUT_OF_RANGE,
        Code.UNAVAILABLE,
    )


def open_source(args: argparse.Namespace) -> Source:
    """Open, bind or check the one source of a put; everything here must leave the system as it was except for
    what :meth:`Source.refused` can undo."""
    import stat

    try:
        if args.listen is not None:
            what = args.listen
            sock, created = open_listen(args.listen, args.backlog)
            return Source(sock.fileno(), what, sock, created, truncate=False)
        if args.file is not None:
            what = args.file
            fd, created = open_file(args.file, args.mode, create=args.create)
            src = Source(fd, what, fd, created, truncate=args.truncate)
            if args.truncate and not stat.S_ISREG(os.fstat(fd).st_mode):
                src.undo()
                src.close()
                raise CliError(f"--truncate needs a regular file; {args.file} is not one", INVALID_ARGUMENT)
            return src
        what = f"descriptor {args.fd}"
        os.fstat(args.fd)
        return Source(args.fd, what, None, None, truncate=False)
    except OSError as err:
        import errno

        if err.errno == errno.ELOOP and args.file is not None and os.path.islink(args.file):
            raise CliError(
                f"cannot open {args.file}: it is a symbolic link, and --mode {args.mode} does not follow one "
                f"(it could point at any file); name the file itself, e.g. $(realpath {args.file})",
                INVALID_ARGUMENT,
            ) from None
        if err.errno == errno.ENOENT and args.file is not None and not args.create:
            hint = " (--create creates it)" if os.path.isdir(os.path.dirname(args.file) or ".") else ""
            raise CliError(f"cannot open {args.file}: no such file{hint}", NOT_FOUND) from None
        raise os_error(err, f"cannot open {what}") from None
