"""What the broker tells systemd, read from a real NOTIFY_SOCKET datagram socket (as systemd would): READY=1,
RELOADING=1 + MONOTONIC_USEC=… then READY=1 around a SIGHUP reload, WATCHDOG=1 at half WATCHDOG_USEC (and none
when WATCHDOG_PID names another process, or while the event loop is stuck), STATUS= with live counts at most once
a second, STOPPING=1.

Paces are checked by counting datagrams over a window of their kernel arrival stamps (upper bounds only: a
loaded machine sends fewer, never more); nothing waits for a deadline except to fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opsutil import Managed, fields

from fdbroker.broker.notify import Notifier, Supervision, monotonic_usec, watchdog_interval

WATCHDOG_USEC = 200_000  # pings every 0.1 s


@pytest.fixture
def short_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="fdb-ntf-", dir="/tmp"))
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _count_in_window(stamps: list[float], start: float, width: float) -> int:
    return sum(1 for t in stamps if start <= t < start + width)


def test_ready_watchdog_status_reload_and_stop(short_dir: Path) -> None:
    policy = short_dir / "policy.toml"
    policy.write_text("[limits]\nmax_entries_per_uid = 100\n")
    env = {"WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with Managed(short_dir / "run", ["--policy", str(policy)], env=env) as b:
        ready = fields(b.texts()[b.wait(lambda m: "READY=1" in m, "READY=1")])
        assert ready["MAINPID"] == str(b.pid)
        assert ready["STATUS"].startswith(f"serving {short_dir / 'run'}: 0 entries, 0 sessions")

        # WATCHDOG=1, at most one per 0.1 s: over any window of the pings' own arrival stamps, no more than the
        # window allows (a late tick only ever makes fewer).
        first = b.wait(lambda m: m == "WATCHDOG=1", "a first WATCHDOG=1")
        b.wait(lambda m: m == "WATCHDOG=1", "more pings", after=first + 6)
        pings = [t for t, m in b.messages if m == "WATCHDOG=1"]
        assert len(pings) >= 6
        interval = WATCHDOG_USEC / 2e6
        for start in pings[:-1]:
            width = pings[-1] - start
            assert _count_in_window(pings, start, width) <= width / interval + 1.5, pings

        # STATUS= follows the counts, and comes at most once a second however fast they change.
        r, w = os.pipe()
        try:
            with b.client() as c:
                c.put("s/0", w)
                b.wait(
                    lambda m: m.startswith("STATUS=") and ": 1 entries, 1 sessions" in m,
                    "STATUS with 1 entry",
                )
                end = time.monotonic() + 2.5
                i = 1
                while time.monotonic() < end:
                    c.put(f"s/{i % 50}", w, replace=True)
                    i += 1
        finally:
            os.close(r)
            os.close(w)
        b.wait(
            lambda m: m.startswith("STATUS=") and ": 50 entries, 0 sessions" in m,
            "STATUS after the client left",
        )
        statuses = [t for t, m in b.messages if m.startswith("STATUS=")]
        for start in statuses:
            width = statuses[-1] - start
            assert _count_in_window(statuses, start, width) <= width / 1.0 + 1.5, statuses

        # SIGHUP: RELOADING=1 with the monotonic time of the reload's start, then READY=1 when it is done.
        n = len(b.messages)
        before = monotonic_usec()
        b.proc.send_signal(signal.SIGHUP)
        i = b.wait(lambda m: "RELOADING=1" in m, "RELOADING=1", after=n)
        reloading = fields(b.texts()[i])
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        assert reloading["STATUS"] == f"reloading the policy from {policy}"
        j = b.wait(lambda m: "READY=1" in m, "READY=1 after the reload", after=i + 1)
        assert fields(b.texts()[j])["STATUS"].startswith("serving ")
        # A bad file: the same pair (the old policy stays in force; the broker serves throughout).
        policy.write_text("[limits\n")
        n = len(b.messages)
        b.proc.send_signal(signal.SIGHUP)
        i = b.wait(lambda m: "RELOADING=1" in m, "RELOADING=1", after=n)
        b.wait(lambda m: "READY=1" in m, "READY=1 after the failed reload", after=i + 1)
        assert "policy reload failed" in b.log()

        n = len(b.messages)
        assert b.stop() == 0
        assert any(m == "STOPPING=1" for m in b.texts()[n:])


def test_a_reload_without_a_policy_file_still_answers_reloading_and_ready(short_dir: Path) -> None:
    """Type=notify-reload waits for RELOADING=1 then READY=1 after every SIGHUP, even one with nothing to do."""
    with Managed(short_dir / "run", []) as b:
        n = len(b.messages)
        b.proc.send_signal(signal.SIGHUP)
        i = b.wait(lambda m: "RELOADING=1" in m and "MONOTONIC_USEC=" in m, "RELOADING=1", after=n)
        b.wait(lambda m: "READY=1" in m, "READY=1", after=i + 1)


def test_no_watchdog_for_another_pid_nor_without_watchdog_usec(short_dir: Path) -> None:
    for i, env in enumerate(({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}, {})):
        with Managed(short_dir / f"run{i}", [], env=env) as b:
            r, w = os.pipe()
            try:
                with b.client() as c:
                    c.put("x", w)
                # A STATUS change takes at least a second to be sent: by then pings every 0.05 s would have come.
                b.wait(lambda m: "1 entries" in m and m.startswith("STATUS="), "a STATUS update")
            finally:
                os.close(r)
                os.close(w)
            assert not [m for m in b.texts() if "WATCHDOG" in m], b.texts()


def test_watchdog_interval_reads_the_environment() -> None:
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": me}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_no_ping_when_the_loop_was_stuck_or_the_broker_unhealthy(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tick that comes more than one interval late (the loop was blocked) sends nothing; neither does one that
    finds the broker unhealthy."""
    path = short_dir / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    rx.bind(str(path))
    rx.setblocking(False)
    healthy = True

    def drain() -> list[str]:
        out = []
        while True:
            try:
                out.append(rx.recv(4096).decode())
            except BlockingIOError:
                return out

    async def run() -> tuple[list[str], list[str], list[str]]:
        nonlocal healthy
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"}  # ticks every 0.05 s
        n = Supervision(lambda: "ok", lambda: healthy, environ=env)
        n.ready()
        while not [m for m in drain() if m == "WATCHDOG=1"]:
            await asyncio.sleep(0.01)
        time.sleep(0.3)  # the loop is stuck: the tick due meanwhile runs 0.25 s late
        await asyncio.sleep(0)  # the late tick runs now
        await asyncio.sleep(0)
        stuck = drain()
        healthy = False
        await asyncio.sleep(0.3)
        sick = drain()
        healthy = True
        while not [m for m in drain() if m == "WATCHDOG=1"]:
            await asyncio.sleep(0.01)
        n.stopping()
        return stuck, sick, drain()

    with caplog.at_level(logging.WARNING, logger="fdbroker.notify"):
        try:
            stuck, sick, last = asyncio.run(run())
        finally:
            rx.close()
    assert "WATCHDOG=1" not in stuck
    assert "late; no watchdog ping" in caplog.text
    assert "WATCHDOG=1" not in sick
    assert "housekeeping has stopped" in caplog.text
    assert last == ["STOPPING=1"]


def test_a_send_told_not_to_wait_never_waits_on_a_full_queue(short_dir: Path) -> None:
    path = short_dir / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(path))
        n = Notifier(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), str(path))
        sent = []
        try:
            for _ in range(1000):  # nobody reads
                try:
                    n.send("STATUS=" + "x" * 100, wait=False)
                    sent.append(True)
                except BlockingIOError:
                    sent.append(False)
        finally:
            n.close()
        assert sent[0] and not sent[-1]  # the queue filled up; the later ones were dropped, not waited for
