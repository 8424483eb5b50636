"""Shared test fixtures.

``no_fd_leak`` (autouse) fails any test that leaves a descriptor open in the test process. A test that must
keep
one open on purpose can opt out with ``@pytest.mark.fd_leak_ok``.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

# Shared 2-core machines: example generation and each example's run can stall for seconds when the other core is
# busy. No deadline and no too-slow health check (they judge the machine, not the code); the number of examples,
# and so the properties' strength, is unchanged.
settings.register_profile("shared-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared-machine")


def open_fds() -> dict[int, str]:
    """The descriptors open in this process now, with what they point to.

    The directory descriptor ``listdir`` itself uses shows up in the listing but is closed by the time we
    ``readlink`` it, so it drops out (as does anything closed meanwhile).
    """
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fd_leak_ok: do not fail this test for descriptors left open")


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test if it leaves descriptors open that were not open before it.

    Objects that close their descriptor when collected (sockets, files) get a ``gc.collect()`` and a short
    grace
    (threads and child processes winding down) before the check.
    """
    if request.node.get_closest_marker("fd_leak_ok"):
        yield
        return
    gc.collect()
    before = open_fds()
    yield
    leaked: dict[int, str] = {}
    for _ in range(50):
        gc.collect()
        now = open_fds()
        leaked = {fd: target for fd, target in now.items() if before.get(fd) != target}
        if not leaked:
            return
        time.sleep(0.02)
    pytest.fail(f"test leaked descriptors: {leaked}", pytrace=False)


PEER = os.path.join(os.path.dirname(__file__), "helpers", "conduit_peer.py")


class Peer:
    """A conduit peer in another process (tests/helpers/conduit_peer.py) and our end of its socket."""

    def __init__(self, command: str, *args: str) -> None:
        import socket
        import subprocess
        import sys

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        try:
            self.proc = subprocess.Popen(
                [sys.executable, PEER, str(theirs.fileno()), command, *args],
                pass_fds=[theirs.fileno()],
                stdout=subprocess.PIPE,
                text=True,
            )
        finally:
            theirs.close()

    def line(self) -> dict[str, object]:
        """The next JSON report of the peer."""
        import json

        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        assert text, f"peer exited without a report (rc={self.proc.poll()})"
        result: dict[str, object] = json.loads(text)
        return result

    def finish(self) -> int:
        """Closes our end, waits for the peer, returns its exit code."""
        self.sock.close()
        rc = self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc


@pytest.fixture
def peer() -> Iterator[Callable[..., Peer]]:
    """Starts conduit peers: ``p = peer("recv", "pipe-w")``; every one started is reaped afterwards."""
    started: list[Peer] = []

    def start(command: str, *args: str) -> Peer:
        p = Peer(command, *args)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.finish()
