"""The systemd socket-activation protocol (``sd_listen_fds(3)``), both sides.

Sending side, :func:`exec_with_fds`: replace this process with a command that finds the given descriptors at
3, 4, … and ``LISTEN_FDS`` / ``LISTEN_PID`` / ``LISTEN_FDNAMES`` in its environment, so any
systemd-activatable server (gunicorn, uvicorn ``--fd 3``, ``sd_listen_fds`` in C,
go-systemd's ``activation.Listeners`` in Go) can use them unmodified.

Receiving side, :func:`listen_fds`: what ``sd_listen_fds_with_names`` does, for Python servers.

``python -m fdbroker.activation [--no-listen-env] --fd N [--fd N ...] --name NAME ... -- CMD [ARGS]`` is the
same exec as a separate, single-threaded step: a multi-threaded parent (one holding a gRPC channel and a lease
keep-alive thread) starts it with ``subprocess`` and ``pass_fds``, and the helper — whose pid CMD keeps across
the exec — sets ``LISTEN_PID`` to its own pid, which is exactly what the protocol asks for.

Both take ``listen_env`` / ``--no-listen-env``: the descriptors at 3, 4, … without any ``LISTEN_*`` variable,
for a command told their numbers on its own command line (``gunicorn --bind fd://3``): given both, gunicorn
adopts fd 3 twice and fails with ``EBADF``.

This module imports nothing beyond the standard library's ``os``, ``fcntl`` and ``shutil``; the CLI uses it
after fetching descriptors and before any third-party code would run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

SD_LISTEN_FDS_START = 3
"""The first descriptor number of the protocol."""

_ENV_KEYS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def sanitize_name(name: str) -> str:
    """A valid ``LISTEN_FDNAMES`` element: printable ASCII without ``:``, at most 255 bytes, never empty.

    Entry names are already ``:``-free (the broker's name rules); this guards everything else that calls
    :func:`exec_with_fds`. Anything else becomes ``_``; an empty name becomes ``unknown`` (systemd's word).
    """
    out = "".join(c if (" " < c <= "~" and c != ":") else "_" for c in name)[:255]
    return out or "unknown"


def activation_env(
    n: int,
    names: Sequence[str],
    pid: int,
    *,
    base: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    listen_env: bool = True,
) -> dict[str, str]:
    """The environment for a command receiving ``n`` descriptors: ``base`` (default ``os.environ``) with any
    stale ``LISTEN_*`` removed, then ``extra_env``, then ``LISTEN_FDS=n``, ``LISTEN_PID=pid`` and
    ``LISTEN_FDNAMES`` (the sanitized ``names`` joined by ``:``).

    ``listen_env`` False: no ``LISTEN_*`` at all (plain descriptors, for a command told their numbers itself,
    such as ``gunicorn --bind fd://3``, which would otherwise adopt the descriptor a second time)."""
    if len(names) != n:
        raise ValueError(f"{n} descriptors but {len(names)} names")
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _ENV_KEYS}
    if extra_env:
        env.update(extra_env)
    if not listen_env:
        return env
    env["LISTEN_FDS"] = str(n)
    env["LISTEN_PID"] = str(pid)
    env["LISTEN_FDNAMES"] = ":".join(sanitize_name(x) for x in names)
    return env


def reserve_slots(n: int) -> list[int]:
    """Occupy every free descriptor number below ``3 + n`` with a close-on-exec ``/dev/null``.

    Call it before opening anything else (before creating a gRPC channel, whose internal descriptors would
    otherwise take the low numbers that :func:`arrange_fds` later overwrites while other threads may still use
    them). Returns the placeholders; the caller owns them (``arrange_fds`` overwrites them, or close them).
    """
    held: list[int] = []
    limit = SD_LISTEN_FDS_START + n
    while True:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if fd >= limit:
            os.close(fd)
            return held
        held.append(fd)


def arrange_fds(fds: Sequence[int]) -> None:
    """Make ``fds[i]`` available as descriptor ``3 + i``, inheritable (``FD_CLOEXEC`` cleared), each ``i``.

    Overlaps are safe in every arrangement (a descriptor already at its target, or at another one's target, or
    the same descriptor twice): every source is first duplicated into a temporary range above
    ``max(fds) + n`` and the targets are filled from there. Whatever occupied a target number before is closed
    (``dup2``). The temporary copies are closed again; the sources themselves are left open, marked
    close-on-exec, so that after ``exec`` exactly the descriptors ``3 … 3+n-1`` are passed on from this set.
    On failure (``OSError``) some targets may already have been overwritten.
    """
    n = len(fds)
    if n == 0:
        return
    floor = max(max(fds) + 1, SD_LISTEN_FDS_START + n)
    temps: list[int] = []
    try:
        for fd in fds:
            temps.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor))
        for fd in fds:
            if fd >= SD_LISTEN_FDS_START + n:  # 0-2 are stdio: never touched
                os.set_inheritable(fd, False)
        for i, tmp in enumerate(temps):
            os.dup2(tmp, SD_LISTEN_FDS_START + i, inheritable=True)
    finally:
        for tmp in temps:
            os.close(tmp)


def exec_with_fds(
    fds: Sequence[int],
    names: Sequence[str],
    argv: Sequence[str],
    *,
    extra_env: Mapping[str, str] | None = None,
    listen_env: bool = True,
) -> NoReturn:
    """Replace this process with ``argv`` holding ``fds`` as 3, 4, … under the socket-activation protocol
    (``listen_env`` False: as plain descriptors, every ``LISTEN_*`` variable removed).

    ``LISTEN_PID`` is this process's pid, which ``exec`` keeps. ``argv[0]`` is looked up on ``PATH`` first,
    so a missing or non-executable command raises :class:`FileNotFoundError` / :class:`PermissionError`
    before any descriptor is moved. Ownership: on success nothing returns; on an ``OSError`` from ``exec``
    itself the descriptors 3 … 3+n-1 have already been overwritten and the caller should exit.
    """
    if not argv:
        raise ValueError("no command to run")
    path = resolve_command(argv[0])
    env = activation_env(len(fds), names, os.getpid(), extra_env=extra_env, listen_env=listen_env)
    arrange_fds(fds)
    os.execve(path, list(argv), env)


def resolve_command(cmd: str) -> str:
    """The path ``execvp`` would run for ``cmd``; :class:`FileNotFoundError` or :class:`PermissionError`."""
    if "/" in cmd:
        if not os.path.exists(cmd):
            raise FileNotFoundError(2, "no such file", cmd)
        if not os.access(cmd, os.X_OK) or os.path.isdir(cmd):
            raise PermissionError(13, "not executable", cmd)
        return cmd
    found = shutil.which(cmd)
    if found is None:
        raise FileNotFoundError(2, "command not found on PATH", cmd)
    return found


def listen_fds(unset_env: bool = True) -> list[tuple[int, str]]:
    """The descriptors passed to this process by socket activation, as ``[(3, name), (4, name), …]``.

    Like ``sd_listen_fds_with_names(3)``: empty unless ``LISTEN_PID`` is this process's pid; names default to
    ``unknown``. Marks the descriptors close-on-exec (so they do not leak into this process's own children)
    and, with ``unset_env``, removes the ``LISTEN_*`` variables. The caller owns the descriptors.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        n = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        n, pid = 0, -1
    raw_names = os.environ.get("LISTEN_FDNAMES")
    if unset_env:
        for k in _ENV_KEYS:
            os.environ.pop(k, None)
    if pid != os.getpid() or n <= 0:
        return []
    names = raw_names.split(":") if raw_names is not None else []
    out: list[tuple[int, str]] = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append((fd, names[i] if i < len(names) and names[i] else "unknown"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fdbroker.activation [--no-listen-env] --fd N --name NAME [...] -- CMD [ARGS]``: exec CMD with
    the fds (``--no-listen-env``: as plain descriptors, without ``LISTEN_*``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    fds: list[int] = []
    names: list[str] = []
    listen_env = True
    try:
        while args and args[0] != "--":
            opt = args.pop(0)
            if opt == "--no-listen-env":
                listen_env = False
            elif opt == "--fd":
                fds.append(int(args.pop(0)))
            elif opt == "--name":
                names.append(args.pop(0))
            else:
                raise ValueError(f"unknown option {opt}")
        if not args or len(names) != len(fds):
            raise ValueError("expected as many --name as --fd, then -- CMD")
    except (ValueError, IndexError) as err:
        print(f"fdbroker.activation: {err}", file=sys.stderr)
        return 2
    cmd = args[1:]
    # A parent that blocked signals to wait for them (fdbroker lease) must not pass that mask on to CMD.
    import signal

    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        exec_with_fds(fds, names, cmd, listen_env=listen_env)
    except FileNotFoundError as err:
        print(f"fdbroker: {cmd[0] if cmd else ''}: {err.strerror}", file=sys.stderr)
        return 127
    except PermissionError as err:
        print(f"fdbroker: {cmd[0] if cmd else ''}: {err.strerror}", file=sys.stderr)
        return 126
    except (OSError, ValueError) as err:
        print(f"fdbroker: cannot run {cmd[0] if cmd else ''}: {err}", file=sys.stderr)
        return 126


if __name__ == "__main__":
    sys.exit(main())
