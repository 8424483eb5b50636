"""``fdbroker completion bash|zsh``: a shell completion script, generated from the parser itself.

The script is made by ``shtab`` (the well-kept generator of bash and zsh completion from an ``argparse`` tree)
from the whole parser (:func:`fdbroker.cli.app.build_parser` with every verb), so it completes exactly the verbs
and options this ``fdbroker`` has: a new option needs no edit here. On top of what shtab derives, three things
it cannot know: ``--run-dir`` completes directories and ``--file``/``--policy`` files; entry names (``get``,
``exec``, ``take``, ``rm``, ``stat``, ``lease``, and the prefix of ``ls`` and ``watch``) are asked of the broker
(``fdbroker ls``, quietly nothing when none answers); and in bash the command after ``--`` completes as a
command (bash-completion's ``_command_offset`` where it is installed, else command names).

Only this verb imports shtab (and, to know ``serve``'s options, the broker's server module): no other verb's
start pays for it.
"""

from __future__ import annotations

import argparse

from fdbroker.cli.page import Verb

SHELLS = ("bash", "zsh")

# Entry names, from the broker this shell would reach (its FDBROKER_RUN_DIR or the default); nothing if none.
_ENTRIES = {
    "bash": "_fdbroker_entries",
    "zsh": "_fdbroker_entries",
}
_PREAMBLE = {
    "bash": r"""
# Entry names held by the broker (nothing when none answers); $1 is the word being completed.
_fdbroker_entries() {
  compgen -W "$(command fdbroker --timeout 2s ls 2>/dev/null | awk 'NR > 1 { print $1 }')" -- "$1"
}
""",
    "zsh": r"""
# Entry names held by the broker (nothing when none answers).
_fdbroker_entries() {
  local -a names
  names=(${(f)"$(command fdbroker --timeout 2s ls 2>/dev/null | awk 'NR > 1 { print $1 }')"})
  compadd -a names
}
""",
}

# bash: after `--` comes CMD and its arguments, completed as a command line of their own.
_BASH_CMD = r"""
_fdbroker() {
  local i
  for (( i = 1; i < COMP_CWORD; i++ )); do
    if [[ ${COMP_WORDS[i]} == -- ]]; then
      if declare -F _command_offset >/dev/null; then
        _command_offset $(( i + 1 ))
      elif (( i + 1 == COMP_CWORD )); then
        COMPREPLY=($(compgen -c -- "${COMP_WORDS[COMP_CWORD]}"))
      else
        COMPREPLY=($(compgen -f -- "${COMP_WORDS[COMP_CWORD]}"))
      fi
      return 0
    fi
  done
  _shtab_fdbroker "$@"
}
complete -o bashdefault -o default -F _fdbroker fdbroker
"""

_NAMED = {"get", "exec", "take", "rm", "stat", "lease", "ls", "watch"}  # verbs whose operand is entry names


def script(shell: str) -> str:
    """The completion script for ``shell`` (``bash`` or ``zsh``)."""
    import shtab

    from fdbroker.cli.app import build_parser

    parser = build_parser(every=True)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                _annotate(verb, sub)
        elif "--run-dir" in action.option_strings:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    text: str = shtab.complete(parser, shell=shell, preamble=_PREAMBLE[shell])
    if shell == "bash":
        text += _BASH_CMD
    return text


def _annotate(verb: str, p: argparse.ArgumentParser) -> None:
    import shtab

    # zsh lists each verb with its parser's description: the one-line summary reads better there.
    p.description = _summary(verb)
    for action in p._actions:
        if "--run-dir" in action.option_strings:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        elif {"--file", "--policy"} & set(action.option_strings):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif not action.option_strings and verb in _NAMED and action.dest in ("name", "names", "prefix"):
            action.complete = _ENTRIES  # type: ignore[attr-defined]


def _summary(verb: str) -> str:
    from fdbroker.cli.app import load

    return load(verb).summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", metavar="SHELL", choices=SHELLS, help="bash or zsh")


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    print(script(args.shell), end="")
    return 0


COMPLETION = Verb(
    name="completion",
    summary="print a shell completion script (bash, zsh)",
    description="Print a completion script for SHELL, generated from this fdbroker's own parser: verbs, options,\n"
    "option values (directories, files, choices), entry names (asked of the broker) and, in bash, the\n"
    "command after --.",
    add_arguments=add_arguments,
    run=run,
    notes="  Install it once per version (it lists this version's verbs and options):\n"
    "    fdbroker completion bash > /etc/bash_completion.d/fdbroker\n"
    "      (or, for this shell only: source <(fdbroker completion bash))\n"
    '    fdbroker completion zsh > "${fpath[1]}/_fdbroker"      (any directory on $fpath)\n'
    "  Entry names come from `fdbroker ls` run by the shell: the broker its FDBROKER_RUN_DIR names.",
    example="  fdbroker completion bash > ~/.local/share/bash-completion/completions/fdbroker",
    exits=(),
)
