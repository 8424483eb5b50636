"""The command line's duration grammar (systemd.time(7) spans), strictly: what it reads and what it refuses."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdbroker.timespan import TimespanError, format_span, parse


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30),
        ("2.5", 2.5),
        ("30s", 30),
        ("100ms", 0.1),
        ("250us", 0.00025),
        ("5min", 300),
        ("5m", 300),
        ("1h30min", 5400),
        ("1h 30min", 5400),
        ("2d", 172800),
        ("1w", 604800),
        ("1M", 2_629_800),  # a month, as systemd reads it: not a minute
        ("1y", 31_557_600),
        (" 10 s ", 10),
        (".5s", 0.5),
    ],
)
def test_reads_systemd_spans(text: str, seconds: float) -> None:
    assert parse(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("inf", "finite"),
        ("infinity", "finite"),
        ("nan", "finite"),
        ("-5s", "signed"),
        ("+5s", "signed"),
        ("1e3", "unknown unit"),
        ("5 parsecs", "unknown unit"),
        ("s", "cannot read"),
        ("1 30", "must stand alone"),
        ("1.5.2", "must stand alone"),
        ("5mo", "M is a month"),
    ],
)
def test_refuses_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(TimespanError) as ei:
        parse(text, what="--ttl")
    assert why in str(ei.value) and "--ttl" in str(ei.value)


def test_bounds() -> None:
    assert parse("24h", maximum=86400) == 86400
    with pytest.raises(TimespanError, match="at most 1d"):
        parse("24h 1s", maximum=86400)
    with pytest.raises(TimespanError, match="at least 100ms"):
        parse("10ms", minimum=0.1)


@given(st.text(max_size=30))
def test_any_text_is_a_number_of_seconds_or_a_clear_error(text: str) -> None:
    try:
        v = parse(text)
    except TimespanError as err:
        assert str(err)
    else:
        assert math.isfinite(v) and v >= 0


@given(st.integers(min_value=0, max_value=10**7))
def test_format_then_parse_round_trips(seconds: int) -> None:
    assert parse(format_span(seconds)) == pytest.approx(seconds)
