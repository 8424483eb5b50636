"""``fdbroker lease``: hold a lease on an entry while CMD runs as a child, like ``flock(1)``."""

from __future__ import annotations

import argparse
import os
import sys

from fdbroker.cli import child, connect, exitcodes
from fdbroker.cli.format import DAY, duration, span_range
from fdbroker.cli.page import Verb

WAIT_RANGE = (0.0, DAY)
"""``--wait``: 0 (one try in the queue) .. 24 h."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fdbroker.limits import MAX_LEASE_TTL, MIN_LEASE_TTL

    p.add_argument("name", metavar="NAME", help="the entry to lease")
    p.add_argument(
        "--ttl",
        metavar="DURATION",
        type=duration(MIN_LEASE_TTL, MAX_LEASE_TTL),
        required=True,
        help=f"lease time to live, {span_range(MIN_LEASE_TTL, MAX_LEASE_TTL)}; renewed every ttl/3 while "
        "CMD runs",
    )
    p.add_argument("--shared", action="store_true", help="a shared lease (default: exclusive)")
    p.add_argument(
        "--wait",
        metavar="DURATION",
        type=duration(*WAIT_RANGE),
        help=f"queue up to DURATION for the lease, {span_range(*WAIT_RANGE)} (default: fail at once if it is "
        "held)",
    )
    child.add_listen_env_argument(p)


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    child.require(cmd, "fdbroker lease NAME --ttl D -- CMD [ARGS]")
    child.check(cmd)
    with (
        connect.client(args) as client,
        client.lease(args.name, args.ttl, shared=args.shared, wait=args.wait) as held,
    ):
        fd = held.fd.fileno()
        env = dict(os.environ)
        env["FDBROKER_LEASE_EPOCH"] = str(held.epoch)
        env["FDBROKER_LEASE_ID"] = held.lease_id
        env["FDBROKER_LEASE_NAME"] = args.name
        # CMD runs as our child (we keep the session, hence the lease); a fresh single-threaded helper process
        # arranges fd 3 and sets LISTEN_PID to its own pid, which CMD keeps across its exec.
        trampoline = [sys.executable, "-m", "fdbroker.activation", "--fd", str(fd), "--name", args.name]
        if args.no_listen_env:
            trampoline.append("--no-listen-env")
        trampoline.append("--")
        rc = child.run(trampoline + cmd, pass_fds=[fd], env=env)
        if held.lost.is_set():
            print(
                f"fdbroker lease: warning: the lease on {args.name!r} was lost while the command ran "
                f"(expired or revoked); epoch {held.epoch} is stale",
                file=sys.stderr,
            )
        return rc


LEASE = Verb(
    name="lease",
    summary="hold a lease on an entry while CMD runs (like flock(1))",
    description="Lease NAME (exclusive unless --shared) and run CMD as a child while holding it, like "
    "flock(1).\nCMD gets the descriptor as fd 3 by socket activation (LISTEN_FDS=1, LISTEN_PID=CMD's pid,\n"
    "LISTEN_FDNAMES=NAME) and FDBROKER_LEASE_EPOCH, FDBROKER_LEASE_ID, FDBROKER_LEASE_NAME.\n"
    "The lease is renewed in the background and released when CMD exits.",
    add_arguments=add_arguments,
    run=run,
    usage="fdbroker lease NAME --ttl DURATION [--shared] [--wait DURATION] [options] -- CMD [ARGS...]",
    notes="  The epoch is the fencing token: it grows with every grant, so a downstream system that\n"
    "  remembers the highest epoch it saw rejects a holder whose lease was lost.\n"
    "  SIGTERM, SIGHUP and SIGINT are forwarded to CMD (a terminal's Ctrl-C reaches CMD directly).\n"
    "  If this process dies, the broker releases the lease at once.\n"
    "  If the lease is lost while CMD runs, a warning is printed; CMD is not stopped.",
    example="  fdbroker lease db/primary --ttl 10s --wait 30s -- ./migrate",
    takes_cmd=True,
    exits=(exitcodes.BROKER, exitcodes.CMD),
)
