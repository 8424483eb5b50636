"""``fdbroker rm``: delete an entry."""

from __future__ import annotations

import argparse

from fdbroker.cli import connect
from fdbroker.cli.format import REVISION_MAX, add_json_argument, integer, print_json
from fdbroker.cli.page import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="the entry to delete")
    p.add_argument(
        "--if-revision",
        metavar="N",
        type=integer(0, REVISION_MAX),
        default=0,
        help="only if the entry is at revision N",
    )
    add_json_argument(p, '{"name": NAME, "deleted": true, "revision": R} (the delete\'s revision)')


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    with connect.client(args) as client:
        revision = client.delete(args.name, if_revision=args.if_revision)
    if args.json:
        print_json({"name": args.name, "deleted": True, "revision": revision})
    return 0


RM = Verb(
    name="rm",
    summary="delete an entry",
    description="Delete NAME; the broker closes its copy. Prints nothing on success (with --json: what was "
    "deleted).",
    add_arguments=add_arguments,
    run=run,
    notes="  Processes that already received a copy keep theirs.",
    example="  fdbroker rm web --if-revision 7",
)
