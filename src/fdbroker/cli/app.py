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
from fdbroker.cli.format import TIMEOUT_RANGE, duration
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
    "completion": "completion",
}
"""Every verb, in the order ``fdbroker --help`` lists them → its module under ``fdbroker.cli``, which defines
it as the :class:`~fdbroker.cli.page.Verb` named like the verb in capitals (``get.EXEC``)."""


def load(name: str) -> Verb:
    """The verb called ``name`` (importing its module)."""
    # __import__ rather than importlib.import_module: the same import, but visible to `python -X importtime`.
    module = __import__(f"fdbroker.cli.{VERBS[name]}", fromlist=["_"])
    verb: Verb = getattr(module, name.upper())
    return verb


def _common(p: argparse.ArgumentParser, *, top: bool, serve: bool = False) -> None:
    # On the verb parsers the defaults are suppressed, so `fdbroker --run-dir X ls` and `fdbroker ls --run-dir X`
    # both work and the verb's absent option does not reset the top-level one.
    d: Any = argparse.SUPPRESS
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        default=None if top else d,
        help="the broker's run directory, holding control.sock and conduit.sock (env FDBROKER_RUN_DIR; "
        "default /run/fdbroker for root, else $XDG_RUNTIME_DIR/fdbroker, else a per-user temp dir"
        + (")" if serve else "; a client uses /run/fdbroker when no broker of your own is there)"),
    )
    p.add_argument(
        "--timeout",
        metavar="DURATION",
        type=duration(*TIMEOUT_RANGE),
        default=DEFAULT_TIMEOUT if top else d,
        help=f"limit for each call to the broker, 1ms..24h (default {DEFAULT_TIMEOUT:g}s)",
    )


def build_parser(verb: str | None = None, *, every: bool = False) -> argparse.ArgumentParser:
    """The argument parser, with ``verb``'s options and manual page; without a verb, the list of verbs; with
    ``every``, every verb's options (the whole tree, for ``fdbroker completion``: it loads every verb)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fdbroker holds open file descriptors under names and hands them to allowed processes.\n"
        "Each verb is one call to the broker; `fdbroker VERB --help` is its manual page.",
        epilog=f"{exitcodes.help_section()}\n\n{ENVIRONMENT}\n\nsee docs/cli.md for every verb",
    )
    _common(parser, top=True)
    parser.add_argument("--version", action="version", version=version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERBS:
        if verb is None and not every:
            sub.add_parser(name, help=load(name).summary)
        elif name != verb and not every:
            sub.add_parser(name)  # a valid choice, never shown: `verb` was named, so no list is printed
        else:
            v = load(name)
            p = sub.add_parser(name, **v.parser_kwargs())
            _common(p, top=False, serve=name == "serve")
            v.add_arguments(p)
    return parser


def version() -> str:
    """``fdbroker --version``: ``fdbroker 0.1.0``."""
    from fdbroker import __version__

    return f"{PROG} {__version__}"


def _verb_index(argv: Sequence[str]) -> int:
    """Where the first operand of ``argv`` is (skipping top-level options and their values), or its length."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--run-dir", "--timeout"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return i
    return len(argv)


def find_verb(argv: Sequence[str]) -> str | None:
    """The verb in ``argv`` (skipping top-level options and their values), or None."""
    i = _verb_index(argv)
    return argv[i] if i < len(argv) and argv[i] in VERBS else None


# Operands that travel as protobuf strings (UTF-8 only), by destination → what to call them in an error.
_TEXT = {"name": "name", "names": "name", "prefix": "prefix", "selector": "selector", "label": "label"}


def _check_text(args: argparse.Namespace) -> None:
    """Refuse (invalid argument, 3) a name, prefix, selector or label that is not UTF-8 text: the shell passes
    bytes, the broker's names are ASCII. Paths (``--file``, ``--listen unix:``, ``--run-dir``) may be any bytes."""
    for dest, what in _TEXT.items():
        value = getattr(args, dest, None)
        for item in value if isinstance(value, list) else [value]:
            for text in item if isinstance(item, tuple) else (item,):
                if not isinstance(text, str):
                    continue
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    raise CliError(
                        f"invalid {what} '{shown}': not UTF-8 text (entry names are 1-255 bytes of "
                        "[A-Za-z0-9._/-], '/'-separated)",
                        exitcodes.INVALID_ARGUMENT,
                    ) from None


def _explain(err: BaseException, args: argparse.Namespace) -> str:
    """The message for a broker error: its own, except where gRPC's bare status text says nothing."""
    text = str(err)
    if text == "Deadline Exceeded":  # gRPC's deadline ran out before the broker answered
        return (
            f"no answer from the broker within {args.timeout:g}s (--timeout); it may be overloaded or "
            "stopped: check `fdbroker status`, or give a longer --timeout"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fdbroker`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args_list[: _verb_index(args_list)]:
        print(version())  # without building the list of verbs (which loads every verb)
        return exitcodes.OK.code
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
    from fdbroker.cli import connect
    from fdbroker.errors import BrokerError, Code

    try:
        _check_text(args)
        return verb.run(args, cmd)
    except BrokerError as err:
        if err.code == Code.UNAVAILABLE:
            # Unreachable may mean "not yours to reach": say so, with the permission code.
            denied = connect.explain_unreachable(args)
            if denied is not None:
                print(f"{PROG} {args.verb}: {denied}", file=sys.stderr)
                return denied.code
        print(f"{PROG} {args.verb}: {_explain(err, args)}", file=sys.stderr)
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
