"""Every exit code ``fdbroker`` leaves with, in one table: the code, its meaning, the gRPC status codes that map to
it, and which verbs can return it.

Generated from :data:`TABLE`: the error → code mapping (:func:`exit_code_for`), the "exit codes" section of every
``fdbroker VERB --help`` and of ``fdbroker --help`` (:func:`help_section`), and the table in docs/cli.md
(:func:`markdown`; ``python -m fdbroker.cli.exitcodes --update docs/cli.md`` rewrites it, tests/test_cli.py
checks it). The codes are stable: scripts depend on them.

This module is loaded on every start (every page is built from it), so it stays cheap: a NamedTuple rather than
a dataclass (``dataclasses`` imports ``inspect``, ~8 ms), and no ``from __future__ import annotations`` (string
annotations make NamedTuple compile each one, ~1.5 ms).
"""

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fdbroker.errors import BrokerError

# Which verbs a row concerns (a verb lists the scopes it can return, see fdbroker.cli.page.Verb.exits).
EVERY = "every"  # every verb
BROKER = "broker"  # the verbs that talk to a broker: all but serve
SERVE = "serve"  # serve only
CMD = "cmd"  # the verbs that run a CMD given after --: get, exec, take, lease, put --ephemeral

_SCOPE_LABEL = {EVERY: "", BROKER: "", SERVE: "serve only", CMD: "with -- CMD"}


class ExitCode(NamedTuple):
    """One row of the table."""

    code: int
    meaning: str
    """What it says, in a verb's ``--help`` (one sentence, no trailing full stop; a line break where the page's
    line would pass 100 columns)."""
    grpc: tuple[str, ...] = ()
    """The gRPC status codes (names of :class:`fdbroker.errors.Code`) a broker error has for this exit code."""
    scope: str = BROKER
    detail: str = ""
    """More for docs/cli.md: local failures that share the code, hints."""
    per_verb: Mapping[str, str | None] = MappingProxyType({})
    """A verb's own wording of the meaning in its ``--help``; None leaves the row out of that verb's page."""

    def meaning_for(self, verb: str | None) -> str | None:
        """The meaning as ``verb``'s page says it (None: not on that page); ``verb`` None: the general one."""
        if verb is not None and verb in self.per_verb:
            return self.per_verb[verb]
        label = _SCOPE_LABEL[self.scope]
        return f"{label}: {self.meaning}" if label and verb is None else self.meaning


OK = ExitCode(
    0,
    "success",
    ("OK",),
    EVERY,
    per_verb={"serve": "stopped by SIGTERM or SIGINT, or handed over to a successor (--takeover)"},
)
SERVE_FAILED = ExitCode(
    1,
    "the broker could not start (message on stderr)",
    scope=SERVE,
    detail="another live broker owns the directory, an unsafe directory, a bad policy, a failed `--takeover` "
    "(the old broker keeps serving)",
)
USAGE = ExitCode(2, "usage error (bad option, missing -- CMD, bad duration)", scope=EVERY)
INVALID_ARGUMENT = ExitCode(
    3,
    "invalid argument (bad name, label, selector, address)",
    ("INVALID_ARGUMENT",),
    detail="also `put --file` through a symlink with a writable mode, `--truncate` of a non-regular file",
)
NOT_FOUND = ExitCode(
    4, "not found", ("NOT_FOUND",), detail="an entry; for `put --file`: no such file, and no `--create`"
)
ALREADY_EXISTS = ExitCode(
    5, "already exists", ("ALREADY_EXISTS",), detail="an entry; for `put --listen`: the address is in use"
)
FAILED_PRECONDITION = ExitCode(
    6,
    "failed precondition (revision mismatch, entry leased by another session)",
    ("FAILED_PRECONDITION",),
)
PERMISSION_DENIED = ExitCode(
    7,
    "permission denied / unauthenticated",
    ("PERMISSION_DENIED", "UNAUTHENTICATED"),
    detail="also `EACCES` opening a source for `put`, and a run directory or socket this user may not reach "
    "(the message names its owner, group and mode)",
)
RESOURCE_EXHAUSTED = ExitCode(
    8,
    "resource exhausted (quota, broker full)",
    ("RESOURCE_EXHAUSTED",),
    detail="also `EMFILE` opening a source for `put`",
)
DEADLINE_EXCEEDED = ExitCode(
    9, "deadline exceeded", ("DEADLINE_EXCEEDED",), detail="`--timeout`, or `lease --wait` ran out"
)
UNAVAILABLE = ExitCode(
    10,
    "broker not running or unreachable",
    ("UNAVAILABLE",),
    detail="the message says how to start one",
)
OUT_OF_RANGE = ExitCode(
    11,
    "out of range",
    ("OUT_OF_RANGE",),
    detail="`watch --start-revision` older than the broker's history",
)
ABORTED = ExitCode(12, "aborted or cancelled: nothing changed, retry", ("ABORTED", "CANCELLED"))
OTHER = ExitCode(13, "any other error")
UNTRUSTED = ExitCode(
    14,
    "refused the broker: another uid serves or controls the run directory (nothing was sent; trust\n"
    "that uid with FDBROKER_TRUST_UID if it is yours)",
    detail="`fdbroker.errors.UntrustedBroker`: its gRPC code, `UNAUTHENTICATED`, would say 7, but 14 tells "
    '"I refused the broker" from "the broker refused me"',
)
OUTCOME_UNKNOWN = ExitCode(
    15,
    "outcome unknown: the broker went away after the change was sent, and whether it happened could\n"
    "not be found out (check the entry before you try again)",
    detail="`fdbroker.errors.OutcomeUnknown` (client side, gRPC code `UNKNOWN`): a put, take or delete whose last "
    "message reached a broker that was then replaced or restarted; what could be proved done or not done was "
    "answered or retried instead",
    per_verb={verb: None for verb in ("ls", "stat", "status", "watch", "get", "exec", "lease")},
)
NOT_EXECUTABLE = ExitCode(126, "CMD is not executable", scope=CMD)
COMMAND_NOT_FOUND = ExitCode(127, "CMD not found", scope=CMD)
INTERRUPTED = ExitCode(
    130,
    "interrupted by Ctrl-C (SIGINT)",
    per_verb={"watch": None},
    detail="not `watch`, which exits 0; while CMD runs under `lease` or `put --ephemeral`, the signal goes to "
    "CMD and its status is the exit status",
)

TABLE: tuple[ExitCode, ...] = (
    OK,
    SERVE_FAILED,
    USAGE,
    INVALID_ARGUMENT,
    NOT_FOUND,
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    DEADLINE_EXCEEDED,
    UNAVAILABLE,
    OUT_OF_RANGE,
    ABORTED,
    OTHER,
    UNTRUSTED,
    OUTCOME_UNKNOWN,
    NOT_EXECUTABLE,
    COMMAND_NOT_FOUND,
    INTERRUPTED,
)

CMD_STATUS = "otherwise CMD's own exit status (128+N if signal N killed it)"
"""The verbs that run CMD pass its status through: the last line of their section, and of the docs table."""

# An error never exits 0, whatever code it carries (a BrokerError with OK is a bug: OTHER).
_BY_GRPC = {name: row.code for row in TABLE if row is not OK for name in row.grpc}


class CliError(Exception):
    """A failure found by the CLI itself (bad address, cannot bind, CMD not found, …), with the row of
    :data:`TABLE` to leave with."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.code = exit_code.code


def exit_code_for(err: "BrokerError") -> int:
    """The exit code for a broker error: :data:`UNTRUSTED` for :class:`~fdbroker.errors.UntrustedBroker`,
    :data:`OUTCOME_UNKNOWN` for :class:`~fdbroker.errors.OutcomeUnknown`, else the row listing its gRPC status code,
    else :data:`OTHER`."""
    from fdbroker.errors import OutcomeUnknown, UntrustedBroker

    if isinstance(err, UntrustedBroker):
        return UNTRUSTED.code
    if isinstance(err, OutcomeUnknown):
        return OUTCOME_UNKNOWN.code
    return _BY_GRPC.get(err.code.name, OTHER.code)


def help_section(verb: str | None = None, scopes: tuple[str, ...] = (BROKER, SERVE, CMD)) -> str:
    """The "exit codes" section of ``verb``'s ``--help``: the rows of ``scopes`` (and of :data:`EVERY`) in its
    words; ``verb`` None: the whole table for ``fdbroker --help``."""
    lines = ["exit codes:"]
    for row in TABLE:
        meaning = row.meaning_for(verb)
        if meaning is None or (row.scope != EVERY and row.scope not in scopes):
            continue
        lines.append(f"  {row.code:<3} " + meaning.replace("\n", "\n" + " " * 6))
    if CMD in scopes:
        lines.append(f"  ... {CMD_STATUS}")
    return "\n".join(lines)


def markdown() -> str:
    """The table of docs/cli.md."""
    out = ["| code | meaning | gRPC status |", "|---|---|---|"]
    for row in TABLE:
        meaning = (row.meaning_for(None) or "").replace("\n", " ")
        text = f"{meaning} — {row.detail}" if row.detail else meaning
        grpc = ", ".join(f"`{c}`" for c in row.grpc) or ("others" if row is OTHER else "—")
        out.append(f"| {row.code} | {text} | {grpc} |")
    out.append(f"| other | with -- CMD: {CMD_STATUS.removeprefix('otherwise ')} | — |")
    return "\n".join(out)


BEGIN = "<!-- exit codes: generated by `python -m fdbroker.cli.exitcodes --update docs/cli.md` -->"
END = "<!-- end of the generated exit codes -->"


def replace_in(text: str) -> str:
    """``text`` (docs/cli.md) with the part between :data:`BEGIN` and :data:`END` generated afresh."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are missing")
    return f"{head}{BEGIN}\n{markdown()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fdbroker.cli.exitcodes [--update FILE]``: print the docs table, or rewrite it in FILE."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m fdbroker.cli.exitcodes", description=main.__doc__)
    p.add_argument("--update", metavar="FILE", type=Path, help="rewrite the generated table in FILE")
    args = p.parse_args(argv)
    if args.update is None:
        print(markdown())
    else:
        args.update.write_text(replace_in(args.update.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
