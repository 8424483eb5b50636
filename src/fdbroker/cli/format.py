"""Values in and out of the command line: durations and labels as typed, entries and events as printed (the
``ls`` table, the ``stat`` and ``status`` fields, ``watch`` lines, JSON).

Nothing here talks to the broker; the result types come from :mod:`fdbroker.client` (for type checking only).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fdbroker.client import Entry, Event

# -- typed in --------------------------------------------------------------------------------------------------

DAY = 86400.0

TIMEOUT_RANGE = (0.001, DAY)
"""``--timeout``: 1 ms .. 24 h (0 would give up before the broker could answer)."""


def duration(minimum: float, maximum: float | None) -> Callable[[str], float]:
    """An argparse type: a duration in systemd's time-span syntax (:mod:`fdbroker.timespan`: ``500ms``, ``30s``,
    ``5min``, ``1h30min``, plain seconds; ``M`` is a month) within [``minimum``, ``maximum``] → seconds.

    ``inf``, ``nan``, signs and exponents are refused, so no later step (a deadline, a protobuf ``Duration``)
    can fail on the value. :mod:`fdbroker.timespan` is imported only when a duration is actually given.
    """

    def parse(text: str) -> float:
        from fdbroker.timespan import arg_type

        return arg_type(minimum=minimum, maximum=maximum)(text)

    parse.__name__ = "duration"  # what argparse calls the type in its own messages
    return parse


def span_range(minimum: float, maximum: float) -> str:
    """``1ms..24h`` (for option help): the range a :func:`duration` accepts, in its own syntax."""
    from fdbroker.timespan import format_span

    return f"{format_span(minimum)}..{format_span(maximum)}"


def parse_duration(text: str) -> float:
    """Any non-negative duration (:func:`duration` without a maximum) → seconds."""
    return duration(0.0, None)(text)


REVISION_MAX = (1 << 63) - 1
"""Revisions (``--if-revision``, ``--start-revision``) are protobuf ``uint64``; the broker's are far below this."""


def integer(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer in [``minimum``, ``maximum``] (out of range is a usage error, not a
    traceback when the value reaches a protobuf field or a system call)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is outside {minimum}..{maximum}")
        return value

    parse.__name__ = "integer"
    return parse


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` → ``(KEY, VALUE)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: expected KEY=VALUE")
    return key, value


# -- printed out -----------------------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """``3s``, ``5m``, ``2h``, ``4d`` (truncated to the largest unit)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def entry_detail(e: Entry) -> str:
    """The DETAIL column: addresses for sockets, path and access for files, else the broker's summary."""
    if e.local_address or e.peer_address:
        return f"{e.local_address} -> {e.peer_address}" if e.peer_address else e.local_address
    if e.path:
        mode = e.access_mode + ("+append" if "O_APPEND" in e.flags else "")
        return f"{e.path} ({mode})" if mode else e.path
    return e.summary


def lease_cell(e: Entry) -> str:
    """The LEASE column: ``-``, ``exclusive epoch E pid P`` or ``shared xN epoch E``, plus ``+W waiting``."""
    lease = e.lease
    if not lease.mode:
        return "-"
    if lease.mode == "exclusive" and lease.holders:
        cell = f"exclusive epoch {lease.epoch} pid {lease.holders[0][1]}"
    else:
        cell = f"{lease.mode} x{len(lease.holders)} epoch {lease.epoch}"
    return cell + (f" +{lease.waiters} waiting" if lease.waiters else "")


def format_table(entries: Sequence[Entry], now: float) -> str:
    """``ls``: an aligned table, NAME KIND DETAIL OWNER AGE EXPIRES LEASE."""
    rows = [("NAME", "KIND", "DETAIL", "OWNER", "AGE", "EXPIRES", "LEASE")]
    for e in entries:
        rows.append(
            (
                e.name,
                e.kind,
                entry_detail(e) or "-",
                f"{_user(e.owner_uid)}/{e.owner_pid}",
                human_duration(now - e.create_time),
                human_duration(e.expire_time - now) if e.expire_time is not None else "-",
                lease_cell(e),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows
    )


def format_fields(fields: Sequence[tuple[str, str]]) -> str:
    """``stat`` and ``status``: one ``key:     value`` line per field, the values aligned."""
    return "\n".join(f"{k + ':':<10} {v}" for k, v in fields)


def format_stat(e: Entry, now: float) -> str:
    """``stat``: every field of an entry that is set."""
    fields = [
        ("name", e.name),
        ("kind", e.kind),
        ("summary", e.summary),
    ]
    if e.family:
        fields.append(("family", e.family))
    if e.local_address:
        fields.append(("local", e.local_address))
    if e.peer_address:
        fields.append(("peer", e.peer_address))
    if e.path:
        fields.append(("path", e.path))
    if e.access_mode:
        fields.append(("access", e.access_mode))
    if e.flags:
        fields.append(("flags", " ".join(e.flags)))
    fields += [
        ("owner", f"{_user(e.owner_uid)} (uid {e.owner_uid}, gid {e.owner_gid}, pid {e.owner_pid})"),
        ("labels", ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())) or "-"),
        ("age", human_duration(now - e.create_time)),
        ("revision", f"{e.revision} (created at {e.create_revision})"),
        ("expires", f"in {human_duration(e.expire_time - now)}" if e.expire_time is not None else "never"),
        ("ephemeral", "yes" if e.ephemeral else "no"),
        ("lease", lease_cell(e)),
    ]
    return format_fields(fields)


def format_event(ev: Event) -> str:
    """``watch``: ``REVISION TYPE NAME [KIND DETAIL] [epoch=N] [reason=R]``."""
    parts = [str(ev.revision), ev.type, ev.name]
    if ev.type == "put":
        parts += [ev.entry.kind, entry_detail(ev.entry) or "-"]
    if ev.type.startswith("lease"):
        parts.append(f"epoch={ev.epoch}")
    if ev.reason:
        parts.append(f"reason={ev.reason}")
    return " ".join(parts)


def describe_received(name: str, fd: int) -> str:
    """What ``get`` or ``take`` without CMD received: ``NAME: SUMMARY`` (the kernel's view of ``fd``)."""
    from fdbroker.fdinfo import describe

    return f"{name}: {describe(fd).summary}"


def received_json(name: str, fd: int) -> dict[str, object]:
    """``get`` or ``take`` without CMD, ``--json``: the entry name and the kernel's view of ``fd`` (``kind``,
    ``summary``, and every field of the ``DescriptorInfo`` under ``descriptor``)."""
    from google.protobuf.json_format import MessageToDict

    from fdbroker.fdinfo import describe, kind_name

    info = describe(fd)
    return {
        "name": name,
        "kind": kind_name(info.kind),
        "summary": info.summary,
        "descriptor": MessageToDict(info, preserving_proto_field_name=True),
    }


def print_json(obj: object) -> None:
    """``--json`` of every verb that prints: indented, keys in their order, flushed (CMD may print next)."""
    import json

    print(json.dumps(obj, indent=2, sort_keys=False), flush=True)


def add_json_argument(p: argparse.ArgumentParser, what: str) -> None:
    """``--json``: print ``what`` as JSON instead of text."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")
