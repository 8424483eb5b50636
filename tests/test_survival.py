"""Survival (design.md): a broker upgrade or crash loses no held descriptor.

* Live handover: ``fdbroker serve --takeover`` against a real running broker: every entry moves with its metadata,
  sessions end (leases released with reason HANDOVER, ephemeral entries removed), revisions and fencing epochs keep
  increasing, held descriptors still work; a successor killed mid-transfer (a real process, SIGKILL) leaves the old
  broker serving with every entry and no leaked descriptor.
* Crash survival through systemd's fd store, with a real protocol emulation: a test "service manager" binds
  ``$NOTIFY_SOCKET``, receives ``FDSTORE=1``/``FDSTOREREMOVE=1`` datagrams with their descriptors, SIGKILLs the
  broker and starts a new one with the stored descriptors as fds 3.. and ``LISTEN_FDS``/``LISTEN_PID``/
  ``LISTEN_FDNAMES`` exactly as systemd does (``python -m fdbroker.activation`` sets ``LISTEN_PID`` to its own pid,
  which the broker keeps across ``exec``).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokerutil import check_listener_and_pipe, child_env

from fdbroker.broker.rundir import HANDOVER_SOCKET
from fdbroker.testing import BrokerProcess

# -- helpers -----------------------------------------------------------------------------------------------------


@pytest.fixture
def run_dir() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="fdb-surv-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        yield top / "run"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def settle_with_entries(broker: BrokerProcess) -> None:
    """Record the leak baseline of a broker that started with entries: settled count minus what it holds."""
    with broker.client() as c:
        c.connect()
        c.info()
    n = broker._settled(lambda n: True)
    broker.baseline = n - broker.held()


def finish(broker: BrokerProcess) -> None:
    """Leak check, clean SIGTERM stop (exit 0), log file removed."""
    try:
        broker.assert_no_leak()
        code = broker.stop()
        assert code == 0, f"broker exited with {code}:\n{broker.log()[-4000:]}"
    finally:
        broker.stop()
        with contextlib.suppress(OSError):
            broker.log_path.unlink()


def raw_entries(broker: BrokerProcess) -> dict[str, object]:
    with broker.client() as c:
        return {e.name: e.raw for e in c.list()}


def without_lease_and_revision(m: object) -> object:
    from fdbroker.v1 import broker_pb2 as pb

    assert isinstance(m, pb.Entry)
    c = pb.Entry()
    c.CopyFrom(m)
    c.ClearField("lease")
    c.revision = 0
    return c


def write_limits_policy(path: Path, n: int) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            [limits]
            max_entries_per_uid = {n + 100}
            max_pending_tokens_per_uid = {n + 100}
            """
        )
    )
    return path


def put_pipes(broker: BrokerProcess, n: int, prefix: str = "p/") -> tuple[int, int]:
    """Deposit the write end of one pipe ``n`` times (the broker holds ``n`` descriptors); returns the pipe."""
    r, w = os.pipe()
    with broker.client() as c:
        for i in range(0, n, 5000):
            c.put_many({f"{prefix}{j:05d}": w for j in range(i, min(n, i + 5000))})
    return r, w


SERVE = [sys.executable, "-m", "fdbroker.broker.server"]

TAKEOVER_CHILD = """
import os, signal, sys
from pathlib import Path
from fdbroker.broker.core import Broker, BrokerConfig
from fdbroker.broker.policy import Policy
from fdbroker.broker.survival.carry import HandoverError
from fdbroker.broker.survival.receiving import take_over

stop_at = int(sys.argv[2])
def progress(n, total):
    print(n, total, flush=True)
    if n >= min(stop_at, total):
        os.kill(os.getpid(), signal.SIGKILL)  # a successor killed mid-transfer, for real

try:
    broker = Broker(BrokerConfig(capacity=100000), Policy.default(broker_uid=os.getuid()))
    take_over(Path(sys.argv[1]), broker, timeout=30, on_progress=progress)
except HandoverError as err:
    print("ERROR", err.message, flush=True)
    sys.exit(3)
print("COMPLETED", flush=True)
"""


# -- live handover -----------------------------------------------------------------------------------------------


def test_takeover_moves_every_entry_with_its_metadata(run_dir: Path) -> None:
    old = BrokerProcess.start(run_dir)
    new: BrokerProcess | None = None
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    r, w = os.pipe()
    holder = None
    try:
        old.settle_baseline()
        assert (run_dir / HANDOVER_SOCKET).stat().st_mode & 0o777 == 0o600
        with old.client() as c:
            c.put("web/http", lsock, labels={"tier": "web", "team": "edge"})
            c.put("pipes/audit", w, ttl=600)
            c.put("locks/db", w)
            with c.lease("locks/db", ttl=30, keepalive=False) as h1:
                epoch1 = h1.epoch
        lsock.close()
        os.close(w)
        w = -1
        old.assert_no_leak()
        # A live session with an ephemeral entry and an exclusive lease: sessions cannot move, so both end.
        holder = old.client()
        holder.put("tmp/mine", r, ephemeral=True)
        lease = holder.lease("locks/db", ttl=60, keepalive=False)
        assert lease.epoch > epoch1
        before = raw_entries(old)
        with old.client() as c:
            rev_before = c.info().revision

        new = BrokerProcess.start(run_dir, args=["--takeover"])
        assert old.proc.wait(timeout=30) == 0, old.log()[-3000:]
        assert "handed over and stopped" in old.log()
        settle_with_entries(new)

        after = raw_entries(new)
        assert set(after) == {"web/http", "pipes/audit", "locks/db"}  # tmp/mine was ephemeral
        for name in after:
            assert without_lease_and_revision(after[name]) == without_lease_and_revision(before[name]), name
        assert after["web/http"].revision == before["web/http"].revision  # type: ignore[attr-defined]
        assert after["web/http"].labels == {"tier": "web", "team": "edge"}  # type: ignore[attr-defined]
        assert after["pipes/audit"].HasField("expire_time")  # type: ignore[attr-defined]
        assert after["locks/db"].lease.epoch == lease.epoch  # type: ignore[attr-defined]
        assert not after["locks/db"].lease.holders  # type: ignore[attr-defined]

        with new.client() as c:
            # The events of the ended sessions follow the old broker's last revision.
            with c.watch(start_revision=rev_before + 1) as wt:
                evs = [next(wt), next(wt)]
            got = {(e.type, e.name, e.reason) for e in evs}
            assert got == {
                ("lease_released", "locks/db", "handover"),
                ("delete", "tmp/mine", "session_ended"),
            }
            assert all(e.revision > rev_before for e in evs)
            assert next(e for e in evs if e.type == "lease_released").lease_id == lease.lease_id
            # Fencing epochs keep increasing across the handover.
            with c.lease("locks/db", ttl=30, keepalive=False) as h2:
                assert h2.epoch > lease.epoch
            check_listener_and_pipe(c, port, r)
            assert c.info().revision > rev_before
        # The old session is gone: its client learns it at the next call.
        holder.close()
        holder = None
        lease.fd.close()
        finish(new)
        new = None
    finally:
        if holder is not None:
            holder.close()
        if w >= 0:
            os.close(w)
        os.close(r)
        lsock.close()
        for b in (old, new):
            if b is not None:
                b.stop()
                with contextlib.suppress(OSError):
                    b.log_path.unlink()


@pytest.mark.parametrize("stop_at", [253, 10**9], ids=["after-first-batch", "after-all-before-ack"])
def test_successor_killed_mid_transfer_leaves_old_broker_serving(run_dir: Path, stop_at: int) -> None:
    n = 600  # three batches: 253 + 253 + 94
    old = BrokerProcess.start(run_dir)
    new: BrokerProcess | None = None
    r = w = -1
    try:
        old.settle_baseline()
        r, w = put_pipes(old, n)
        before = raw_entries(old)
        child = subprocess.run(
            [sys.executable, "-c", TAKEOVER_CHILD, str(run_dir), str(stop_at)],
            env=child_env(run_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
        assert child.stdout.split("\n")[0].split() == ["253", str(n)]
        assert "COMPLETED" not in child.stdout
        # The old broker noticed, said so, and serves every entry as before.
        # (an answered RPC means the handover handler, which blocks the broker's loop, has finished)
        assert raw_entries(old) == before
        assert re.search(r"handover to pid \d+ failed .*still serving with all 600 entries", old.log())
        assert old.held() == n
        old.assert_no_leak()
        with old.client() as c:
            f = c.get_fd("p/00007")
            os.write(f.fileno(), b"x")
            f.close()
        assert os.read(r, 10) == b"x"
        # A real successor then takes over.
        new = BrokerProcess.start(run_dir, args=["--takeover"])
        assert old.proc.wait(timeout=30) == 0
        settle_with_entries(new)
        assert new.held() == n
        finish(new)
        new = None
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        for b in (old, new):
            if b is not None:
                b.stop()
                with contextlib.suppress(OSError):
                    b.log_path.unlink()


def test_successor_that_cannot_hold_the_entries_exits_nonzero(run_dir: Path) -> None:
    old = BrokerProcess.start(run_dir)
    r = w = -1
    try:
        old.settle_baseline()
        r, w = put_pipes(old, 40)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        reserve = nofile - 20  # capacity 20 < 40 entries
        p = subprocess.run(
            [*SERVE, "--run-dir", str(run_dir), "--takeover", "--reserve-fds", str(reserve)],
            env=child_env(run_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 1, p.stderr
        assert "holds 40 entries but this one can hold 20" in p.stderr
        assert old.held() == 40
        assert re.search(r"handover to pid \d+ failed", old.log())
        finish(old)
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        old.stop()


def test_takeover_without_a_running_broker_fails_clearly(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    p = subprocess.run(
        [*SERVE, "--run-dir", str(run_dir), "--takeover"],
        env=child_env(run_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert "no broker answers on" in p.stderr and "start without --takeover" in p.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_handover_refuses_another_uid(run_dir: Path) -> None:
    old = BrokerProcess.start(run_dir)
    try:
        old.settle_baseline()
        r, w = put_pipes(old, 3)
        os.close(r)
        os.close(w)
        hs = run_dir / HANDOVER_SOCKET
        os.chmod(run_dir.parent, 0o755)  # mkdtemp made it 0700
        code = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print(s.recv(10))"
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        # The socket's mode keeps other users out ...
        p = subprocess.run([*nobody, sys.executable, "-c", code, str(hs)], capture_output=True, text=True)
        assert p.returncode != 0 and "PermissionError" in p.stderr
        # ... and with the mode opened, SO_PEERCRED does: the broker hangs up without sending anything.
        os.chmod(hs, 0o666)
        p = subprocess.run([*nobody, sys.executable, "-c", code, str(hs)], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.strip() == "b''", p.stderr
        assert "handover: refused pid" in old.log()
        assert old.held() == 3
        finish(old)
    finally:
        old.stop()


@pytest.mark.slow
@pytest.mark.parametrize("n", [1000, 10_000])
def test_handover_time(run_dir: Path, n: int, tmp_path: Path) -> None:
    """Bench-like: prints how long the old broker is frozen and how long the successor needs until it serves."""
    policy = write_limits_policy(tmp_path / "policy.toml", n)
    old = BrokerProcess.start(run_dir, args=["--policy", str(policy)])
    new: BrokerProcess | None = None
    r = w = -1
    try:
        old.settle_baseline()
        r, w = put_pipes(old, n)
        t0 = time.monotonic()
        new = BrokerProcess.start(run_dir, args=["--takeover", "--policy", str(policy)])
        ready = time.monotonic() - t0
        assert old.proc.wait(timeout=60) == 0
        frozen = float(re.findall(r"installed \d+ entries in ([0-9.]+) s", old.log())[0])
        took = float(re.findall(r"took over \d+ entries from pid \d+ in ([0-9.]+) s", new.log())[0])
        print(
            f"\nhandover of {n} entries: old broker frozen {frozen * 1000:.1f} ms, successor's handover "
            f"{took * 1000:.1f} ms, successor process start to READY {ready * 1000:.0f} ms"
        )
        settle_with_entries(new)
        assert new.held() == n
        finish(new)
        new = None
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        for b in (old, new):
            if b is not None:
                b.stop()
                with contextlib.suppress(OSError):
                    b.log_path.unlink()


# -- the systemd fd store ----------------------------------------------------------------------------------------


class ServiceManager:
    """The service-manager side of sd_notify and the fd store, for real: a datagram socket at NOTIFY_SOCKET,
    ``recvmsg`` with ``SCM_RIGHTS``; stored descriptors are passed to the next start as fds 3.. with
    ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``."""

    def __init__(self, top: Path) -> None:
        self.path = top / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        self.store: dict[str, list[int]] = {}
        self.messages: list[str] = []
        self.ready = False
        self.cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        space = socket.CMSG_SPACE(253 * 4)
        while not self._stop:
            try:
                data, anc, flags, _ = self.sock.recvmsg(4096, space, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                continue
            except OSError:
                return
            fds: list[int] = []
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            assert not flags & socket.MSG_CTRUNC
            text = data.decode()
            kv = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self.cond:
                self.messages.append(text)
                if kv.get("FDSTORE") == "1" and fds:
                    assert kv.get("FDPOLL") == "0"
                    self.store.setdefault(kv.get("FDNAME", "stored"), []).extend(fds)
                    fds = []
                if kv.get("FDSTOREREMOVE") == "1":
                    for fd in self.store.pop(kv["FDNAME"], []):
                        os.close(fd)
                if kv.get("READY") == "1":
                    self.ready = True
                self.cond.notify_all()
            for fd in fds:
                os.close(fd)

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), f"service manager: no {what}; got {self.messages[-5:]}"

    def names(self) -> set[str]:
        with self.cond:
            return set(self.store)

    def start(self, run_dir: Path, *args: str, extra: dict[str, str] | None = None) -> BrokerProcess:
        """ExecStart: the stored descriptors as 3.. (the order systemd keeps: insertion), then wait for READY."""
        with self.cond:
            self.ready = False
            items = [(name, fd) for name, fds in self.store.items() for fd in fds]
        cmd = [sys.executable, "-m", "fdbroker.activation"]
        for name, fd in items:
            cmd += ["--fd", str(fd), "--name", name]
        cmd += [
            "--",
            sys.executable,
            "-m",
            "fdbroker.broker.server",
            "--run-dir",
            str(run_dir),
            "--fdstore",
            *args,
        ]
        env = child_env(run_dir, NOTIFY_SOCKET=str(self.path), **(extra or {}))
        env.pop("FDBROKER_FDSTORE", None)
        log_fd, log_name = tempfile.mkstemp(prefix="fdbroker-log-", suffix=".txt")
        proc = subprocess.Popen(cmd, stdout=log_fd, stderr=log_fd, env=env, pass_fds=[fd for _, fd in items])
        os.close(log_fd)
        broker = BrokerProcess(proc, run_dir, Path(log_name))
        with self.cond:
            ok = self.cond.wait_for(lambda: self.ready or proc.poll() is not None, 30)
        if not (ok and self.ready):
            broker.stop()
            raise AssertionError(f"broker did not become ready:\n{broker.log()[-4000:]}")
        return broker

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()


@pytest.fixture
def manager(run_dir: Path) -> Iterator[ServiceManager]:
    m = ServiceManager(run_dir.parent)
    try:
        yield m
    finally:
        m.close()


def state_names(run_dir: Path) -> set[str]:
    try:
        return set(json.loads((run_dir / "fdstore.json").read_text())["entries"])
    except (OSError, ValueError):
        return set()


def test_fdstore_crash_restores_every_entry(run_dir: Path, manager: ServiceManager, tmp_path: Path) -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    r, w = os.pipe()
    logf = tmp_path / "app.log"
    b1 = manager.start(run_dir)
    b2: BrokerProcess | None = None
    try:
        b1.settle_baseline()
        with b1.client() as c:
            c.put("web/http", lsock, labels={"tier": "web"})
            c.put("pipes/audit", w, ttl=600)
            with open(logf, "a") as f:
                c.put("log/app", f)
            c.put("gone/soon", w)
            c.put("tmp/eph", w, ephemeral=True)  # ephemeral: never stored (its session cannot survive)
            c.put("log/app", r, replace=True)  # a replace: removed and stored again
            c.delete("gone/soon")
            before = {e.name: e.raw for e in c.list()}
            rev1 = c.info().revision
        want = {"web/http", "pipes/audit", "log/app"}
        manager.wait(lambda: set(manager.store) == want, "store of the three entries")
        assert all(len(fds) == 1 for fds in manager.store.values())
        assert os.fstat(manager.store["web/http"][0]).st_ino == os.fstat(lsock.fileno()).st_ino
        assert os.fstat(manager.store["log/app"][0]).st_ino == os.fstat(r).st_ino  # the replacement
        b1.assert_no_leak()
        deadline = time.monotonic() + 30
        while state_names(run_dir) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state_names(run_dir) == want
        lsock.close()
        os.close(w)
        w = -1

        b1.proc.send_signal(signal.SIGKILL)  # a crash: nothing is cleaned up
        assert b1.proc.wait() == -signal.SIGKILL
        b2 = manager.start(run_dir)
        settle_with_entries(b2)
        after = raw_entries(b2)
        assert set(after) == want
        for name in want:
            a, b = after[name], before[name]
            assert a.owner == b.owner and a.labels == b.labels and a.info == b.info, name  # type: ignore[attr-defined]
            assert a.create_time == b.create_time and a.expire_time == b.expire_time, name  # type: ignore[attr-defined]
        with b2.client() as c:
            assert c.info().revision > rev1
            srv = c.get("web/http")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as cl:
                conn, _ = srv.accept()
                cl.sendall(b"hi")
                assert conn.recv(2) == b"hi"
                conn.close()
            srv.close()
            f = c.get_fd("pipes/audit")
            os.write(f.fileno(), b"after the crash")
            f.close()
            c.delete("pipes/audit")
        assert os.read(r, 100) == b"after the crash"
        manager.wait(lambda: "pipes/audit" not in manager.store, "FDSTOREREMOVE of a deleted entry")
        finish(b2)  # a clean stop leaves the store alone: the next start gets the entries back
        b2 = None
        assert manager.names() == {"web/http", "log/app"}
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
        lsock.close()
        for b in (b1, b2):
            if b is not None:
                b.stop()
                with contextlib.suppress(OSError):
                    b.log_path.unlink()


def test_fdstore_restore_without_state_and_bad_names(run_dir: Path, manager: ServiceManager) -> None:
    r, w = os.pipe()
    # What a store could hold that this broker never described: an orphan, a bad name, a duplicate name.
    with manager.cond:
        manager.store["orphan/pipe"] = [os.dup(w)]
        manager.store["bad//name"] = [os.dup(w)]
        manager.store["dup/x"] = [os.dup(w), os.dup(r)]
    b = manager.start(run_dir)
    try:
        settle_with_entries(b)
        ents = raw_entries(b)
        assert set(ents) == {"orphan/pipe", "dup/x"}
        o = ents["orphan/pipe"]
        assert (o.owner.pid, o.owner.uid) == (b.pid, os.getuid())  # type: ignore[attr-defined]
        assert "write end" in o.info.summary  # type: ignore[attr-defined]
        manager.wait(lambda: "bad//name" not in manager.store, "FDSTOREREMOVE of the bad name")
        manager.wait(lambda: len(manager.store.get("dup/x", [])) == 1, "the duplicate name stored once")
        assert "dropped descriptor 'bad//name'" in b.log()
        finish(b)
    finally:
        b.stop()
        os.close(r)
        os.close(w)
