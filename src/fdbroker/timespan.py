"""Durations on the command line, in systemd's time-span syntax (``systemd.time(7)``), strictly.

One or more ``<number><unit>`` terms, optionally separated by spaces, summed: ``90s``, ``1h30min``,
``1h 30min``, ``2.5s``, ``100ms``. A bare number is seconds. Units, as systemd reads them (case matters: ``M``
is a month, ``m`` a minute):

=====================================  ==========================
unit                                   length
=====================================  ==========================
``us`` ``usec`` ``µs`` ``μs``          a microsecond
``ms`` ``msec``                        a millisecond
``s`` ``sec`` ``second`` ``seconds``   a second
``m`` ``min`` ``minute`` ``minutes``   60 s
``h`` ``hr`` ``hour`` ``hours``        3600 s
``d`` ``day`` ``days``                 86,400 s
``w`` ``week`` ``weeks``               7 days
``M`` ``month`` ``months``             30.44 days (systemd's)
``y`` ``year`` ``years``               365.25 days
=====================================  ==========================

Refused, with a message that says why: an empty string, a negative or signed number, ``inf``/``infinity``/
``nan``, exponents (``1e3``), unknown units, a unit without a number, and anything over the caller's maximum.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = ["TimespanError", "arg_type", "format_span", "parse"]

_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("us", "usec", "µs", "μs"), 1e-6),
    (("ms", "msec"), 1e-3),
    (("s", "sec", "second", "seconds"), 1.0),
    (("m", "min", "minute", "minutes"), 60.0),
    (("h", "hr", "hour", "hours"), 3600.0),
    (("d", "day", "days"), 86400.0),
    (("w", "week", "weeks"), 7 * 86400.0),
    (("M", "month", "months"), 2_629_800.0),
    (("y", "year", "years"), 31_557_600.0),
):
    for _n in _names:
        _UNITS[_n] = _seconds

_TERM = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([^\d\s.]*)")


class TimespanError(ValueError):
    """A duration that is not valid; the message names the text and what is wrong."""


def parse(text: str, *, what: str = "duration", maximum: float | None = None, minimum: float = 0.0) -> float:
    """Seconds in ``text`` (see the module docstring); :class:`TimespanError` if invalid or outside
    [``minimum``, ``maximum``]."""
    s = text.strip()
    if not s:
        raise TimespanError(f"{what}: empty; give a number of seconds or a span such as 30s, 5min, 1h30min")
    low = s.lower()
    if low.lstrip("+-") in ("inf", "infinity", "nan"):
        raise TimespanError(f"{what} {text!r}: must be a finite span such as 30s, 5min or 1h")
    if s[0] in "+-":
        raise TimespanError(f"{what} {text!r}: must not be signed")
    pos = 0
    total = 0.0
    terms = 0
    bare = False
    while pos < len(s):
        m = _TERM.match(s, pos)
        if m is None or m.end() == pos:
            raise TimespanError(
                f"{what} {text!r}: cannot read {s[pos:]!r}; write it like 30s, 5min or 1h30min"
            )
        number, unit = m.group(1), m.group(2)
        if unit and unit not in _UNITS:
            hint = " (M is a month, m a minute)" if unit.lower() in ("mo", "mon") else ""
            raise TimespanError(
                f"{what} {text!r}: unknown unit {unit!r}{hint}; use us, ms, s, min, h, d, w, M (month), y"
            )
        terms += 1
        bare = bare or not unit
        if bare and terms > 1:
            raise TimespanError(
                f"{what} {text!r}: a number without a unit must stand alone (say 1min30s, not 1 30)"
            )
        total += float(number) * _UNITS[unit or "s"]
        pos = m.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    if not math.isfinite(total):
        raise TimespanError(f"{what} {text!r}: too large")
    if total < minimum:
        raise TimespanError(f"{what} {text!r}: must be at least {format_span(minimum)}")
    if maximum is not None and total > maximum:
        raise TimespanError(f"{what} {text!r}: must be at most {format_span(maximum)}")
    return total


def format_span(seconds: float) -> str:
    """A short human form: ``0``, ``250ms``, ``30s``, ``5min``, ``1h30min``, ``366d``."""
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    out = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if rest >= size:
            n = int(rest // size)
            out.append(f"{n}{unit}")
            rest -= n * size
    if rest or not out:
        out.append(f"{rest:g}s")
    return "".join(out)


def arg_type(*, minimum: float = 0.0, maximum: float | None = None) -> Callable[[str], float]:
    """An ``argparse`` ``type=``: :func:`parse` within [``minimum``, ``maximum``], its error as a usage error."""

    def parse_arg(text: str) -> float:
        try:
            return parse(text, minimum=minimum, maximum=maximum)
        except TimespanError as err:
            import argparse

            raise argparse.ArgumentTypeError(str(err)) from None

    parse_arg.__name__ = "duration"  # what argparse calls the type in its own messages
    return parse_arg
