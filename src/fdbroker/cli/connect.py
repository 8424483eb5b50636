"""How a verb reaches the broker: the run directory of this invocation, then a client for it; and, when the
broker cannot be reached, whether a permission is why.

A missing run directory is refused here, before the client (and gRPC) is imported. The verbs that only read
(``ls``, ``stat``, ``status``) use :func:`quick`, which asks on the conduit and loads no gRPC at all.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from fdbroker.cli.exitcodes import PERMISSION_DENIED, CliError

if TYPE_CHECKING:
    from pathlib import Path

    from fdbroker.client import Client
    from fdbroker.client.quick import QuickClient


def find(args: argparse.Namespace) -> Path:
    """The run directory (``--run-dir``, else ``$FDBROKER_RUN_DIR``, else this user's own broker's, else the
    system broker's: :func:`fdbroker.rundir.find_run_dir`)."""
    from fdbroker.rundir import find_run_dir

    return find_run_dir(args.run_dir)


def run_dir(args: argparse.Namespace) -> str:
    """The run directory (:func:`find`); raises :class:`~fdbroker.errors.Unavailable` saying how to start a
    broker when it does not exist, and :class:`~fdbroker.cli.exitcodes.CliError` (permission denied) when this
    user may not reach it."""
    path = find(args)
    if not os.path.isdir(path):
        denied = access_problem(path)
        if denied:
            raise CliError(denied, PERMISSION_DENIED)
        from fdbroker.errors import Unavailable

        raise Unavailable(
            f"no broker at {path} (the directory does not exist); start one with "
            f"`fdbroker serve --run-dir {path}` or point --run-dir / FDBROKER_RUN_DIR at a running one"
        )
    return str(path)


def client(args: argparse.Namespace) -> Client:
    """The gRPC client, for the verbs that move descriptors, lease or watch."""
    path = run_dir(args)
    from fdbroker.client import Client

    return Client(path, timeout=args.timeout)


def quick(args: argparse.Namespace) -> QuickClient:
    """The conduit-only client, for the read-only verbs: the command starts without loading gRPC."""
    path = run_dir(args)
    from fdbroker.client.quick import QuickClient

    return QuickClient(path, timeout=args.timeout)


# -- why the broker cannot be reached ----------------------------------------------------------------------------


def access_problem(path: Path) -> str | None:
    """Why this user may not reach the broker at ``path``, or None: the first directory on the way it may not
    enter, or a socket it may not connect to (both need a permission: search on directories, write on
    sockets), named with its owner, group and mode and what would let this user in.

    Called when the broker could not be reached, to tell "permission denied" (exit 7) from "no broker" (10).
    """
    from fdbroker.rundir import CONDUIT_SOCKET, CONTROL_SOCKET

    for d in (*reversed(path.parents), path):
        try:
            st = os.stat(d)
        except OSError:
            return None  # missing (or not a directory): not a permission problem
        if not _may(d, os.X_OK):
            return _denied(d, st, "enter the directory", path)
    for name in (CONDUIT_SOCKET, CONTROL_SOCKET):
        sock = path / name
        try:
            st = os.stat(sock)
        except OSError:
            continue
        if not _may(sock, os.W_OK):
            return _denied(sock, st, "connect to", path)
    return None


def _may(path: Path, mode: int) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(path, mode, effective_ids=effective)


def _denied(what: Path, st: os.stat_result, action: str, run_dir: Path) -> str:
    import grp
    import pwd
    import stat

    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    uid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    in_group = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    who = f"uid {uid}" + ("" if in_group else f" (not in group {group})")
    if stat.S_ISSOCK(st.st_mode):
        fix = (
            f"ask the broker's operator to add this user to group {group}, or to serve with "
            "--socket-group GROUP (a group of yours) or a wider --socket-mode"
        )
    else:
        fix = (
            f"ask the broker's operator for access to {what} (its group or mode), or use a broker of your own"
        )
    return (
        f"permission denied: {who} may not {action} {what} (owner {owner}, group {group}, mode {mode:04o}, "
        f"{stat.filemode(st.st_mode)}), so the broker at {run_dir} cannot be reached; {fix}"
    )


def explain_unreachable(args: argparse.Namespace) -> CliError | None:
    """For a broker that could not be reached: the permission problem behind it, as the error to exit with."""
    denied = access_problem(find(args))
    return CliError(denied, PERMISSION_DENIED) if denied else None
