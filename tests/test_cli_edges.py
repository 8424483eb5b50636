"""The command line without rough edges (issue 10, section 2), each edge as an operator met it: the CLI run as a
separate process against a real broker, as root and as uid 65534."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from fdbroker.testing import BrokerProcess


def cli(
    run_dir: BrokerProcess | Path | str | None,
    *args: str,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``fdbroker ARGS`` as a separate process (``run_dir`` None: FDBROKER_RUN_DIR unset); with ``prefix``
    (``secutil.unprivileged_python``) as uid 65534."""
    rd = run_dir.run_dir if isinstance(run_dir, BrokerProcess) else run_dir
    extra = dict(env or {})
    if rd is not None:
        extra["FDBROKER_RUN_DIR"] = str(rd)
    if prefix:
        cmd = [*prefix[:-1], *(f"{k}={v}" for k, v in extra.items()), prefix[-1], "-m", "fdbroker", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    full = {k: v for k, v in os.environ.items() if k != "FDBROKER_RUN_DIR"}
    full.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "fdbroker", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def refused(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The command failed with ``code``, one line on stderr naming ``words``, and no traceback."""
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


# -- durations: one strict grammar (systemd time spans), each option with its range ----------------------------


def test_durations_are_systemd_spans_with_ranges(fdbroker_broker: BrokerProcess) -> None:
    from fdbroker.cli.format import parse_duration

    assert parse_duration("1M") == 2_629_800  # a month, as systemd reads it (was: one minute)
    assert parse_duration("1min30s") == parse_duration("1m30s") == 90
    # On main: inf was accepted, then crashed (OverflowError) in --ttl and --timeout.
    for args in (
        ["put", "t", "--file", "/dev/null", "--ttl", "inf"],
        ["ls", "--timeout", "inf"],
        ["lease", "t", "--ttl", "inf", "--", "true"],
        ["lease", "t", "--ttl", "1s", "--wait", "infinity"],
        ["ls", "--timeout", "nan"],
        ["ls", "--timeout", "1e3"],
        ["ls", "--timeout=-1s"],
    ):
        refused(cli(fdbroker_broker, *args), 2, "duration")
    # Ranges: the broker's own for TTLs; --timeout 0 (was: "the broker closed the conduit") is refused.
    refused(cli(fdbroker_broker, "ls", "--timeout", "0"), 2, "at least 1ms")
    refused(cli(fdbroker_broker, "ls", "--timeout", "25h"), 2, "at most 1d")
    refused(cli(fdbroker_broker, "put", "t", "--file", "/dev/null", "--ttl", "367d"), 2, "at most 366d")
    refused(cli(fdbroker_broker, "put", "t", "--file", "/dev/null", "--ttl", "0"), 2, "at least 1ms")
    refused(cli(fdbroker_broker, "lease", "t", "--ttl", "50ms", "--", "true"), 2, "at least 100ms")
    refused(cli(fdbroker_broker, "lease", "t", "--ttl", "2d", "--", "true"), 2, "at most 1d")
    refused(cli(fdbroker_broker, "ls", "--timeout", "5mo"), 2, "M is a month")
    # 1M is a month: the entry expires in about 30 days, not in a minute.
    ok(cli(fdbroker_broker, "put", "month", "--file", "/dev/null", "--ttl", "1M"))
    st = json.loads(ok(cli(fdbroker_broker, "stat", "month", "--json")))
    assert 29 * 86400 < st["expire_time"] - st["create_time"] < 31 * 86400
    ok(cli(fdbroker_broker, "ls", "--timeout", "1h 30min"))


def test_a_broker_that_does_not_answer_is_a_deadline_not_a_closed_conduit(
    fdbroker_broker: BrokerProcess,
) -> None:
    # On main: --timeout ran out while the broker was stopped, and the CLI said "closed the conduit" (exit 10,
    # "start one"). Now: exit 9, and the message says it did not answer in time.
    os.kill(fdbroker_broker.pid, 19)  # SIGSTOP
    try:
        for args in (["ls"], ["status"], ["rm", "x"]):
            err = refused(cli(fdbroker_broker, *args, "--timeout", "300ms"), 9, "did not answer within 0.3s")
            assert "closed" not in err
    finally:
        os.kill(fdbroker_broker.pid, 18)  # SIGCONT
    ok(cli(fdbroker_broker, "status"))


def test_help_states_each_duration_range() -> None:
    for verb, words in (
        ("ls", ["1ms..24h"]),
        ("put", ["1ms..366d"]),
        ("lease", ["100ms..1d", "0..1d"]),
    ):
        out = ok(cli(None, verb, "--help"))
        for w in words:
            assert w in " ".join(out.split()), (verb, w)


@pytest.mark.parametrize("text", ["0", "0.5", "1.5h", "10 s", "2w"])
def test_any_valid_span_is_accepted(text: str) -> None:
    from fdbroker.cli.format import parse_duration

    assert parse_duration(text) >= 0
