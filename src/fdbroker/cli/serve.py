"""``fdbroker serve``: hand this process to the broker (or, with ``--keeper``, to the keeper that runs it).

The only verb that loads broker code, and only when it is the verb being parsed, run or shown (its options are
the server's own): the other verbs never import the broker, gRPC's server side or asyncio. ``serve --keeper``
loads only the keeper, before any parser is built.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Protocol, cast

from fdbroker.cli import exitcodes
from fdbroker.cli.page import Verb


class _Server(Protocol):
    """What ``serve`` uses of the broker's server module."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def options_from_args(self, args: argparse.Namespace, run_dir: Path) -> Any: ...

    def run(self, opts: Any, log_level: str = ...) -> int: ...


def _server() -> _Server:
    # TODO(merge): the broker package move renames fdbroker.server to fdbroker.broker.server; once both have
    # landed, import only the new name and drop this fallback.
    try:
        module = importlib.import_module("fdbroker.broker.server")
    except ModuleNotFoundError as err:
        if err.name not in ("fdbroker.broker", "fdbroker.broker.server"):
            raise  # something the server imports is missing: say so, do not hide it
        module = importlib.import_module("fdbroker.server")
    return cast(_Server, module)


def keeper(argv: list[str]) -> int | None:
    """``fdbroker [OPTIONS] serve --keeper [OPTIONS]``: become the keeper, which runs the same command without
    ``--keeper`` and with ``--fdstore`` as its child (``--takeover`` only the first time). Decided on the raw
    command line, before the parser (which would load the broker and gRPC into the keeper); the child parses and
    checks every option itself. None for any other ``serve``."""
    if "--keeper" not in argv:
        return None
    child = [sys.executable, "-m", "fdbroker", *(a for a in argv if a != "--keeper")]
    if "--fdstore" not in child:
        child.append("--fdstore")
    main = importlib.import_module("fdbroker.broker.survival.keeper").main
    return int(main(child, once=["--takeover"]))  # a restarted broker finds its entries at the keeper


def add_arguments(p: argparse.ArgumentParser) -> None:
    _server().add_arguments(p)


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    from fdbroker.rundir import resolve_run_dir

    server = _server()
    return server.run(server.options_from_args(args, resolve_run_dir(args.run_dir)), args.log_level)


SERVE = Verb(
    name="serve",
    summary="run the broker in the foreground",
    description="Run the broker in the foreground: gRPC control plane on DIR/control.sock, the descriptor "
    "conduit on\nDIR/conduit.sock. Tells systemd READY=1 through $NOTIFY_SOCKET once both accept. SIGTERM or "
    "SIGINT\nstop it (every held descriptor is closed); SIGHUP reloads the policy file.",
    add_arguments=add_arguments,
    run=run,
    notes="  One broker per run directory: a second one refuses to start (exit 1) while the first lives;\n"
    "  sockets left by a dead one are removed. --takeover instead receives every entry of the broker\n"
    "  serving the directory, which then exits 0 (docs/survival.md).\n"
    "  --keeper: this process becomes a small keeper (no gRPC) that runs the broker as its child and\n"
    "  starts it again, with every entry, after a crash, OOM kill or kill -9 (back-off from 0.1 s to\n"
    "  30 s); SIGTERM/SIGINT stop both, SIGHUP is passed on, SIGUSR2 restarts the broker at once.\n"
    "  The keeper exits with the broker's status when it stops on purpose, and 2 if the broker\n"
    "  exits 2 (usage) before it is ready.",
    example="  fdbroker serve --run-dir /run/fdbroker --policy /etc/fdbroker/policy.toml",
    exits=(exitcodes.SERVE,),
    early=keeper,
)
