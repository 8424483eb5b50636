"""What a verb is to the command line: its arguments, its manual page and its run function, in one record.

Each verb module (``fdbroker.cli.put`` …) defines its :class:`Verb`; :mod:`fdbroker.cli.app` builds the parser
from the one being run. ``fdbroker VERB --help`` reads like an s6 page: the interface (usage and what it does),
options, exit codes (from :mod:`fdbroker.cli.exitcodes`), notes, an example, the environment.

Loaded on every start: a NamedTuple with evaluated annotations, for the reasons given in ``exitcodes``.
"""

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple

from fdbroker.cli import exitcodes

ENVIRONMENT = """\
environment:
  FDBROKER_RUN_DIR    run directory (overridden by --run-dir)
  FDBROKER_TRUST_UID  uids or user names (comma-separated) that may serve the run directory
                      besides root and yourself, e.g. the broker's own system user"""


class Verb(NamedTuple):
    """One ``fdbroker`` verb."""

    name: str
    summary: str
    """One line, for the list of verbs in ``fdbroker --help``."""
    description: str
    """What it does: the page's first paragraph."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Declares its options and operands (the common ones, ``--run-dir`` and ``--timeout``, are added for it)."""
    run: Callable[[argparse.Namespace, list[str]], int]
    """Does it: the parsed arguments and the CMD given after ``--`` → the exit code."""
    usage: str | None = None
    """The interface line, where argparse's own would not show how the options go together."""
    notes: str = ""
    example: str = ""
    takes_cmd: bool = False
    """Whether ``-- CMD [ARGS]`` follows the options (split off before parsing)."""
    exits: tuple[str, ...] = (exitcodes.BROKER,)
    """The scopes of :mod:`fdbroker.cli.exitcodes` whose codes this verb can return."""
    early: Callable[[list[str]], int | None] | None = None
    """Looks at the whole command line before any parser is built (``serve --keeper`` must not load what the
    parser would): an exit code ends the program there, None goes on as usual."""

    def parser_kwargs(self) -> dict[str, Any]:
        """The manual page, as :meth:`argparse.ArgumentParser.add_parser` arguments."""
        sections = [exitcodes.help_section(self.name, self.exits)]
        if self.notes:
            sections.append("notes:\n" + self.notes)
        if self.example:
            sections.append("example:\n" + self.example)
        sections.append(ENVIRONMENT)
        return {
            "help": self.summary,
            "usage": self.usage,
            "description": self.description,
            "epilog": "\n\n".join(sections),
            "formatter_class": argparse.RawDescriptionHelpFormatter,
        }
