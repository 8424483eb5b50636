"""``fdbroker``: the command line. One verb = one client call; ``fdbroker VERB --help`` is its manual page.

One module per verb, holding its arguments, its manual page and its run (a :class:`~fdbroker.cli.page.Verb`):
``serve`` ``put`` ``get`` (get and exec) ``take`` ``rm`` ``stat`` ``ls`` ``status`` ``lease`` ``watch``.
Around them:

========== =============================================================================================
app        the program: find the verb, import only its module, parse, run, map errors to exit codes
page       the :class:`~fdbroker.cli.page.Verb` record and the page layout (s6 style)
exitcodes  every exit code in one table; the error mapping, the pages' and docs/cli.md's tables
format     durations and labels in; the ``ls`` table, ``stat``/``status`` fields, ``watch`` lines, JSON out
connect    the run directory and the client (gRPC, or the conduit-only one for read-only verbs)
child      CMD after ``--``: looked up first, then exec'd with descriptors or run as a child
source     what ``put`` opens or binds, and how a refused put is undone
========== =============================================================================================

Cold start matters (``fdbroker ls`` in a shell loop, ``fdbroker exec`` in front of every server start): modules
import the standard library's light parts at the top and the client, gRPC or the broker inside the functions
that need them. Nothing here imports the broker except ``serve``, which hands the process to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fdbroker.cli.app import VERBS, build_parser

__all__ = ["VERBS", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fdbroker`` console script (:func:`fdbroker.cli.app.main`); returns the exit code."""
    from fdbroker.cli.app import main

    return main(argv)


def __getattr__(name: str) -> Any:
    # Loaded on use, so that importing one part (fdbroker.cli.exitcodes, or
    # `python -m fdbroker.cli.exitcodes`) does not load the program around it.
    if name in ("VERBS", "build_parser"):
        from fdbroker.cli import app

        return getattr(app, name)
    raise AttributeError(f"module 'fdbroker.cli' has no attribute {name!r}")
