"""The design's use case 2, end to end: a server restarts without refusing a single connection.

The listener lives in the broker. Version 1 runs on it through `fdbroker exec` (socket activation, fd 3); a
client connects without pause; version 2 starts on the same listener; version 1 is told to stop (SIGTERM),
finishes what it accepted and exits. The client must see every connection answered, first by v1, then by v2,
and never a refusal: the listening socket never closes, because the broker (and whichever version runs) holds it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from brokerutil import child_env

SERVER = r"""
import os, signal, socket, sys
version = sys.argv[1]
assert os.environ["LISTEN_FDS"] == "1" and int(os.environ["LISTEN_PID"]) == os.getpid()
lsock = socket.socket(fileno=3)
lsock.settimeout(0.05)
stopping = False
def stop(*_):
    global stopping
    stopping = True
signal.signal(signal.SIGTERM, stop)
print("serving", version, flush=True)
while not stopping:
    try:
        conn, _ = lsock.accept()
    except TimeoutError:
        continue
    with conn:
        conn.sendall(version.encode() + b"\n")
# Draining: stop accepting; the listener stays open in the broker and in the next version.
print("drained", version, flush=True)
"""


def _answer(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(16)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


@pytest.mark.slow
def test_restart_on_a_broker_held_listener_refuses_no_connection(fdbroker_broker, tmp_path):
    lsock = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = lsock.getsockname()[1]
    with fdbroker_broker.client() as c:
        c.put("web/http", lsock)
    lsock.close()  # from here on only the broker (and the servers it hands it to) hold the listener
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    env = child_env(fdbroker_broker.run_dir)

    def start(version: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fdbroker",
                "exec",
                "web/http",
                "--",
                sys.executable,
                str(script),
                version,
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == f"serving {version}"
        return p

    answers: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 60  # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                answers.append(_answer(port))
            except OSError as err:  # ConnectionRefusedError among them
                failures.append(f"{type(err).__name__}: {err}")

    v1 = start("v1")
    client = threading.Thread(target=load)
    client.start()
    try:
        deadline = time.monotonic() + 20
        while answers.count("v1") < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        v2 = start("v2")
        v1.send_signal(signal.SIGTERM)
        assert v1.wait(20) == 0
        assert v1.stdout is not None and "drained v1" in v1.stdout.read()
        seen_after = len(answers)
        while len(answers) < seen_after + 50 and time.monotonic() < deadline + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        client.join(70)
    try:
        assert not failures, (
            f"{len(failures)} of {len(answers) + len(failures)} connections failed: {failures[:3]}"
        )
        assert answers.count("v1") >= 50 and answers.count("v2") >= 50, (
            answers.count("v1"),
            answers.count("v2"),
        )
        # v1 is gone: everything after its exit was answered by v2
        assert set(answers[seen_after:]) == {"v2"}
    finally:
        v2.send_signal(signal.SIGTERM)
        assert v2.wait(20) == 0
        if v2.stdout is not None:
            v2.stdout.close()
        if v1.stdout is not None:
            v1.stdout.close()
    # the listener is still held by the broker: a third version could start right away
    with fdbroker_broker.client() as c:
        assert c.stat("web/http").listening
        c.delete("web/http")
    # Once the broker lets go of it, connections are refused (the check above could fail). The broker closes a
    # deleted entry's descriptor on its closer thread, right after Delete answers: a connection in that instant
    # lands in the backlog and is reset by the close; after it, refused.
    deadline = time.monotonic() + 10
    while True:
        try:
            _answer(port)
        except ConnectionRefusedError:
            break
        except ConnectionResetError:
            assert time.monotonic() < deadline, "the deleted listener was never closed"
            continue
        raise AssertionError("a connection was answered after the listener was deleted")
    assert os.path.exists(str(fdbroker_broker.run_dir / "control.sock"))
