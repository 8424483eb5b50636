"""The ``fdbroker`` program: find the verb, load its module, parse, run it, and turn what it raised into an
exit status and one line on stderr.

Only the verb being run is imported (and only its options are built): every start pays for one verb, never
for all of them. ``fdbroker --help`` (no verb) loads every verb for its one-line summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from fdbroker.cli import exitcodes
from fdbroker.cli.exitcodes import CliError
from fdbroker.cli.format import parse_duration
from fdbroker.cli.page import ENVIRONMENT, Verb

PROG = "fdbroker"
DEFAULT_TIMEOUT = 10.0

VERBS: dict[str, str] = {
    "serve": "serve",
    "put": "put",
    "get": "get",
    "exec": "get",
    "take": "take",
    "rm": "rm",
    "stat": "stat",
    "ls": "ls",
    "status": "status",
    "lease": "lease",
    "watch": "watch",
}
"""Every verb, in the order ``fdbroker --help`` lists them → its module under ``fdbroker.cli``, which defines
it as the :class:`~fdbroker.cli.page.Verb` named like the verb in capitals (``get.EXEC``)."""


def load(name: str) -> Verb:
    """The verb called ``name`` (importing its module)."""
    # __import__ rather than importlib.import_module: the same import, but visible to `python -X importtime`.
    module = __import__(f"fdbroker.cli.{VERBS[name]}", fromlist=["_"])
    verb: Verb = getattr(module, name.upper())
    return verb


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On the verb parsers the defaults are suppressed, so `fdbroker --run-dir X ls` and `fdbroker ls --run-dir X`
    # both work and the verb's absent option does not reset the top-level one.
    d: Any = argparse.SUPPRESS
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        default=None if top else d,
        help="the broker's run directory, holding control.sock and conduit.sock (env FDBROKER_RUN_DIR; "
        "default /run/fdbroker for root, else $XDG_RUNTIME_DIR/fdbroker, else a per-user temp dir)",
    )
    p.add_argument(
        "--timeout",
        metavar="DURATION",
        type=parse_duration,
        default=DEFAULT_TIMEOUT if top else d,
        help=f"limit for each call to the broker (default {DEFAULT_TIMEOUT:g}s)",
    )


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The argument parser, with ``verb``'s options and manual page; without a verb, the list of verbs."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fdbroker holds open file descriptors under names and hands them to allowed processes.\n"
        "Each verb is one call to the broker; `fdbroker VERB --help` is its manual page.",
        epilog=f"{exitcodes.help_section()}\n\n{ENVIRONMENT}\n\nsee docs/cli.md for every verb",
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERBS:
        if verb is None:
            sub.add_parser(name, help=load(name).summary)
        elif name != verb:
            sub.add_parser(name)  # a valid choice, never shown: `verb` was named, so no list is printed
        else:
            v = load(name)
            p = sub.add_parser(name, **v.parser_kwargs())
            _common(p, top=False)
            v.add_arguments(p)
    return parser


def find_verb(argv: Sequence[str]) -> str | None:
    """The verb in ``argv`` (skipping top-level options and their values), or None."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--run-dir", "--timeout"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return a if a in VERBS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fdbroker`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    name = find_verb(args_list)
    cmd: list[str] = []
    if name is not None and load(name).takes_cmd and "--" in args_list:
        i = args_list.index("--")
        args_list, cmd = args_list[:i], args_list[i + 1 :]
    if name is not None and {"-h", "--help"} & set(args_list[: args_list.index(name)]):
        name = None  # `fdbroker --help VERB`: the top-level page, listing every verb
    if name is not None and not {"-h", "--help"} & set(args_list):
        early = load(name).early
        code = early(args_list) if early is not None else None
        if code is not None:
            return code
    args = build_parser(name).parse_args(args_list)
    verb = load(args.verb)
    from fdbroker.errors import BrokerError

    try:
        return verb.run(args, cmd)
    except BrokerError as err:
        print(f"{PROG} {args.verb}: {err}", file=sys.stderr)
        return exitcodes.exit_code_for(err)
    except CliError as err:
        print(f"{PROG} {args.verb}: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED.code
    except BrokenPipeError:
        # `fdbroker ls | head`: the reader left; not an error. Keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return exitcodes.OK.code
