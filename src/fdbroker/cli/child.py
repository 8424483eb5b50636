"""The command after ``--``: found before the broker is asked for anything, then either exec'd in place of
``fdbroker`` holding the fetched descriptors (``get``, ``exec``, ``take``: socket activation through
:mod:`fdbroker.activation`) or run as a child while ``fdbroker`` keeps its session (``lease``,
``put --ephemeral``).

A CMD that cannot be run leaves with 127 (not found) or 126 (not executable), as a shell does; one that ran
passes its status through (128+N if signal N killed it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from fdbroker.cli import connect
from fdbroker.cli.exitcodes import COMMAND_NOT_FOUND, NOT_EXECUTABLE, USAGE, CliError

if TYPE_CHECKING:
    from fdbroker.client import Client


def add_listen_env_argument(p: argparse.ArgumentParser) -> None:
    """``--no-listen-env``, for the verbs that hand descriptors to CMD."""
    p.add_argument(
        "--no-listen-env",
        action="store_true",
        help="hand CMD the descriptors as plain fd 3, 4, ... without LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES "
        "(removed if inherited), for a CMD told the numbers itself, e.g. gunicorn --bind fd://3",
    )


def require(cmd: list[str], why: str) -> None:
    """Refuse (usage error) a missing CMD; ``why`` says what it is for."""
    if not cmd:
        raise CliError(f"missing command: {why}", USAGE)


def cannot_run(name: str, err: OSError) -> CliError:
    """The error for a CMD that could not be found or started."""
    if isinstance(err, FileNotFoundError):
        return CliError(f"{name}: command not found", COMMAND_NOT_FOUND)
    if isinstance(err, PermissionError):
        return CliError(f"{name}: not executable", NOT_EXECUTABLE)
    return CliError(f"cannot run {name}: {err.strerror}", NOT_EXECUTABLE)


def check(cmd: list[str]) -> None:
    """Find CMD before the broker is asked for anything: a typo must not cost a taken entry, a lease grant or
    a deposit (126/127 as if it had run). CMD is looked up again when it runs."""
    from fdbroker.activation import resolve_command

    try:
        resolve_command(cmd[0])
    except OSError as err:
        raise cannot_run(cmd[0], err) from None


def fetch_and_exec(
    args: argparse.Namespace, names: list[str], cmd: list[str], fetch: Callable[[Client], list[int]]
) -> NoReturn:
    """Fetch the descriptors of ``names`` with ``fetch`` and exec CMD on them as 3, 4, … (socket activation, or
    plain descriptors with ``--no-listen-env``).

    Returns only on failure (by raising): CMD replaces this process. The fetched descriptors are CMD's; if the
    exec fails they are lost with this process (for ``take``, the entry was already moved out).
    """
    from fdbroker import activation

    check(cmd)
    # Keep 3..3+n-1 away from gRPC's own descriptors: exec_with_fds overwrites those numbers while gRPC's
    # threads may still be running.
    placeholders = activation.reserve_slots(len(names))
    try:
        with connect.client(args) as client:
            fds = fetch(client)
        try:
            activation.exec_with_fds(fds, names, cmd, listen_env=not args.no_listen_env)
        except OSError as err:
            raise cannot_run(cmd[0], err) from None
    finally:
        for fd in placeholders:
            try:
                os.close(fd)
            except OSError:
                pass


def _foreground() -> bool:
    """Whether this process group owns the terminal (then a Ctrl-C reached our child directly)."""
    for f in (sys.stdin, sys.stderr):
        try:
            if f is not None and f.isatty():
                return os.tcgetpgrp(f.fileno()) == os.getpgrp()
        except (OSError, ValueError):
            continue
    return False


def run(argv: list[str], *, pass_fds: Sequence[int] = (), env: dict[str, str] | None = None) -> int:
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
        except OSError as err:
            raise cannot_run(argv[0], err) from None
        for sig in pending:
            proc.send_signal(sig)
        rc = proc.wait()
        return rc if rc >= 0 else 128 - rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)
