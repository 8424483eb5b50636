"""``fdbroker put``: open or bind a descriptor here (:mod:`fdbroker.cli.source`) and deposit it under a name."""

from __future__ import annotations

import argparse

from fdbroker.cli import child, connect, exitcodes
from fdbroker.cli.exitcodes import USAGE, CliError
from fdbroker.cli.format import (
    REVISION_MAX,
    add_json_argument,
    duration,
    integer,
    parse_label,
    print_json,
    span_range,
)
from fdbroker.cli.page import Verb
from fdbroker.cli.source import FILE_MODES, open_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="entry name: [A-Za-z0-9._/-], '/'-separated, 1-255 bytes")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--listen",
        metavar="ADDR",
        help="bind and deposit a listener: tcp://HOST:PORT, tcp://[::]:PORT, udp://HOST:PORT, "
        "unix:PATH, unix:@ABSTRACT",
    )
    src.add_argument("--file", metavar="PATH", help="open PATH (see --mode) and deposit it")
    src.add_argument("--fd", metavar="N", type=int, help="deposit this process's inherited descriptor N")
    p.add_argument(
        "--mode",
        choices=sorted(FILE_MODES),
        default="r",
        help="with --file: r read (default), w write, a append, rw read-write; none of them creates or "
        "truncates PATH (see --create, --truncate), and w, a, rw do not follow a symlink at PATH",
    )
    p.add_argument(
        "--create",
        action="store_true",
        help="with --file: create PATH (empty) if it is missing; removed again if the broker refuses the put",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="with --file and --mode w, a or rw: empty PATH once the broker has stored the entry (never before)",
    )
    p.add_argument(
        "--label", metavar="KEY=VALUE", type=parse_label, action="append", help="attach a label (repeatable)"
    )
    from fdbroker.limits import MAX_ENTRY_TTL, MIN_ENTRY_TTL

    p.add_argument(
        "--ttl",
        metavar="DURATION",
        type=duration(MIN_ENTRY_TTL, MAX_ENTRY_TTL),
        help=f"remove the entry after DURATION, {span_range(MIN_ENTRY_TTL, MAX_ENTRY_TTL)} "
        "(default: it never expires)",
    )
    p.add_argument(
        "--ephemeral",
        action="store_true",
        help="remove the entry when this command ends; needs -- CMD (kept while CMD runs)",
    )
    p.add_argument("--replace", action="store_true", help="replace an existing entry of that name")
    p.add_argument(
        "--if-revision",
        metavar="N",
        type=integer(0, REVISION_MAX),
        default=0,
        help="with --replace: only if the existing entry is at revision N",
    )
    p.add_argument(
        "--backlog",
        metavar="N",
        type=integer(1, 65535),
        default=128,
        help="listen backlog, 1..65535 (default 128)",
    )
    add_json_argument(p, "the stored entry (as `stat --json`)")


def _check(args: argparse.Namespace, cmd: list[str]) -> None:
    """Refuse what cannot work before anything is opened, bound or asked."""
    if args.ephemeral:
        child.require(
            cmd,
            "an --ephemeral entry lives only while its depositor runs, so give the command to "
            "keep it alive for: fdbroker put NAME ... --ephemeral -- CMD",
        )
    elif cmd:
        raise CliError("a command after -- is only accepted with --ephemeral", USAGE)
    if (args.create or args.truncate) and args.file is None:
        raise CliError("--create and --truncate go with --file only", USAGE)
    if args.truncate and args.mode == "r":
        raise CliError("--truncate needs a writable --mode (w, a or rw)", USAGE)
    if cmd:
        child.check(cmd)


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    _check(args, cmd)
    labels = dict(args.label or [])
    src = open_source(args)
    try:
        try:
            client = connect.client(args)
        except BaseException as err:
            src.refused(err, args.name)
            raise
        with client:
            try:
                entry = client.put(
                    args.name,
                    src.fd,
                    labels=labels,
                    ttl=args.ttl,
                    ephemeral=args.ephemeral,
                    replace=args.replace,
                    if_revision=args.if_revision,
                )
            except BaseException as err:
                src.refused(err, args.name)
                raise
            # The broker holds its own duplicate now; ours goes before CMD runs (CMD does not inherit it).
            src.accepted(entry.name)
            if args.json:
                print_json(entry.to_json())
            else:
                print(f"{entry.name}: {entry.summary} (revision {entry.revision})", flush=True)
            if cmd:
                return child.run(cmd)
            return 0
    finally:
        src.close()


PUT = Verb(
    name="put",
    summary="deposit a descriptor under a name",
    description="Open or bind a descriptor in this process, deposit it under NAME (the broker keeps its own "
    "copy),\nprint the stored entry, and close ours. Exactly one source: --listen, --file or --fd.",
    add_arguments=add_arguments,
    run=run,
    usage="fdbroker put NAME (--listen ADDR | --file PATH [--mode M] [--create] [--truncate] | --fd N) "
    "[options] [-- CMD [ARGS...]]",
    notes="  A refused put leaves things as they were: opening never truncates or creates a file\n"
    "  (--truncate acts only after the broker stored the entry; a file made by --create and a unix:\n"
    "  socket file are removed again, and only if still the ones this command made; a path that\n"
    "  existed before is never touched). CMD is looked up before anything is opened.\n"
    "  TCP listeners get SO_REUSEADDR. Port 0 picks a free port; the printed entry shows which.\n"
    "  A unix: socket file stays after this command ends (the broker holds the listener).\n"
    "  --ephemeral entries belong to this command's session and vanish when it exits, so --ephemeral\n"
    "  needs -- CMD: the entry lives while CMD runs, and the exit status is CMD's.\n"
    "  Errors opening the source use the same codes: 7 permission, 5 address in use, 4 no such file,\n"
    "  3 a symlink at PATH with a writable --mode.",
    example="  fdbroker put web --listen tcp://0.0.0.0:443 --label tier=web\n"
    "  fdbroker put log/audit --file /var/log/audit.log --mode a --create\n"
    "  fdbroker put db --fd 3 3<>/run/db.sock",
    takes_cmd=True,
    exits=(exitcodes.BROKER, exitcodes.CMD),
)
