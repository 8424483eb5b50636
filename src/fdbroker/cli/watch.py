"""``fdbroker watch``: print registry events as they happen, until interrupted."""

from __future__ import annotations

import argparse

from fdbroker.cli import connect
from fdbroker.cli.format import REVISION_MAX, format_event, integer
from fdbroker.cli.page import Verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only names starting with PREFIX")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--start-revision",
        metavar="N",
        type=integer(0, REVISION_MAX),
        default=0,
        help="replay from revision N (0, the default: only changes from now on)",
    )


def run(args: argparse.Namespace, cmd: list[str]) -> int:
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
        with (
            connect.client(args) as client,
            client.watch(args.prefix, start_revision=args.start_revision) as events,
        ):
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


WATCH = Verb(
    name="watch",
    summary="print registry events as they happen",
    description="Print one line per registry event under PREFIX until interrupted:\n"
    "  REVISION TYPE NAME [KIND DETAIL] [epoch=N] [reason=R]\n"
    "TYPE is put, delete, expire, lease_granted or lease_released.",
    add_arguments=add_arguments,
    run=run,
    notes="  Ctrl-C or SIGTERM ends it with exit 0. To miss nothing after a listing, watch from the\n"
    "  listing's revision + 1 (--start-revision); 11 if that revision is older than the broker's history.",
    example="  fdbroker watch web/ --json",
)
