"""Helpers for the operations tests: a broker started as a service manager would (its own NOTIFY_SOCKET, every
datagram kept with the time it arrived), scraping its metrics over HTTP, and reading its audit records."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fdbroker.testing import BrokerProcess

SRC = str(Path(__file__).resolve().parents[1] / "src")


SO_TIMESTAMP = 29  # Linux (asm-generic): the kernel stamps each datagram with its arrival time (a timeval)
_TIMEVAL = struct.Struct("@ll")


class Managed:
    """``fdbroker serve`` run with a NOTIFY_SOCKET we read: ``messages`` holds (arrival, text) of every
    datagram, the arrival stamped by the kernel as the datagram was queued (``SO_TIMESTAMP``, wall clock): when
    the broker sent it, however late this test reads it. stderr goes to ``log_path`` (given, so a test can point
    JOURNAL_STREAM at it)."""

    def __init__(
        self,
        run_dir: Path,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.run_dir = run_dir
        top = Path(tempfile.mkdtemp(prefix="fdb-notify-", dir="/tmp"))
        self.notify_path = top / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.notify_path))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.log_path = log_path or top / "broker.log"
        child_env = dict(os.environ)
        child_env.pop("FDBROKER_RUN_DIR", None)
        child_env["PYTHONPATH"] = SRC + os.pathsep + child_env.get("PYTHONPATH", "")
        child_env["NOTIFY_SOCKET"] = str(self.notify_path)
        child_env.update(env or {})
        cmd = [sys.executable, "-m", "fdbroker.broker.server", "--run-dir", str(run_dir), *args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=child_env)
        self.pid = self.proc.pid
        try:
            self.wait(lambda m: "READY=1" in m, "READY=1")
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        while not self._stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_TIMEVAL.size))
            except TimeoutError:
                continue
            except OSError:
                return
            stamp = time.time()
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP and len(cdata) >= _TIMEVAL.size:
                    sec, usec = _TIMEVAL.unpack(cdata[: _TIMEVAL.size])
                    stamp = sec + usec / 1e6
            with self.cond:
                self.messages.append((stamp, data.decode()))
                self.cond.notify_all()

    def wait(self, pred: Callable[[str], bool], what: str, timeout: float = 30, after: int = 0) -> int:
        """Index of the first message at or after ``after`` that satisfies ``pred`` (bounded wait)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.messages)):
                    if pred(self.messages[i][1]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {what} from the broker; got {self.messages[-5:]}\n{self.log()}")
                self.cond.wait(left)

    def texts(self) -> list[str]:
        with self.cond:
            return [m for _, m in self.messages]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: Any) -> Any:
        from fdbroker.client import Client

        return Client(self.run_dir, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stop = True
        self._thread.join()
        self.sock.close()
        return self.proc.returncode

    def __enter__(self) -> Managed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fields(message: str) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of one notification."""
    return dict(line.split("=", 1) for line in message.split("\n") if "=" in line)


def http_get(address: str | tuple[str, int], path: str = "/metrics", accept: str = "") -> tuple[str, str]:
    """One HTTP/1.1 GET over TCP (``(host, port)``) or a Unix socket (a path): (head, body)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(address)
        extra = f"Accept: {accept}\r\n" if accept else ""
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: fdbroker\r\n{extra}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


class Scrape:
    """One scrape, parsed with prometheus_client's parser: ``value(name, **labels)`` of a sample (0 if absent)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        return 0.0


def scrape(address: str | tuple[str, int]) -> Scrape:
    head, body = http_get(address)
    assert head.startswith("HTTP/1.1 200"), head
    return Scrape(body)


def audit_records(log: str) -> list[dict[str, Any]]:
    """The audit records of a ``--log-format json`` log, in order."""
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("logger") == "fdbroker.audit":
                out.append(rec)
    return out


def matching(records: list[dict[str, Any]], **want: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in want.items())]


def tcp_metrics_address(b: BrokerProcess | Managed) -> tuple[str, int]:
    """The address a broker started with ``--metrics-listen 127.0.0.1:0`` logged."""
    for line in b.log().splitlines():
        if "metrics on " in line:
            where = line.split("metrics on ", 1)[1].split(" ", 1)[0]
            host, _, port = where.rpartition(":")
            return host, int(port)
    raise AssertionError(f"no 'metrics on' line:\n{b.log()}")


def lines(text: str) -> Iterator[str]:
    yield from (line for line in text.splitlines() if line.strip())
