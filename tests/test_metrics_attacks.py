"""The metrics endpoint attacked by a real local user: TCP on 127.0.0.1 is open to every uid on the host by
design, so uid 65534 tries to lock the operator's scraper out (slowloris: every connection slot held with a
request that never ends), to overflow the request buffer, and to smuggle a second request."""

from __future__ import annotations

import socket
import subprocess

import pytest
from opsutil import http_get, tcp_metrics_address
from secutil import custom_broker, unprivileged_python

from fdbroker.broker.metrics import MAX_CONNECTIONS, MAX_REQUEST

_SLOWLORIS = """
import socket, sys
held = []
for _ in range(N):
    s = socket.create_connection(("HOST", PORT))
    s.sendall(b"GET /metrics HTTP/1.1\\r\\nX-Slow: ")  # a request head that never ends
    held.append(s)
print("holding", flush=True)
sys.stdin.readline()  # until the test is done
gone = 0
for s in held:
    s.setblocking(False)
    try:
        gone += s.recv(1) == b""
    except BlockingIOError:
        pass
    except ConnectionError:
        gone += 1
print("evicted", gone, flush=True)
"""


def test_slowloris_connections_cannot_lock_the_scraper_out() -> None:
    """uid 65534 fills every connection slot with a never-ending request head; the operator's scrape is still
    answered: a newcomer at the cap evicts the oldest connection that has not sent its request."""
    prefix = unprivileged_python()
    if prefix is None:
        pytest.skip("cannot run Python as uid 65534 here")
    with custom_broker(["--metrics-listen", "127.0.0.1:0"]) as b:
        host, port = tcp_metrics_address(b)
        code = _SLOWLORIS.replace("HOST", host).replace("PORT", str(port)).replace("N", str(MAX_CONNECTIONS))
        attacker = subprocess.Popen(
            [*prefix, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )
        try:
            assert attacker.stdout is not None and attacker.stdin is not None
            assert attacker.stdout.readline().strip() == "holding"
            # Its connections were accepted before ours (the kernel's queue is FIFO, so is the broker's loop).
            head, body = http_get((host, port))
            assert head.startswith("HTTP/1.1 200"), head
            assert "fdbroker_sessions" in body
            head, _ = http_get((host, port))
            assert head.startswith("HTTP/1.1 200"), head
            attacker.stdin.write("done\n")
            attacker.stdin.flush()
            out = attacker.stdout.readline().split()
            assert out[0] == "evicted" and int(out[1]) >= 1, out  # (all of them, if REQUEST_TIMEOUT passed)
        finally:
            attacker.kill()
            attacker.wait()


def test_oversized_heads_and_smuggled_requests_are_refused() -> None:
    with custom_broker(["--metrics-listen", "127.0.0.1:0"]) as b:
        addr = tcp_metrics_address(b)
        with socket.create_connection(addr) as s:
            s.settimeout(10)
            s.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * (2 * MAX_REQUEST))
            try:
                assert s.recv(100) == b""  # closed without an answer
            except ConnectionResetError:
                pass
        with socket.create_connection(addr) as s:
            s.settimeout(10)
            # A body and a second request behind the first: one answer, then the connection closes.
            s.sendall(
                b"POST /metrics HTTP/1.1\r\nContent-Length: 40\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 404")
        for path in ("/metrics/../x", "//metrics", "/%6detrics", "*"):
            assert http_get(addr, path)[0].startswith("HTTP/1.1 404"), path
        assert http_get(addr)[0].startswith("HTTP/1.1 200")
