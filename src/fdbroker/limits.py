"""The documented bounds of every time, duration, count and revision a caller sends, checked where it enters.

A value out of range is refused with :class:`fdbroker.errors.InvalidArgument` before anything else happens, so
no later step (computing an expiry, encoding a ``Timestamp``) can fail on it. The maximums sit far inside the
protobuf ``Timestamp`` range (year 9999) and ``Duration`` range (±10,000 years): an entry that expires in a year
from any clock this side of 9998 is still encodable.

=====================  ===========================  ==========================================================
value                  bounds                       where
=====================  ===========================  ==========================================================
entry TTL              0 (none) or 1 ms .. 366 days  ``PutRequest.options.ttl``
lease TTL              100 ms .. 24 h               ``LeaseRequest.ttl``
revision bounds        0 .. current revision + 1    ``WatchRequest.start_revision``
page size              0 (default 1000) .. 20,000   ``ListRequest.page_size``
page token             at most 1,024 characters     ``ListRequest.page_token``
prefetch               at most 1,024 (batch: 64)    ``GetRequest.prefetch``, ``BatchGetRequest.prefetch``
batch size             at most 10,000               ``BatchGetRequest.names``, ``BatchPutRequest.requests``
=====================  ===========================  ==========================================================

A ``Duration`` must be normalized as its own documentation requires: ``nanos`` in 0..999,999,999 for a
non-negative value (negative durations are refused everywhere).
"""

from __future__ import annotations

from typing import Any

from fdbroker.errors import InvalidArgument

NANOS = 1_000_000_000
DAY = 24 * 3600

MIN_ENTRY_TTL = 0.001
MAX_ENTRY_TTL = 366 * DAY
MIN_LEASE_TTL = 0.1
MAX_LEASE_TTL = 1 * DAY
MAX_PAGE_SIZE = 20_000
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_TOKEN = 1024
MAX_PREFETCH = 1024  # GetRequest.prefetch
MAX_BATCH_PREFETCH = 64  # BatchGetRequest.prefetch
MAX_BATCH = 10_000  # names in a BatchGet, requests in a BatchPut


def duration(
    d: Any, what: str, *, minimum: float, maximum: float, name: str = "", optional: bool = True
) -> float:
    """Seconds of a caller's ``google.protobuf.Duration``, range-checked.

    ``optional``: an unset duration (all zero) is 0.0, meaning "none"; otherwise it must lie in
    [``minimum``, ``maximum``]. Raises :class:`InvalidArgument` naming ``what`` (and the entry ``name``).
    """
    seconds, nanos = int(d.seconds), int(d.nanos)
    where = f" for {name!r}" if name else ""
    if seconds < 0 or nanos < 0:
        raise InvalidArgument(
            f"{what}{where} must not be negative (seconds={seconds}, nanos={nanos})", name=name
        )
    if nanos >= NANOS:
        raise InvalidArgument(
            f"{what}{where} is not a normalized Duration: nanos={nanos} must be below {NANOS}", name=name
        )
    if seconds > maximum:
        raise InvalidArgument(f"{what}{where} is at most {_span(maximum)}, got {seconds}s", name=name)
    total = seconds * NANOS + nanos  # exact: a float would round 366 days + 1 ns down to the maximum
    if total == 0 and optional:
        return 0.0
    value = total / NANOS
    if not round(minimum * NANOS) <= total <= round(maximum * NANOS):
        raise InvalidArgument(
            f"{what}{where} must be between {_span(minimum)} and {_span(maximum)}, got {value:g}s", name=name
        )
    return value


def page_size(size: int) -> int:
    """A ``ListRequest.page_size``: 0 means the default; above :data:`MAX_PAGE_SIZE` is refused."""
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size is at most {MAX_PAGE_SIZE}, got {size}")
    return size or DEFAULT_PAGE_SIZE


def start_revision(start: int, current: int) -> int:
    """A watch's ``start_revision``: 0 (from now) or at most the next revision to be made."""
    if start > current + 1:
        raise InvalidArgument(
            f"start_revision {start} is in the future: the broker is at revision {current}, so a watch can start "
            f"at {current + 1} at the latest (0 means from now)"
        )
    return start


def _span(seconds: float) -> str:
    if seconds >= DAY and seconds % DAY == 0:
        return f"{seconds / DAY:g} days" if seconds != DAY else "24h"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
