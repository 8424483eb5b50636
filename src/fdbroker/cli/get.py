"""``fdbroker get`` and ``fdbroker exec``: copies of entries' descriptors, handed to CMD as 3, 4, … by socket
activation (CMD replaces this process). The entries stay in the broker; ``take`` moves one out."""

from __future__ import annotations

import argparse

from fdbroker.cli import child, connect, exitcodes
from fdbroker.cli.format import add_json_argument, describe_received, print_json, received_json
from fdbroker.cli.page import Verb

_EXITS = (exitcodes.BROKER, exitcodes.CMD)


def add_get_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to fetch")
    child.add_listen_env_argument(p)
    add_json_argument(p, "without CMD: what was received")


def run_get(args: argparse.Namespace, cmd: list[str]) -> int:
    if not cmd:
        with connect.client(args) as client, client.get_fd(args.name) as owned:
            if args.json:
                print_json(received_json(args.name, owned.fileno()))
            else:
                print(describe_received(args.name, owned.fileno()))
        return 0
    return child.fetch_and_exec(args, [args.name], cmd, lambda c: [c.get_fd(args.name).detach()])


def add_exec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", metavar="NAME", nargs="+", help="entries to fetch, in fd order (3, 4, ...)")
    child.add_listen_env_argument(p)


def run_exec(args: argparse.Namespace, cmd: list[str]) -> int:
    child.require(cmd, "fdbroker exec NAME... -- CMD [ARGS]")
    names = list(args.names)
    return child.fetch_and_exec(args, names, cmd, lambda c: [o.detach() for o in c.get_many(names, raw=True)])


GET = Verb(
    name="get",
    summary="run CMD with a copy of one entry's descriptor as fd 3",
    description="Fetch a copy of NAME's descriptor and exec CMD with it as fd 3 and LISTEN_FDS=1, LISTEN_PID "
    "(CMD's\npid: CMD replaces this process), LISTEN_FDNAMES=NAME: the systemd socket-activation protocol, so\n"
    "unmodified servers (gunicorn, uvicorn --fd 3, sd_listen_fds) serve on it.",
    add_arguments=add_get_arguments,
    run=run_get,
    usage="fdbroker get [options] NAME [-- CMD [ARGS...]]",
    notes="  Without CMD, get fetches the descriptor (checking the policy and leases allow it), prints\n"
    "  what it received, closes it, and exits 0.\n"
    "  The entry stays in the broker; see `take` to move it out.",
    example="  fdbroker get web -- gunicorn app:app      (gunicorn finds LISTEN_FDS itself: no --bind)\n"
    "  fdbroker get web --no-listen-env -- gunicorn --bind fd://3 app:app      (or: plain fd 3)",
    takes_cmd=True,
    exits=_EXITS,
)

EXEC = Verb(
    name="exec",
    summary="run CMD with copies of several entries' descriptors as fd 3, 4, ...",
    description="Fetch copies of every NAME's descriptor in one call and exec CMD with them as fd 3, 4, ... "
    "in the\norder given, LISTEN_FDS=n, LISTEN_PID=CMD's pid, LISTEN_FDNAMES=NAME1:NAME2:... (socket "
    "activation).",
    add_arguments=add_exec_arguments,
    run=run_exec,
    usage="fdbroker exec [options] NAME... -- CMD [ARGS...]",
    notes="  CMD replaces this process (same pid), so a supervisor that started fdbroker supervises CMD.\n"
    "  If any entry cannot be fetched, nothing runs.\n"
    "  A server that reads LISTEN_FDS itself (gunicorn, sd_listen_fds) must not also be told the\n"
    "  number (gunicorn --bind fd://3 adopts fd 3 twice: EBADF); to pass the number on the command line\n"
    "  instead, add --no-listen-env, which leaves every LISTEN_* variable out.",
    example="  fdbroker exec web/http web/https -- uvicorn --fd 3 app:app",
    takes_cmd=True,
    exits=_EXITS,
)
