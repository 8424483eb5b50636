"""Helpers for broker tests: run Python snippets as separate client processes against a broker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

SRC = str(Path(__file__).resolve().parents[1] / "src")

if TYPE_CHECKING:
    from fdbroker import Client


def child_env(run_dir: Path | str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["FDBROKER_RUN_DIR"] = str(run_dir)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_client(
    run_dir: Path | str,
    code: str,
    *,
    timeout: float = 30,
    check: bool = True,
    pass_fds: tuple[int, ...] = (),
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh Python process with FDBROKER_RUN_DIR set; return the result."""
    cmd = [*(prefix or []), sys.executable, "-c", textwrap.dedent(code)]
    r = subprocess.run(
        cmd, env=child_env(run_dir), capture_output=True, text=True, timeout=timeout, pass_fds=pass_fds
    )
    if check and r.returncode != 0:
        raise AssertionError(f"client failed ({r.returncode}):\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def spawn_client(run_dir: Path | str, code: str, *, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    cmd = [*(prefix or []), sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.Popen(
        cmd, env=child_env(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def check_listener_and_pipe(c: Client, port: int, r: int) -> None:
    """After a restart or handover: the entry ``web/http`` (a TCP listener on ``port``) still accepts, and the write
    end held as ``pipes/audit`` still carries data to ``r``."""
    srv = c.get("web/http")
    assert isinstance(srv, socket.socket), srv
    with socket.create_connection(("127.0.0.1", port), timeout=10) as cl:
        conn, _ = srv.accept()
        cl.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
    srv.close()
    f = c.get_fd("pipes/audit")
    os.write(f.fileno(), b"still here")
    f.close()
    assert os.read(r, 100) == b"still here"
