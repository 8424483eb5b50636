"""The broker's event loop: uvloop's when installed (``fdbroker.broker.server.loop_factory``), asyncio's with
``FDBROKER_LOOP=asyncio``. The whole suite runs on the default; these pin down what differs between the two.

uvloop (libuv) stops watching a descriptor that reports ``POLLERR`` and never calls its reader again; a conduit
peer that closes with the broker's frames unread leaves exactly that (``ECONNRESET`` pending). The broker must
still see the peer gone and end its session (``listener.reap_errored``).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import pytest

from fdbroker.testing import BrokerProcess, wait_until


def test_the_default_loop_is_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    code = "from fdbroker.broker.server import loop_factory; f = loop_factory(); print(type(f()).__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith("uvloop")
    env = dict(os.environ, FDBROKER_LOOP="asyncio")
    code = "from fdbroker.broker.server import loop_factory; print(loop_factory())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.strip() == "None"


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_a_peer_that_resets_its_conduit_ends_its_session(tmp_path, monkeypatch, loop: str) -> None:
    """Frames left unread by a peer that then closes: its socket reports an error, and the session still ends."""
    if loop == "asyncio":
        monkeypatch.setenv("FDBROKER_LOOP", "asyncio")
    with BrokerProcess.start(tmp_path / "run") as b:
        base = b.sessions()
        socks = []
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(b.run_dir / "conduit.sock"))
            ping = b"\x52\x02\x08\x01"
            s.sendall((struct.pack(">I", len(ping)) + ping) * 3)  # answered by Pongs it never reads
            s.sendall(b"\x00\x00\x00\x10\x52")  # and part of a frame
            socks.append(s)
        wait_until(lambda: b.sessions() == base + 5, what="the sessions to open")
        for s in socks:
            s.sendall(
                b"\x00\x00"
            )  # more bytes, and at once a close with the Welcome and the Pongs unread: the
            s.close()  # broker's socket is readable and reports ECONNRESET in the same event
        wait_until(lambda: b.sessions() == base, timeout=10, what="the reset sessions to end")
