"""fdbroker.rundir: resolution, claims (a real flock across processes), stale sockets, unsafe directories."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdbroker.broker.notify import sd_notify
from fdbroker.broker.rundir import LOCK_FILE, AlreadyRunning, RunDir, broker_pid
from fdbroker.errors import BrokerError, Code
from fdbroker.rundir import (
    CONDUIT_SOCKET,
    CONTROL_SOCKET,
    RunDirError,
    default_run_dir,
    resolve_run_dir,
)

# A stand-in broker: claims the directory, binds both sockets, says "ready", then waits for stdin to close.
HOLDER = r"""
import socket, sys
from pathlib import Path
from fdbroker.broker.rundir import RunDir
rd = RunDir.claim(Path(sys.argv[1]))
socks = []
for p in (rd.control_path, rd.conduit_path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
if sys.argv[2] == "release":
    rd.release()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run), "release"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        yield proc, run
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_default_run_dir() -> None:
    assert default_run_dir(uid=0, environ={"XDG_RUNTIME_DIR": "/x"}) == Path("/run/fdbroker")
    assert default_run_dir(uid=1000, environ={"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path(
        "/run/user/1000/fdbroker"
    )
    assert default_run_dir(uid=1000, environ={"XDG_RUNTIME_DIR": ""}) == Path(tempfile.gettempdir()) / (
        "fdbroker-1000"
    )
    assert default_run_dir(uid=1000, environ={}) == Path(tempfile.gettempdir()) / "fdbroker-1000"
    expected = "/run/fdbroker" if os.geteuid() == 0 else None
    if expected:
        assert default_run_dir() == Path(expected)


def test_resolve_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_run_dir("/a", environ={"FDBROKER_RUN_DIR": "/b"}) == Path("/a")
    assert resolve_run_dir(None, environ={"FDBROKER_RUN_DIR": "/b"}) == Path("/b")
    assert resolve_run_dir("", environ={"FDBROKER_RUN_DIR": "/b"}) == Path("/b")
    assert resolve_run_dir(None, environ={}) == default_run_dir(environ={})
    monkeypatch.setenv("FDBROKER_RUN_DIR", "/from/env")
    assert resolve_run_dir(None) == Path("/from/env")


@pytest.mark.parametrize("mode", [0o755, 0o700, 0o750])
def test_claim_creates_with_exact_mode(tmp_path: Path, mode: int) -> None:
    run = tmp_path / "deep" / "er" / "run"
    old = os.umask(0o077)
    try:
        rd = RunDir.claim(run, dir_mode=mode)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(run).st_mode) == mode
        assert rd.control_path == run / CONTROL_SOCKET
        assert rd.conduit_path == run / CONDUIT_SOCKET
        assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert os.get_inheritable(rd.lock_fd) is False
        assert broker_pid(run) == os.getpid()
    finally:
        rd.release()
    assert not (run / LOCK_FILE).exists()
    assert rd.lock_fd == -1
    assert broker_pid(run) is None
    rd.release()  # idempotent


def test_claim_existing_dir_keeps_its_mode(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with RunDir.claim(run) as rd:
        assert rd.path == run
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o700


def test_second_claim_in_same_process_refused(tmp_path: Path) -> None:
    with RunDir.claim(tmp_path / "run"):
        with pytest.raises(AlreadyRunning) as ei:
            RunDir.claim(tmp_path / "run")
        assert ei.value.pid == os.getpid()
        assert ei.value.code == Code.FAILED_PRECONDITION
    # Released: claimable again.
    with RunDir.claim(tmp_path / "run"):
        pass


def test_claim_held_by_another_process(holder: tuple[subprocess.Popen[str], Path]) -> None:
    proc, run = holder
    with pytest.raises(AlreadyRunning) as ei:
        RunDir.claim(run)
    assert ei.value.pid == proc.pid
    assert f"another broker (pid {proc.pid}) owns {run}" in str(ei.value)
    assert "--run-dir" in str(ei.value)
    assert isinstance(ei.value, BrokerError)
    assert broker_pid(run) == proc.pid
    # Its sockets were not touched by the refused claim.
    assert stat.S_ISSOCK(os.lstat(run / CONTROL_SOCKET).st_mode)
    # The holder releases and exits cleanly: everything is gone and the directory is free.
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait() == 0
    assert sorted(os.listdir(run)) == []
    assert broker_pid(run) is None
    with RunDir.claim(run):
        assert broker_pid(run) == os.getpid()


def test_dead_broker_leaves_stale_state_that_is_cleaned(holder: tuple[subprocess.Popen[str], Path]) -> None:
    proc, run = holder
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    # The dead broker's files are still there, but nobody holds the lock.
    assert (run / LOCK_FILE).read_text() == f"{proc.pid}\n"
    assert stat.S_ISSOCK(os.lstat(run / CONTROL_SOCKET).st_mode)
    assert broker_pid(run) is None
    with RunDir.claim(run):
        assert not (run / CONTROL_SOCKET).exists()
        assert not (run / CONDUIT_SOCKET).exists()
        assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_stale_socket_from_this_process_removed_and_non_socket_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(run / CONDUIT_SOCKET))
    finally:
        s.close()
    assert (run / CONDUIT_SOCKET).exists()
    with RunDir.claim(run):
        assert not (run / CONDUIT_SOCKET).exists()
    (run / CONTROL_SOCKET).write_text("not a socket")
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(run)
    assert "is not a socket" in str(ei.value)
    assert (run / CONTROL_SOCKET).read_text() == "not a socket"  # left alone
    assert broker_pid(run) is None  # the failed claim dropped its lock


def test_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(f)
    assert "is not a directory" in str(ei.value)
    assert ei.value.code == Code.INVALID_ARGUMENT


def test_refuses_writable_by_others_even_sticky(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(run)
    assert "0777" in str(ei.value) and "chmod go-w" in str(ei.value)
    assert not (run / LOCK_FILE).exists()
    os.chmod(run, 0o775)
    with pytest.raises(RunDirError):
        RunDir.claim(run)
    # Sticky is not enough for the run directory itself: others could still create conduit.sock or
    # control.sock while no broker serves, and clients would find theirs.
    os.chmod(run, 0o1777)
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(run)
    assert "1777" in str(ei.value)
    os.chmod(run, 0o755)
    with RunDir.claim(run):
        pass


def test_sticky_parent_is_fine_for_our_own_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp, or a Kubernetes emptyDir
    with RunDir.claim(shared / "run") as rd:
        assert os.stat(rd.path).st_uid == os.geteuid()
    os.chmod(shared, 0o777)  # without the sticky bit anyone could rename our directory away
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(shared / "run")
    assert (
        f"{shared} (on the way to {shared / 'run'}) is writable by group or others without the sticky bit"
        in (str(ei.value))
    )


def test_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(blocker / "run")
    assert "Not a directory" in str(ei.value)
    assert "--run-dir" in str(ei.value)
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(Path("/proc/fdbroker-test/run"))  # procfs refuses mkdir
    assert "cannot create run directory /proc/fdbroker-test/run" in str(ei.value)
    assert "--run-dir" in str(ei.value)


def _claim_as(uid: int, run: Path) -> str:
    """Forks a child that drops to ``uid`` and tries to claim ``run``; returns what it reports."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            try:
                RunDir.claim(run).release()
                msg = "claimed"
            except RunDirError as e:
                msg = str(e)
            os.write(w, msg.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_refuses_directory_of_another_uid() -> None:
    # pytest's tmp_path is under a 0700 directory; the child must be able to reach this one.
    base = Path(tempfile.mkdtemp(prefix="fdbroker-test-"))
    try:
        os.chmod(base, 0o755)
        _check_other_uid(base / "run")
    finally:
        shutil.rmtree(base)


def _check_other_uid(run: Path) -> None:
    run.mkdir(mode=0o755)  # owned by root
    msg = _claim_as(65534, run)
    assert f"run directory {run} is owned by uid 0, not by this broker's uid 65534" in msg
    assert not (run / LOCK_FILE).exists()
    # Its own directory is fine for uid 65534.
    os.chown(run, 65534, 65534)
    assert _claim_as(65534, run) == "claimed"
    # Root does not serve from another uid's directory: its owner could swap the sockets (tests/test_trust.py).
    with pytest.raises(RunDirError) as ei:
        RunDir.claim(run)
    assert f"run directory {run} is owned by uid 65534, not by this broker's uid 0" in str(ei.value)


def test_broker_pid_without_lock_file(tmp_path: Path) -> None:
    assert broker_pid(tmp_path) is None
    assert broker_pid(tmp_path / "missing") is None


# --- sd_notify (startup plumbing, like the run directory; tested here with a real datagram socket)


def test_sd_notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("READY=1\nSTATUS=serving") is True
        assert rx.recv(4096) == b"READY=1\nSTATUS=serving"


def test_sd_notify_abstract_socket() -> None:
    name = f"fdbroker-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        assert sd_notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert rx.recv(4096) == b"STOPPING=1"


def test_sd_notify_unset_or_missing(tmp_path: Path) -> None:
    assert sd_notify("READY=1", environ={}) is False
    assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False
    assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": "@fdbroker-nobody-listens-here"}) is False
