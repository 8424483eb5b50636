"""``fdbroker take``: move an entry's descriptor out of the broker (to CMD, exec'd as ``get`` does)."""

from __future__ import annotations

import argparse

from fdbroker.cli import child, connect, exitcodes
from fdbroker.cli.format import (
    REVISION_MAX,
    add_json_argument,
    describe_received,
    integer,
    print_json,
    received_json,
)
from fdbroker.cli.page import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to take")
    p.add_argument(
        "--if-revision",
        metavar="N",
        type=integer(0, REVISION_MAX),
        default=0,
        help="only if the entry is at revision N",
    )
    child.add_listen_env_argument(p)
    add_json_argument(p, "without CMD: what was received (and taken)")


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    if not cmd:
        with (
            connect.client(args) as client,
            client.take(args.name, if_revision=args.if_revision, raw=True) as owned,
        ):
            if args.json:
                print_json({**received_json(args.name, owned.fileno()), "taken": True})
            else:
                print(describe_received(args.name, owned.fileno()) + " (taken, closed)")
        return 0
    return child.fetch_and_exec(
        args, [args.name], cmd, lambda c: [c.take(args.name, if_revision=args.if_revision, raw=True).detach()]
    )


TAKE = Verb(
    name="take",
    summary="move an entry's descriptor out of the broker (to CMD)",
    description="Move NAME's descriptor out of the broker: the entry is removed once this process has "
    "received it\n(atomic: if we die mid-way, the entry stays). With CMD, exec it as with `get`.",
    add_arguments=add_arguments,
    run=run,
    usage="fdbroker take [options] NAME [-- CMD [ARGS...]]",
    notes="  Without CMD the descriptor is received, described, and closed: a delete that proves receipt.\n"
    "  CMD is looked up first: a missing one (127) or a non-executable one (126) takes nothing.",
    example="  fdbroker take jobs/queue -- ./worker",
    takes_cmd=True,
    exits=(exitcodes.BROKER, exitcodes.CMD),
)
