"""``fdbroker status``: whether a broker serves the run directory, and its figures (asked on the conduit)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fdbroker.cli import connect
from fdbroker.cli.format import format_fields, human_duration, print_json
from fdbroker.cli.page import Verb

if TYPE_CHECKING:
    from fdbroker.client import Info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON object")


def run(args: argparse.Namespace, cmd: list[str]) -> int:
    import time

    with connect.quick(args) as client:
        info = client.info()
        run_dir = str(client.paths.run_dir)
    if args.json:
        import dataclasses

        data = dataclasses.asdict(info)
        data["run_dir"] = run_dir
        data["serving"] = True
        print_json(data)
        return 0
    caller = info.caller
    fields = [
        (
            "broker",
            f"serving, pid {info.broker_pid}, version {info.version}, up "
            f"{human_duration(time.time() - info.start_time)}",
        ),
        ("run dir", run_dir),
        ("revision", str(info.revision)),
        ("entries", f"{info.entries} of {info.max_entries} (at most {info.max_entries_per_uid} per uid)"),
        ("sessions", f"{info.sessions} (at most {info.max_sessions_per_uid} per uid)"),
        (
            "tokens",
            f"{info.pending_tokens} pending (at most {info.max_pending_tokens_per_uid} per uid), "
            f"valid {info.token_ttl:g}s",
        ),
        ("watch", f"history from revision {info.oldest_watch_revision}"),
        ("keeper", _keeper(info)),
        (
            "caller",
            f"pid {caller[0]} uid {caller[1]} gid {caller[2]}" if caller else "anonymous (no session)",
        ),
    ]
    print(format_fields(fields))
    return 0


def _keeper(info: Info) -> str:
    if info.keeper_pid is None:
        return "none (a crash loses the entries unless systemd's fd store keeps them)"
    restarts = info.keeper_restarts
    text = f"pid {info.keeper_pid}, {restarts} restart{'' if restarts == 1 else 's'}"
    return f"{text}, last: {info.keeper_last_exit}" if info.keeper_last_exit else text


STATUS = Verb(
    name="status",
    summary="broker health, version, counts and limits",
    description="Show whether the broker serves, its pid, version, uptime, run directory, revision, counts "
    "and\nlimits, its keeper (restarts, why the last broker ended), and who the broker takes the caller to be.",
    add_arguments=add_arguments,
    run=run,
    notes="  Exit 10 (with how to start one) when no broker serves the run directory.",
    example="  fdbroker status --json",
)
