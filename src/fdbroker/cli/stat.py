"""``fdbroker stat``: describe an entry (asked on the conduit: no gRPC)."""

from __future__ import annotations

import argparse

from fdbroker.cli import connect
from fdbroker.cli.format import format_stat, print_json
from fdbroker.cli.page import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to describe")
    p.add_argument("--json", action="store_true", help="print the entry as a JSON object")


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    import time

    with connect.quick(args) as client:
        entry = client.stat(args.name)
    if args.json:
        print_json(entry.to_json())
    else:
        print(format_stat(entry, time.time()))
    return 0


STAT = Verb(
    name="stat",
    summary="describe an entry",
    description="Describe NAME: kind, addresses or path, owner, labels, age, revision, expiry, lease.",
    add_arguments=add_arguments,
    run=run,
    example="  fdbroker stat web --json",
)
