"""``fdbroker``: the command line. One verb = one client call; ``fdbroker VERB --help`` is its manual page.

Cold start matters (``fdbroker ls`` in a shell loop, ``fdbroker exec`` in front of every server start), so this
module imports only ``argparse``, ``os`` and ``sys`` at the top; each verb imports what it needs (the client and
gRPC, the server, activation) inside its function. The ``serve`` options are declared by
:func:`fdbroker.server.add_arguments`, loaded only when the verb is ``serve``.

Exit codes come from :func:`fdbroker.errors.exit_code_for` (the one place for them) and are listed in
docs/cli.md; ``get``/``exec``/``take``/``lease`` pass their command's status through.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket

    from fdbroker.client import Client, Entry, Event
    from fdbroker.client.quick import QuickClient

PROG = "fdbroker"
DEFAULT_TIMEOUT = 10.0

# Exit codes that are not broker errors (the broker's own are errors.EXIT_CODES; both tables are in docs/cli.md).
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126
EXIT_COMMAND_NOT_FOUND = 127


class CliError(Exception):
    """A failure found by the CLI itself (bad address, cannot bind, …) with the exit code to leave with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- values --------------------------------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``500ms``, ``10s``, ``5m``, ``1h``, ``2d``, ``1m30s`` or plain seconds (``2.5``) → seconds."""
    s = text.strip().lower()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0 or value != value:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be >= 0")
        return value
    total = 0.0
    i = 0
    if not s:
        raise argparse.ArgumentTypeError("empty duration")
    while i < len(s):
        j = i
        while j < len(s) and (s[j].isdigit() or s[j] == "."):
            j += 1
        k = j
        while k < len(s) and s[k].isalpha():
            k += 1
        num, unit = s[i:j], s[j:k]
        if not num or unit not in _UNITS:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: use e.g. 500ms, 10s, 5m, 1h, 2d or plain seconds"
            )
        try:
            total += float(num) * _UNITS[unit]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r}") from None
        i = k
    return total


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: expected KEY=VALUE")
    return key, value


def human_duration(seconds: float) -> str:
    """``3s``, ``5m``, ``2h``, ``4d`` (truncated to the largest unit)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def entry_detail(e: Entry) -> str:
    """The DETAIL column: addresses for sockets, path and access for files, else the broker's summary."""
    if e.local_address or e.peer_address:
        return f"{e.local_address} -> {e.peer_address}" if e.peer_address else e.local_address
    if e.path:
        mode = e.access_mode + ("+append" if "O_APPEND" in e.flags else "")
        return f"{e.path} ({mode})" if mode else e.path
    return e.summary


def lease_cell(e: Entry) -> str:
    lease = e.lease
    if not lease.mode:
        return "-"
    if lease.mode == "exclusive" and lease.holders:
        cell = f"exclusive epoch {lease.epoch} pid {lease.holders[0][1]}"
    else:
        cell = f"{lease.mode} x{len(lease.holders)} epoch {lease.epoch}"
    return cell + (f" +{lease.waiters} waiting" if lease.waiters else "")


def format_table(entries: Sequence[Entry], now: float) -> str:
    rows = [("NAME", "KIND", "DETAIL", "OWNER", "AGE", "EXPIRES", "LEASE")]
    for e in entries:
        rows.append(
            (
                e.name,
                e.kind,
                entry_detail(e) or "-",
                f"{_user(e.owner_uid)}/{e.owner_pid}",
                human_duration(now - e.create_time),
                human_duration(e.expire_time - now) if e.expire_time is not None else "-",
                lease_cell(e),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows
    )


def format_stat(e: Entry, now: float) -> str:
    lines = [
        ("name", e.name),
        ("kind", e.kind),
        ("summary", e.summary),
    ]
    if e.family:
        lines.append(("family", e.family))
    if e.local_address:
        lines.append(("local", e.local_address))
    if e.peer_address:
        lines.append(("peer", e.peer_address))
    if e.path:
        lines.append(("path", e.path))
    if e.access_mode:
        lines.append(("access", e.access_mode))
    if e.flags:
        lines.append(("flags", " ".join(e.flags)))
    lines += [
        ("owner", f"{_user(e.owner_uid)} (uid {e.owner_uid}, gid {e.owner_gid}, pid {e.owner_pid})"),
        ("labels", ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())) or "-"),
        ("age", human_duration(now - e.create_time)),
        ("revision", f"{e.revision} (created at {e.create_revision})"),
        ("expires", f"in {human_duration(e.expire_time - now)}" if e.expire_time is not None else "never"),
        ("ephemeral", "yes" if e.ephemeral else "no"),
        ("lease", lease_cell(e)),
    ]
    return "\n".join(f"{k + ':':<10} {v}" for k, v in lines)


def format_event(ev: Event) -> str:
    parts = [str(ev.revision), ev.type, ev.name]
    if ev.type == "put":
        parts += [ev.entry.kind, entry_detail(ev.entry) or "-"]
    if ev.type.startswith("lease"):
        parts.append(f"epoch={ev.epoch}")
    if ev.reason:
        parts.append(f"reason={ev.reason}")
    return " ".join(parts)


# -- helpers -------------------------------------------------------------------------------------------------


def _run_dir(args: argparse.Namespace) -> str:
    """The run directory for this invocation; refuses early (before importing gRPC) when it is absent."""
    from fdbroker.rundir import resolve_run_dir

    run_dir = resolve_run_dir(args.run_dir)
    if not os.path.isdir(run_dir):
        from fdbroker.errors import Unavailable

        raise Unavailable(
            f"no broker at {run_dir} (the directory does not exist); start one with "
            f"`fdbroker serve --run-dir {run_dir}` or point --run-dir / FDBROKER_RUN_DIR at a running one"
        )
    return str(run_dir)


def _client(args: argparse.Namespace) -> Client:
    """The client for this invocation."""
    run_dir = _run_dir(args)
    from fdbroker.client import Client

    return Client(run_dir, timeout=args.timeout)


def _quick(args: argparse.Namespace) -> QuickClient:
    """For read-only verbs: queries on the conduit, so the command starts without loading gRPC."""
    run_dir = _run_dir(args)
    from fdbroker.client.quick import QuickClient

    return QuickClient(run_dir, timeout=args.timeout)


def _need_cmd(args: argparse.Namespace, cmd: list[str], why: str) -> None:
    if not cmd:
        raise CliError(f"missing command: {why}", EXIT_USAGE)


def _exit_status(rc: int) -> int:
    """A child's status as our exit status: its code, or 128+N when signal N killed it."""
    return rc if rc >= 0 else 128 - rc


def _exec(fds: list[int], names: list[str], cmd: list[str]) -> int:
    from fdbroker import activation

    try:
        activation.exec_with_fds(fds, names, cmd)
    except FileNotFoundError:
        raise CliError(f"{cmd[0]}: command not found", EXIT_COMMAND_NOT_FOUND) from None
    except PermissionError:
        raise CliError(f"{cmd[0]}: not executable", EXIT_NOT_EXECUTABLE) from None
    except OSError as err:
        raise CliError(f"cannot run {cmd[0]}: {err.strerror}", EXIT_NOT_EXECUTABLE) from None


def _check_command(cmd: list[str]) -> None:
    """Find CMD before the broker is asked for anything: a typo must not cost a taken entry, a lease grant or
    a deposit (126/127 as if it had run). CMD is looked up again when it runs."""
    from fdbroker.activation import resolve_command

    try:
        resolve_command(cmd[0])
    except FileNotFoundError:
        raise CliError(f"{cmd[0]}: command not found", EXIT_COMMAND_NOT_FOUND) from None
    except PermissionError:
        raise CliError(f"{cmd[0]}: not executable", EXIT_NOT_EXECUTABLE) from None


def _fetch_and_exec(args: argparse.Namespace, cmd: list[str], fetch: Callable[[Client], list[int]]) -> int:
    """Fetch descriptors with ``fetch`` and exec ``cmd`` on them (socket activation)."""
    from fdbroker import activation

    _check_command(cmd)

    # Keep 3..3+n-1 away from gRPC's own descriptors: exec_with_fds overwrites those numbers while gRPC's
    # threads may still be running.
    placeholders = activation.reserve_slots(len(args.names))
    try:
        with _client(args) as client:
            fds = fetch(client)
        return _exec(fds, list(args.names), cmd)
    finally:
        for fd in placeholders:
            try:
                os.close(fd)
            except OSError:
                pass


def _describe_fd(name: str, fd: int) -> str:
    from fdbroker.fdinfo import describe

    return f"{name}: {describe(fd).summary}"


def _foreground() -> bool:
    """Whether this process group owns the terminal (then a Ctrl-C reached our child directly)."""
    for f in (sys.stdin, sys.stderr):
        try:
            if f is not None and f.isatty():
                return os.tcgetpgrp(f.fileno()) == os.getpgrp()
        except (OSError, ValueError):
            continue
    return False


def run_child(argv: list[str], *, pass_fds: Sequence[int] = (), env: dict[str, str] | None = None) -> int:
    """Run ``argv`` as a child, forwarding SIGTERM, SIGHUP and SIGINT to it; return its status (128+N if signal
    N killed it). A SIGINT is not forwarded when we own the terminal: the terminal sent it to the child too."""
    import signal
    import subprocess

    proc: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        if sig == signal.SIGINT and _foreground():
            return
        if proc is None:
            pending.append(sig)
            return
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, forward) for s in sigs}
    try:
        try:
            proc = subprocess.Popen(argv, pass_fds=tuple(pass_fds), env=env)
        except FileNotFoundError:
            raise CliError(f"{argv[0]}: command not found", EXIT_COMMAND_NOT_FOUND) from None
        except PermissionError:
            raise CliError(f"{argv[0]}: not executable", EXIT_NOT_EXECUTABLE) from None
        for sig in pending:
            proc.send_signal(sig)
        return _exit_status(proc.wait())
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- verbs ---------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, cmd: list[str]) -> int:
    from fdbroker.broker import server
    from fdbroker.rundir import resolve_run_dir

    return server.run(server.options_from_args(args, resolve_run_dir(args.run_dir)), args.log_level)


# -- put: open or bind here, undo it if the broker says no -----------------------------------------------------
#
# The broker decides a put only once the descriptor exists (the Put RPC, then the descriptor on the conduit), so
# whatever opening or binding does happens before its answer. Hence: opening never changes a file (no O_TRUNC, no
# O_CREAT unless --create); --truncate waits for the broker's yes; and a path this command created (a unix:
# socket file, a --create'd file) is removed again when the broker refused — but only while it is still the
# very file this command created, so a path that existed before, or was replaced meanwhile, is never touched.


def _warn(message: str) -> None:
    print(f"{PROG} put: note: {message}", file=sys.stderr)


class _Created:
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
            _warn(f"left {self.path} in place: cannot check it ({err.strerror})")
            return
        if (st.st_dev, st.st_ino) != self.ident or (self.file and st.st_size):
            what = "empty file" if self.file else "socket file"
            _warn(f"left {self.path} in place: it is no longer the {what} this command created")
            return
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as err:
            _warn(f"could not remove {self.path}, which this command created: {err.strerror}")

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


def _bind_unix(path: str, backlog: int) -> tuple[socket.socket, _Created | None]:
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
    created: _Created | None = None
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
                created = _Created(dir_fd, name, ident, path, file=False)
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


def _open_listen(addr: str, backlog: int) -> tuple[socket.socket, _Created | None]:
    """Bind (and listen on) ``addr``: the socket, and the socket file it created (``unix:PATH`` only)."""
    import socket

    if addr.startswith("unix:"):
        path = addr[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise CliError(f"invalid address {addr!r}: expected unix:PATH or unix:@ABSTRACT", 3)
        return _bind_unix(path, backlog)
    scheme, sep, rest = addr.partition("://")
    if not sep or scheme not in ("tcp", "udp"):
        raise CliError(f"invalid address {addr!r}: expected tcp://HOST:PORT, udp://HOST:PORT or unix:PATH", 3)
    host, colon, port_s = rest.rpartition(":")
    if not colon or not port_s.isdigit() or int(port_s) > 65535:
        raise CliError(f"invalid address {addr!r}: expected a port number after the last ':'", 3)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    stype = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(host or None, int(port_s), type=stype, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise CliError(f"cannot resolve {host!r} in {addr!r}: {err.strerror}", 3) from None
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
_FILE_MODES = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY,
    "a": os.O_WRONLY | os.O_APPEND,
    "rw": os.O_RDWR,
}


def _open_file(path: str, mode: str, *, create: bool) -> tuple[int, _Created | None]:
    """Open ``path`` for ``mode``; with ``create``, make it (empty, 0666 minus the umask) if it is missing.

    O_NOCTTY: opening a terminal must not make it ours. O_NOFOLLOW for the writable modes: a symlink planted at
    PATH would aim the writes (and --truncate) of whoever gets the descriptor at any file the caller may write,
    root's included; reading through one changes nothing. O_CREAT always with O_EXCL, which never follows a
    symlink either, so a created file is known to be ours. O_CLOEXEC: no child of ours inherits it.
    """
    import errno

    flags = _FILE_MODES[mode] | os.O_CLOEXEC | os.O_NOCTTY
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
            created = _Created(dir_fd, name, (st.st_dev, st.st_ino), path, file=True)
            dir_fd = -1  # created owns it now
            return fd, created
        raise FileExistsError(
            errno.EEXIST, "it exists but cannot be opened (a dangling symbolic link?)", path
        )
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)


def _os_error(err: OSError, what: str) -> CliError:
    import errno

    code = {
        errno.EACCES: 7,
        errno.EPERM: 7,
        errno.EADDRINUSE: 5,
        errno.EEXIST: 5,
        errno.ENOENT: 4,
        errno.EADDRNOTAVAIL: 3,
        errno.EBADF: 3,
        errno.EINVAL: 3,
        errno.EISDIR: 3,
        errno.ELOOP: 3,
        errno.EMFILE: 8,
        errno.ENFILE: 8,
    }.get(err.errno or 0, 13)
    return CliError(f"{what}: {err.strerror or err}", code)


class _Source:
    """What ``put`` deposits: the descriptor opened or bound here, the object that closes it, and the path it
    created (if any). The broker stores its own duplicate, so ours is closed in every case."""

    def __init__(self, fd: int, what: str, closer: Any, created: _Created | None, *, truncate: bool) -> None:
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
            _warn(
                f"left {self.created.path} in place: whether the broker stored {name!r} is unknown "
                f"(see `{PROG} stat {name}`; remove it yourself if the entry is not there)"
            )

    def accepted(self, name: str) -> None:
        """The broker holds the entry: truncate now if asked (never before), then close our copy."""
        try:
            if self.truncate:
                os.ftruncate(self.fd, 0)
        except OSError as err:
            raise _os_error(
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


def _open_source(args: argparse.Namespace) -> _Source:
    """Open, bind or check the one source of a put; everything here must leave the system as it was except for
    what :meth:`_Source.refused` can undo."""
    import stat

    try:
        if args.listen is not None:
            what = args.listen
            sock, created = _open_listen(args.listen, args.backlog)
            return _Source(sock.fileno(), what, sock, created, truncate=False)
        if args.file is not None:
            what = args.file
            fd, created = _open_file(args.file, args.mode, create=args.create)
            src = _Source(fd, what, fd, created, truncate=args.truncate)
            if args.truncate and not stat.S_ISREG(os.fstat(fd).st_mode):
                src.undo()
                src.close()
                raise CliError(f"--truncate needs a regular file; {args.file} is not one", 3)
            return src
        what = f"descriptor {args.fd}"
        os.fstat(args.fd)
        return _Source(args.fd, what, None, None, truncate=False)
    except OSError as err:
        import errno

        if err.errno == errno.ELOOP and args.file is not None and os.path.islink(args.file):
            raise CliError(
                f"cannot open {args.file}: it is a symbolic link, and --mode {args.mode} does not follow one "
                f"(it could point at any file); name the file itself, e.g. $(realpath {args.file})",
                3,
            ) from None
        if err.errno == errno.ENOENT and args.file is not None and not args.create:
            hint = " (--create creates it)" if os.path.isdir(os.path.dirname(args.file) or ".") else ""
            raise CliError(f"cannot open {args.file}: no such file{hint}", 4) from None
        raise _os_error(err, f"cannot open {what}") from None


def _check_put_args(args: argparse.Namespace, cmd: list[str]) -> None:
    if args.ephemeral:
        _need_cmd(
            args,
            cmd,
            "an --ephemeral entry lives only while its depositor runs, so give the command to "
            "keep it alive for: fdbroker put NAME ... --ephemeral -- CMD",
        )
    elif cmd:
        raise CliError("a command after -- is only accepted with --ephemeral", EXIT_USAGE)
    if (args.create or args.truncate) and args.file is None:
        raise CliError("--create and --truncate go with --file only", EXIT_USAGE)
    if args.truncate and args.mode == "r":
        raise CliError("--truncate needs a writable --mode (w, a or rw)", EXIT_USAGE)
    if cmd:
        _check_command(cmd)


def cmd_put(args: argparse.Namespace, cmd: list[str]) -> int:
    _check_put_args(args, cmd)
    labels = dict(args.label or [])
    src = _open_source(args)
    try:
        try:
            client = _client(args)
        except BaseException as err:
            src.refused(err, args.name)
            raise
        with client:
            try:
                entry = client.put(
                    args.name,
                    src.fd,
                    labels=labels,
                    ttl=args.ttl,
                    ephemeral=args.ephemeral,
                    replace=args.replace,
                    if_revision=args.if_revision,
                )
            except BaseException as err:
                src.refused(err, args.name)
                raise
            # The broker holds its own duplicate now; ours goes before CMD runs (CMD does not inherit it).
            src.accepted(entry.name)
            print(f"{entry.name}: {entry.summary} (revision {entry.revision})", flush=True)
            if cmd:
                return run_child(cmd)
            return 0
    finally:
        src.close()


def cmd_get(args: argparse.Namespace, cmd: list[str]) -> int:
    if not cmd:
        with _client(args) as client, client.get_fd(args.name) as owned:
            print(_describe_fd(args.name, owned.fileno()))
        return 0
    args.names = [args.name]
    return _fetch_and_exec(args, cmd, lambda c: [c.get_fd(args.name).detach()])


def cmd_exec(args: argparse.Namespace, cmd: list[str]) -> int:
    _need_cmd(args, cmd, "fdbroker exec NAME... -- CMD [ARGS]")

    def fetch(c: Client) -> list[int]:
        return [o.detach() for o in c.get_many(list(args.names), raw=True)]

    return _fetch_and_exec(args, cmd, fetch)


def cmd_take(args: argparse.Namespace, cmd: list[str]) -> int:
    if not cmd:
        with _client(args) as client, client.take(args.name, if_revision=args.if_revision, raw=True) as owned:
            print(_describe_fd(args.name, owned.fileno()) + " (taken, closed)")
        return 0
    args.names = [args.name]
    return _fetch_and_exec(
        args, cmd, lambda c: [c.take(args.name, if_revision=args.if_revision, raw=True).detach()]
    )


def cmd_rm(args: argparse.Namespace, cmd: list[str]) -> int:
    with _client(args) as client:
        client.delete(args.name, if_revision=args.if_revision)
    return 0


def _print_json(obj: object) -> None:
    import json

    print(json.dumps(obj, indent=2, sort_keys=False))


def cmd_stat(args: argparse.Namespace, cmd: list[str]) -> int:
    import time

    with _quick(args) as client:
        entry = client.stat(args.name)
    if args.json:
        _print_json(entry.to_json())
    else:
        print(format_stat(entry, time.time()))
    return 0


def cmd_ls(args: argparse.Namespace, cmd: list[str]) -> int:
    import time

    with _quick(args) as client:
        entries = client.list(args.prefix, selector=args.selector)
    if args.json:
        _print_json([e.to_json() for e in entries])
    elif entries:
        print(format_table(entries, time.time()))
    return 0


def cmd_status(args: argparse.Namespace, cmd: list[str]) -> int:
    import time

    with _quick(args) as client:
        info = client.info()
        run_dir = str(client.paths.run_dir)
    if args.json:
        import dataclasses

        data = dataclasses.asdict(info)
        data["run_dir"] = run_dir
        data["serving"] = True
        _print_json(data)
        return 0
    caller = info.caller
    rows = [
        (
            "broker",
            f"serving, pid {info.broker_pid}, version {info.version}, up "
            f"{human_duration(time.time() - info.start_time)}",
        ),
        ("run dir", run_dir),
        ("revision", str(info.revision)),
        ("entries", f"{info.entries} of {info.max_entries} (at most {info.max_entries_per_uid} per uid)"),
        ("sessions", f"{info.sessions} (at most {info.max_sessions_per_uid} per uid)"),
        (
            "tokens",
            f"{info.pending_tokens} pending (at most {info.max_pending_tokens_per_uid} per uid), "
            f"valid {info.token_ttl:g}s",
        ),
        ("watch", f"history from revision {info.oldest_watch_revision}"),
        (
            "caller",
            f"pid {caller[0]} uid {caller[1]} gid {caller[2]}" if caller else "anonymous (no session)",
        ),
    ]
    print("\n".join(f"{k + ':':<10} {v}" for k, v in rows))
    return 0


def cmd_lease(args: argparse.Namespace, cmd: list[str]) -> int:
    _need_cmd(args, cmd, "fdbroker lease NAME --ttl D -- CMD [ARGS]")
    _check_command(cmd)
    with (
        _client(args) as client,
        client.lease(args.name, args.ttl, shared=args.shared, wait=args.wait) as held,
    ):
        fd = held.fd.fileno()
        env = dict(os.environ)
        env["FDBROKER_LEASE_EPOCH"] = str(held.epoch)
        env["FDBROKER_LEASE_ID"] = held.lease_id
        env["FDBROKER_LEASE_NAME"] = args.name
        # CMD runs as our child (we keep the session, hence the lease); a fresh single-threaded helper process
        # arranges fd 3 and sets LISTEN_PID to its own pid, which CMD keeps across its exec.
        trampoline = [sys.executable, "-m", "fdbroker.activation", "--fd", str(fd), "--name", args.name, "--"]
        rc = run_child(trampoline + cmd, pass_fds=[fd], env=env)
        if held.lost.is_set():
            print(
                f"{PROG} lease: warning: the lease on {args.name!r} was lost while the command ran "
                f"(expired or revoked); epoch {held.epoch} is stale",
                file=sys.stderr,
            )
        return rc


def cmd_watch(args: argparse.Namespace, cmd: list[str]) -> int:
    import signal

    def stop(_sig: int, _frame: object) -> None:
        # Once is enough: a second signal (`timeout` signals the child and then its group) must not
        # interrupt the clean-up.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        with _client(args) as client, client.watch(args.prefix, start_revision=args.start_revision) as events:
            if args.json:
                import json

                for ev in events:
                    print(json.dumps(ev.to_json()), flush=True)
            else:
                for ev in events:
                    print(format_event(ev), flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


# -- the parser ------------------------------------------------------------------------------------------------

_COMMON_EXIT = """\
exit codes:
  0   success
  2   usage error
  3   invalid argument (bad name, label, selector, address)
  4   not found
  5   already exists
  6   failed precondition (revision mismatch, entry leased by another session)
  7   permission denied / unauthenticated
  8   resource exhausted (quota, broker full)
  9   deadline exceeded
  10  broker not running or unreachable
  11  out of range
  12  aborted or cancelled (retry)
  13  any other error
  14  refused the broker: another uid serves or controls the run directory
      (nothing was sent; trust that uid with FDBROKER_TRUST_UID if it is yours)"""

_CMD_EXIT = """
  126 CMD is not executable; 127 CMD not found
  otherwise CMD's own exit status (128+N if signal N killed it)"""

_ENV = """
environment:
  FDBROKER_RUN_DIR    run directory (overridden by --run-dir)
  FDBROKER_TRUST_UID  uids or user names (comma-separated) that may serve the run directory
                      besides root and yourself, e.g. the broker's own system user"""


def _page(desc: str, notes: str = "", example: str = "", exits: str = _COMMON_EXIT) -> dict[str, Any]:
    epilog = exits
    if notes:
        epilog += "\n\nnotes:\n" + notes
    if example:
        epilog += "\n\nexample:\n" + example
    return {
        "description": desc,
        "epilog": epilog + "\n" + _ENV,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


VERBS: dict[str, tuple[str, Callable[[argparse.Namespace, list[str]], int]]] = {
    "serve": ("run the broker in the foreground", cmd_serve),
    "put": ("deposit a descriptor under a name", cmd_put),
    "get": ("run CMD with a copy of one entry's descriptor as fd 3", cmd_get),
    "exec": ("run CMD with copies of several entries' descriptors as fd 3, 4, ...", cmd_exec),
    "take": ("move an entry's descriptor out of the broker (to CMD)", cmd_take),
    "rm": ("delete an entry", cmd_rm),
    "stat": ("describe an entry", cmd_stat),
    "ls": ("list entries", cmd_ls),
    "status": ("broker health, version, counts and limits", cmd_status),
    "lease": ("hold a lease on an entry while CMD runs (like flock(1))", cmd_lease),
    "watch": ("print registry events as they happen", cmd_watch),
}


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On the verb parsers the defaults are suppressed, so `fdbroker --run-dir X ls` and `fdbroker ls --run-dir X`
    # both work and the verb's absent option does not reset the top-level one.
    d: Any = argparse.SUPPRESS
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        default=None if top else d,
        help="the broker's run directory, holding control.sock and conduit.sock (env FDBROKER_RUN_DIR; "
        "default /run/fdbroker for root, else $XDG_RUNTIME_DIR/fdbroker, else a per-user temp dir)",
    )
    p.add_argument(
        "--timeout",
        metavar="DURATION",
        type=parse_duration,
        default=DEFAULT_TIMEOUT if top else d,
        help=f"limit for each call to the broker (default {DEFAULT_TIMEOUT:g}s)",
    )


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. Only ``verb``'s own parser gets its options (all of them when None, except the
    ``serve`` options, which need the server module): building the rest would cost every start."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fdbroker holds open file descriptors under names and hands them to allowed processes.\n"
        "Each verb is one call to the broker; `fdbroker VERB --help` is its manual page.",
        epilog=_COMMON_EXIT + "\n" + _ENV + "\n\nsee docs/cli.md for every verb",
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (helptext, _) in VERBS.items():
        if verb is not None and name != verb:
            sub.add_parser(name, help=helptext)
            continue
        p = sub.add_parser(name, help=helptext, usage=_USAGES.get(name), **_PAGES[name]())
        _common(p, top=False)
        _ARGS[name](p, verb == name)
    return parser


def _args_serve(p: argparse.ArgumentParser, selected: bool) -> None:
    if selected:
        from fdbroker.broker import server

        server.add_arguments(p)


def _args_put(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("name", metavar="NAME", help="entry name: [A-Za-z0-9._/-], '/'-separated, 1-255 bytes")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--listen",
        metavar="ADDR",
        help="bind and deposit a listener: tcp://HOST:PORT, tcp://[::]:PORT, udp://HOST:PORT, "
        "unix:PATH, unix:@ABSTRACT",
    )
    src.add_argument("--file", metavar="PATH", help="open PATH (see --mode) and deposit it")
    src.add_argument("--fd", metavar="N", type=int, help="deposit this process's inherited descriptor N")
    p.add_argument(
        "--mode",
        choices=sorted(_FILE_MODES),
        default="r",
        help="with --file: r read (default), w write, a append, rw read-write; none of them creates or "
        "truncates PATH (see --create, --truncate), and w, a, rw do not follow a symlink at PATH",
    )
    p.add_argument(
        "--create",
        action="store_true",
        help="with --file: create PATH (empty) if it is missing; removed again if the broker refuses the put",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="with --file and --mode w, a or rw: empty PATH once the broker has stored the entry (never before)",
    )
    p.add_argument(
        "--label", metavar="KEY=VALUE", type=parse_label, action="append", help="attach a label (repeatable)"
    )
    p.add_argument("--ttl", metavar="DURATION", type=parse_duration, help="remove the entry after DURATION")
    p.add_argument(
        "--ephemeral",
        action="store_true",
        help="remove the entry when this command ends; needs -- CMD (kept while CMD runs)",
    )
    p.add_argument("--replace", action="store_true", help="replace an existing entry of that name")
    p.add_argument(
        "--if-revision",
        metavar="N",
        type=int,
        default=0,
        help="with --replace: only if the existing entry is at revision N",
    )
    p.add_argument("--backlog", metavar="N", type=int, default=128, help="listen backlog (default 128)")


def _args_get(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to fetch")


def _args_exec(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("names", metavar="NAME", nargs="+", help="entries to fetch, in fd order (3, 4, ...)")


def _args_take(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to take")
    p.add_argument(
        "--if-revision", metavar="N", type=int, default=0, help="only if the entry is at revision N"
    )


def _args_rm(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to delete")
    p.add_argument(
        "--if-revision", metavar="N", type=int, default=0, help="only if the entry is at revision N"
    )


def _args_stat(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to describe")
    p.add_argument("--json", action="store_true", help="print the entry as a JSON object")


def _args_ls(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only names starting with PREFIX")
    p.add_argument(
        "--selector",
        metavar="SEL",
        default="",
        help="label selector, e.g. 'tier=web,env!=dev', 'team', '!old', 'env in (a,b)'",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array of entries")


def _args_status(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON object")


def _args_lease(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to lease")
    p.add_argument(
        "--ttl",
        metavar="DURATION",
        type=parse_duration,
        required=True,
        help="lease time to live; renewed every ttl/3 while CMD runs",
    )
    p.add_argument("--shared", action="store_true", help="a shared lease (default: exclusive)")
    p.add_argument(
        "--wait",
        metavar="DURATION",
        type=parse_duration,
        help="queue up to DURATION for the lease (default: fail at once if it is held)",
    )


def _args_watch(p: argparse.ArgumentParser, selected: bool) -> None:
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only names starting with PREFIX")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--start-revision",
        metavar="N",
        type=int,
        default=0,
        help="replay from revision N (0, the default: only changes from now on)",
    )


_ARGS: dict[str, Callable[[argparse.ArgumentParser, bool], None]] = {
    "serve": _args_serve,
    "put": _args_put,
    "get": _args_get,
    "exec": _args_exec,
    "take": _args_take,
    "rm": _args_rm,
    "stat": _args_stat,
    "ls": _args_ls,
    "status": _args_status,
    "lease": _args_lease,
    "watch": _args_watch,
}

_PAGES: dict[str, Callable[[], dict[str, Any]]] = {
    "serve": lambda: _page(
        "Run the broker in the foreground: gRPC control plane on DIR/control.sock, the descriptor conduit on\n"
        "DIR/conduit.sock. Tells systemd READY=1 through $NOTIFY_SOCKET once both accept. SIGTERM or SIGINT\n"
        "stop it (every held descriptor is closed); SIGHUP reloads the policy file.",
        notes="  One broker per run directory: a second one refuses to start (exit 1) while the first lives;\n"
        "  sockets left by a dead one are removed.",
        example="  fdbroker serve --run-dir /run/fdbroker --policy /etc/fdbroker/policy.toml",
        exits="exit codes:\n  0   stopped by SIGTERM/SIGINT\n  1   could not start (message on stderr)\n"
        "  2   usage error",
    ),
    "put": lambda: _page(
        "Open or bind a descriptor in this process, deposit it under NAME (the broker keeps its own copy),\n"
        "print the stored entry, and close ours. Exactly one source: --listen, --file or --fd.",
        notes="  A refused put leaves things as they were: opening never truncates or creates a file\n"
        "  (--truncate acts only after the broker stored the entry; a file made by --create and a unix:\n"
        "  socket file are removed again, and only if still the ones this command made; a path that\n"
        "  existed before is never touched). CMD is looked up before anything is opened.\n"
        "  TCP listeners get SO_REUSEADDR. Port 0 picks a free port; the printed entry shows which.\n"
        "  A unix: socket file stays after this command ends (the broker holds the listener).\n"
        "  --ephemeral entries belong to this command's session and vanish when it exits, so --ephemeral\n"
        "  needs -- CMD: the entry lives while CMD runs, and the exit status is CMD's.\n"
        "  Errors opening the source use the same codes: 7 permission, 5 address in use, 4 no such file,\n"
        "  3 a symlink at PATH with a writable --mode.",
        example="  fdbroker put web --listen tcp://0.0.0.0:443 --label tier=web\n"
        "  fdbroker put log/audit --file /var/log/audit.log --mode a --create\n"
        "  fdbroker put db --fd 3 3<>/run/db.sock",
    ),
    "get": lambda: _page(
        "Fetch a copy of NAME's descriptor and exec CMD with it as fd 3 and LISTEN_FDS=1, LISTEN_PID (CMD's\n"
        "pid: CMD replaces this process), LISTEN_FDNAMES=NAME: the systemd socket-activation protocol, so\n"
        "unmodified servers (gunicorn, uvicorn --fd 3, sd_listen_fds) serve on it.",
        notes="  Without CMD, get fetches the descriptor (checking the policy and leases allow it), prints\n"
        "  what it received, closes it, and exits 0.\n"
        "  The entry stays in the broker; see `take` to move it out.",
        example="  fdbroker get web -- gunicorn app:app      (gunicorn finds LISTEN_FDS itself: no --bind)",
        exits=_COMMON_EXIT + _CMD_EXIT,
    ),
    "exec": lambda: _page(
        "Fetch copies of every NAME's descriptor in one call and exec CMD with them as fd 3, 4, ... in the\n"
        "order given, LISTEN_FDS=n, LISTEN_PID=CMD's pid, LISTEN_FDNAMES=NAME1:NAME2:... (socket activation).",
        notes="  CMD replaces this process (same pid), so a supervisor that started fdbroker supervises CMD.\n"
        "  If any entry cannot be fetched, nothing runs.",
        example="  fdbroker exec web/http web/https -- uvicorn --fd 3 app:app",
        exits=_COMMON_EXIT + _CMD_EXIT,
    ),
    "take": lambda: _page(
        "Move NAME's descriptor out of the broker: the entry is removed once this process has received it\n"
        "(atomic: if we die mid-way, the entry stays). With CMD, exec it as with `get`.",
        notes="  Without CMD the descriptor is received, described, and closed: a delete that proves receipt.\n"
        "  CMD is looked up first: a missing one (127) or a non-executable one (126) takes nothing.",
        example="  fdbroker take jobs/queue -- ./worker",
        exits=_COMMON_EXIT + _CMD_EXIT,
    ),
    "rm": lambda: _page(
        "Delete NAME; the broker closes its copy. Prints nothing on success.",
        notes="  Processes that already received a copy keep theirs.",
        example="  fdbroker rm web --if-revision 7",
    ),
    "stat": lambda: _page(
        "Describe NAME: kind, addresses or path, owner, labels, age, revision, expiry, lease.",
        example="  fdbroker stat web --json",
    ),
    "ls": lambda: _page(
        "List entries as an aligned table: NAME KIND DETAIL OWNER AGE EXPIRES LEASE.\n"
        "OWNER is user/pid of the depositor; AGE and EXPIRES read 3s, 5m, 2h, 4d.",
        notes="  No output (and exit 0) when nothing matches. --json prints [] then.\n"
        "  Listing needs no session, so it works for anonymous callers the policy allows to read.",
        example="  fdbroker ls web/ --selector tier=web",
    ),
    "status": lambda: _page(
        "Show whether the broker serves, its pid, version, uptime, run directory, revision, counts and\n"
        "limits, and who the broker takes the caller to be.",
        notes="  Exit 10 (with how to start one) when no broker serves the run directory.",
        example="  fdbroker status --json",
    ),
    "lease": lambda: _page(
        "Lease NAME (exclusive unless --shared) and run CMD as a child while holding it, like flock(1).\n"
        "CMD gets the descriptor as fd 3 by socket activation (LISTEN_FDS=1, LISTEN_PID=CMD's pid,\n"
        "LISTEN_FDNAMES=NAME) and FDBROKER_LEASE_EPOCH, FDBROKER_LEASE_ID, FDBROKER_LEASE_NAME.\n"
        "The lease is renewed in the background and released when CMD exits.",
        notes="  The epoch is the fencing token: it grows with every grant, so a downstream system that\n"
        "  remembers the highest epoch it saw rejects a holder whose lease was lost.\n"
        "  SIGTERM, SIGHUP and SIGINT are forwarded to CMD (a terminal's Ctrl-C reaches CMD directly).\n"
        "  If this process dies, the broker releases the lease at once.\n"
        "  If the lease is lost while CMD runs, a warning is printed; CMD is not stopped.",
        example="  fdbroker lease db/primary --ttl 10s --wait 30s -- ./migrate",
        exits=_COMMON_EXIT + _CMD_EXIT,
    ),
    "watch": lambda: _page(
        "Print one line per registry event under PREFIX until interrupted:\n"
        "  REVISION TYPE NAME [KIND DETAIL] [epoch=N] [reason=R]\n"
        "TYPE is put, delete, expire, lease_granted or lease_released.",
        notes="  Ctrl-C or SIGTERM ends it with exit 0. To miss nothing after a listing, watch from the\n"
        "  listing's revision + 1 (--start-revision); 11 if that revision is older than the broker's history.",
        example="  fdbroker watch web/ --json",
    ),
}


_USAGES = {
    "put": "fdbroker put NAME (--listen ADDR | --file PATH [--mode M] [--create] [--truncate] | --fd N) "
    "[options] [-- CMD [ARGS...]]",
    "get": "fdbroker get [options] NAME [-- CMD [ARGS...]]",
    "exec": "fdbroker exec [options] NAME... -- CMD [ARGS...]",
    "take": "fdbroker take [options] NAME [-- CMD [ARGS...]]",
    "lease": "fdbroker lease NAME --ttl DURATION [--shared] [--wait DURATION] [options] -- CMD [ARGS...]",
}


def _find_verb(argv: Sequence[str]) -> str | None:
    """The verb in ``argv`` (skipping top-level options and their values), or None."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--run-dir", "--timeout"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a if a in VERBS else None
    return None


_TAKES_CMD = {"get", "exec", "take", "lease", "put"}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fdbroker`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    verb = _find_verb(args_list)
    cmd: list[str] = []
    if verb in _TAKES_CMD and "--" in args_list:
        i = args_list.index("--")
        args_list, cmd = args_list[:i], args_list[i + 1 :]
    parser = build_parser(verb)
    args = parser.parse_args(args_list)
    func = VERBS[args.verb][1]
    from fdbroker.errors import BrokerError, exit_code_for

    try:
        return func(args, cmd)
    except BrokerError as err:
        print(f"{PROG} {args.verb}: {err}", file=sys.stderr)
        return exit_code_for(err)
    except CliError as err:
        print(f"{PROG} {args.verb}: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `fdbroker ls | head`: the reader left; not an error. Keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


if __name__ == "__main__":
    sys.exit(main())
