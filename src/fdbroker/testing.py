"""fdbroker.testing: a real broker for your tests (a pytest plugin, registered through the ``pytest11`` entry
point, so installing fdbroker is enough). docs/testing.md is its manual.

The ``fdbroker_broker`` fixture starts ``fdbroker serve`` as a separate process in a fresh temporary run
directory, waits for its ``READY=1`` (sd_notify), and yields a :class:`BrokerProcess`. At teardown it checks that
the broker leaked nothing: once every client is gone, its open-descriptor count must come back to its baseline
plus the descriptors it holds. Then it stops the broker with SIGTERM and checks it exits cleanly. A client the
test left open is reported as that (which sessions are still open, and which of this process's descriptors are
connected to the broker), not as a leak of the broker's.

``fdbroker_broker_module`` and ``fdbroker_broker_session`` are the same broker shared by every test of a module
or of the whole run (started once, checked once at the end): for suites with many tests. Entries persist from
one test to the next; :meth:`BrokerProcess.clear` removes them.

Use it outside pytest with ``with BrokerProcess.start(tmpdir) as broker: ...`` or :func:`checked_broker`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest


def wait_until(
    cond: Callable[[], Any], what: str = "condition", timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll until ``cond()`` returns something truthy and return it; fail naming ``what`` after ``timeout`` seconds.

    A bounded wait for something another process does (a broker closing a descriptor, a session ending), never a
    timing assertion: on a busy machine give it room.
    """
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class BrokerProcess:
    """A broker running as a child process: ``run_dir``, ``pid``, ``uid``, and :attr:`env` (the environment for
    subprocesses that should use it)."""

    def __init__(self, proc: subprocess.Popen[bytes], run_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.log_path = log_path
        self.pid = proc.pid
        self.uid = _uid_of(proc.pid)
        self.baseline: int | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment for a subprocess that should use this broker (``fdbroker`` CLI, a program using
        ``fdbroker.Client()`` without arguments): this process's environment now, with ``FDBROKER_RUN_DIR`` set to
        :attr:`run_dir` and, if the broker runs as a uid other than root and this process's (started through a
        ``preexec`` such as ``setpriv``), that uid added to ``FDBROKER_TRUST_UID`` so the client accepts it.
        A new dict on every access: change it freely.

        ``subprocess.run(["fdbroker", "ls"], env=broker.env)``"""
        env = dict(os.environ)
        env["FDBROKER_RUN_DIR"] = str(self.run_dir)
        if self.uid not in (0, os.geteuid()):
            trusted = [u for u in env.get("FDBROKER_TRUST_UID", "").split(",") if u.strip()]
            env["FDBROKER_TRUST_UID"] = ",".join([*trusted, str(self.uid)])
        return env

    @classmethod
    def start(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        args: Sequence[str] = (),
        timeout: float = 20.0,
        env: dict[str, str] | None = None,
        preexec: Sequence[str] = (),
    ) -> BrokerProcess:
        """Start ``fdbroker serve --run-dir RUN_DIR ARGS`` and wait until it is ready.

        ``preexec`` is a command prefix (for example ``["setpriv", "--reuid=65534", ...]``).
        """
        run_dir = Path(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        notify_dir = Path(tempfile.mkdtemp(prefix="fdbroker-notify-"))
        notify_path = notify_dir / "notify.sock"
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        ns.bind(str(notify_path))
        os.chmod(notify_path, 0o666)
        os.chmod(notify_dir, 0o755)
        log_fd, log_name = tempfile.mkstemp(prefix="fdbroker-log-", suffix=".txt")
        os.close(log_fd)
        log_path = Path(log_name)
        child_env = dict(os.environ if env is None else env)
        child_env["NOTIFY_SOCKET"] = str(notify_path)
        child_env.pop("FDBROKER_RUN_DIR", None)
        cmd = [*preexec, sys.executable, "-m", "fdbroker.broker.server", "--run-dir", str(run_dir), *args]
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env, close_fds=True)
        deadline = time.monotonic() + timeout
        try:
            ns.settimeout(0.1)
            while True:
                try:
                    msg = ns.recv(4096).decode(errors="replace")
                except TimeoutError:
                    msg = ""
                if "READY=1" in msg:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
                    raise RuntimeError(
                        f"broker did not become ready (exit {proc.returncode}):\n{log_path.read_text()[-4000:]}"
                    )
        finally:
            ns.close()
            with contextlib.suppress(OSError):
                notify_path.unlink()
                notify_dir.rmdir()
        return cls(proc, run_dir, log_path)

    # -- inspection ----------------------------------------------------------------------------------------------

    def fd_count(self) -> int:
        """Open descriptors of the broker process now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def client(self, **kwargs: Any) -> Any:
        """A new :class:`fdbroker.Client` for this broker (close it, or use it with ``with``)."""
        from fdbroker.client import Client

        return Client(self.run_dir, **kwargs)

    def held(self) -> int:
        """Entries the broker holds (anonymous GetInfo)."""
        with self.client() as c:
            return int(c.info().entries)

    def settle_baseline(self) -> int:
        """Exercise a session once, let the broker settle, and record its descriptor baseline (no entries)."""
        with self.client() as c:
            c.connect()
            c.info()
        self.baseline = self._settled(lambda n: True)
        return self.baseline

    def _settled(self, ok: Any, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        last = -1
        stable = 0
        while True:
            n = self.fd_count()
            stable = stable + 1 if n == last else 0
            last = n
            if (stable >= 3 and ok(n)) or time.monotonic() > deadline:
                return n
            time.sleep(0.05)

    def sessions(self) -> int:
        """Sessions open at the broker now (anonymous GetInfo: asking opens none)."""
        with self.client() as c:
            return int(c.info().sessions)

    def connections_here(self) -> list[int]:
        """This process's descriptors connected to the broker (``SO_PEERCRED`` names its pid): a client's
        conduit or gRPC channel that is still open."""
        found = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    continue
                with socket.socket(fileno=os.dup(fd)) as s:
                    if s.family != socket.AF_UNIX:
                        continue
                    cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            except OSError:
                continue
            if struct.unpack("3i", cred)[0] == self.pid:
                found.append(fd)
        return found

    def clear(self) -> int:
        """Remove every entry (between tests sharing one broker); returns how many were removed."""
        with self.client() as c:
            names = [e.name for e in c.list()]
            for name in names:
                with contextlib.suppress(Exception):
                    c.delete(name)
        return len(names)

    def assert_no_leak(self, timeout: float = 5.0) -> None:
        """Fail unless the broker's descriptors come back to baseline + held entries (clients must be closed);
        fewer lowers the baseline (it was taken while a connection was still closing).

        When they do not, the message says whether a client is still open (sessions at the broker, and this
        process's descriptors connected to it) before it lists the broker's descriptors."""
        assert self.baseline is not None, "call settle_baseline() first"
        held = self.held()
        expected = self.baseline + held
        n = self._settled(lambda n: n <= expected, timeout)
        if n < expected:
            # Fewer than the baseline: it was taken while a connection (the baseline's own client, or an earlier
            # test's) was still closing on the broker's side. Not a leak; the lower count is the true baseline.
            self.baseline -= expected - n
            return
        if n != expected:
            fds = {}
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    fds[int(fd)] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            sessions = self.sessions()
            ours = self.connections_here()
            if sessions or ours:
                what = (
                    f"a client is still open, so the broker still holds its connection(s): {sessions} session(s) "
                    f"open at the broker (GetInfo)"
                )
                if ours:
                    what += (
                        f"; this test process (pid {os.getpid()}) is still connected to it on fd(s) "
                        f"{', '.join(map(str, ours))} — close the client (client.close(), or `with Client(...)`)"
                    )
                else:
                    what += "; none from this process: a subprocess or thread the test started still runs"
                raise AssertionError(
                    f"{what}. Not (necessarily) a broker leak: {n} descriptors open, expected baseline "
                    f"{self.baseline} + {held} held = {expected}\n"
                    + "\n".join(f"  {k}: {v}" for k, v in sorted(fds.items()))
                )
            raise AssertionError(
                f"broker descriptor leak: {n} open, expected baseline {self.baseline} + {held} held = {expected}, "
                "and no session is open\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(fds.items()))
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; return the exit status (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


@contextlib.contextmanager
def checked_broker(
    args: Sequence[str] = (), *, preexec: Sequence[str] = (), run_dir: str | os.PathLike[str] | None = None
) -> Iterator[BrokerProcess]:
    """A real broker (``fdbroker serve ARGS``) that must leak nothing and exit 0 when the block ends.

    The ``fdbroker_broker`` fixture is this with no extra options; use it directly for a broker with a policy
    file, small limits, or a ``preexec`` prefix (``prlimit``, ``setpriv``, …).
    """
    path = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="fdb-", dir="/tmp")) / "run"
    broker = BrokerProcess.start(path, args=args, preexec=preexec)  # /tmp: sun_path is 108 bytes
    try:
        broker.settle_baseline()
        yield broker
        if broker.proc.poll() is None:
            broker.assert_no_leak()
        code = broker.stop()
        assert code == 0, f"broker exited with {code}:\n{broker.log()[-4000:]}"
    finally:
        broker.stop()
        with contextlib.suppress(OSError):
            broker.log_path.unlink()


def _uid_of(pid: int) -> int:
    """The real uid of process ``pid`` (``/proc/PID/status``); this process's if it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return os.getuid()


def _broker() -> Iterator[BrokerProcess]:
    with checked_broker() as broker:
        yield broker
    assert not (broker.run_dir / "control.sock").exists(), "broker left control.sock behind"


@pytest.fixture
def fdbroker_broker() -> Iterator[BrokerProcess]:
    """A real broker in a temp run directory, for one test; checks for descriptor leaks and a clean exit at
    teardown."""
    yield from _broker()


@pytest.fixture(scope="module")
def fdbroker_broker_module() -> Iterator[BrokerProcess]:
    """One real broker shared by every test of a module (entries persist between them: see
    :meth:`BrokerProcess.clear`); checked for leaks and a clean exit after the module's last test."""
    yield from _broker()


@pytest.fixture(scope="session")
def fdbroker_broker_session() -> Iterator[BrokerProcess]:
    """One real broker shared by every test of the run (entries persist between them: see
    :meth:`BrokerProcess.clear`); checked for leaks and a clean exit at the end of the run."""
    yield from _broker()
