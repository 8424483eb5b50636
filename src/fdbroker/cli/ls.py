"""``fdbroker ls``: list entries (asked on the conduit: no gRPC, the CLI's quickest start)."""

from __future__ import annotations

import argparse

from fdbroker.cli import connect
from fdbroker.cli.format import format_table, print_json
from fdbroker.cli.page import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only names starting with PREFIX")
    p.add_argument(
        "--selector",
        metavar="SEL",
        default="",
        help="label selector, e.g. 'tier=web,env!=dev', 'team', '!old', 'env in (a,b)'",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array of entries")


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    import time

    with connect.quick(args) as client:
        entries = client.list(args.prefix, selector=args.selector)
    if args.json:
        print_json([e.to_json() for e in entries])
    elif entries:
        print(format_table(entries, time.time()))
    return 0


LS = Verb(
    name="ls",
    summary="list entries",
    description="List entries as an aligned table: NAME KIND DETAIL OWNER AGE EXPIRES LEASE.\n"
    "OWNER is user/pid of the depositor; AGE and EXPIRES read 3s, 5m, 2h, 4d.",
    add_arguments=add_arguments,
    run=run,
    notes="  No output (and exit 0) when nothing matches. --json prints [] then.\n"
    "  Listing needs no session, so it works for anonymous callers the policy allows to read.",
    example="  fdbroker ls web/ --selector tier=web",
)
