"""fdbroker.activation: the socket-activation protocol, for real — a driver process arranges real descriptors
(a pipe end and a TCP listener) and execs a child Python that finds them at 3, 4 with LISTEN_* set, and uses them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from fdbroker import activation

# The child: reads LISTEN_* through activation.listen_fds, reads the pipe, accepts a connection on the listener,
# and reports what it saw (including which descriptors above the passed ones are open).
CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    env = {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
    from fdbroker.activation import listen_fds
    fds = listen_fds()
    report = {"env": env, "pid": os.getpid(), "fds": fds, "extra": os.environ.get("EXTRA"),
              "env_after": "LISTEN_FDS" in os.environ}
    report["open"] = sorted(int(x) for x in os.listdir("/proc/self/fd"))
    for fd, name in fds:
        st = os.fstat(fd)
        import stat
        if stat.S_ISFIFO(st.st_mode):
            report["pipe:" + name] = os.read(fd, 100).decode()
        elif stat.S_ISSOCK(st.st_mode):
            s = socket.socket(fileno=fd)
            print(json.dumps({"listening_on": s.getsockname()[1]}), flush=True)
            conn, _ = s.accept()
            conn.sendall(b"hello from " + name.encode())
            conn.close()
            s.detach()
    print(json.dumps(report), flush=True)
    """
)

# The driver: receives the test's descriptors (pass_fds), moves them to the numbers the test asks for
# (to build overlaps), then calls exec_with_fds.
DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from fdbroker.activation import exec_with_fds
    spec = json.loads(sys.argv[1])
    for src, dst in spec["moves"]:
        os.dup2(src, dst, inheritable=False)
        os.close(src)
    exec_with_fds(spec["fds"], spec["names"], spec["argv"], extra_env={"EXTRA": "yes"})
    """
)


def run_driver(
    pass_fds: list[int],
    moves: list[tuple[int, int]],
    fds: list[int],
    names: list[str],
    argv: list[str] | None = None,
) -> subprocess.Popen[str]:
    spec = {"moves": moves, "fds": fds, "names": names, "argv": argv or [sys.executable, "-c", CHILD]}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(spec)],
        pass_fds=pass_fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def exercise(proc: subprocess.Popen[str], w: int, names: list[str]) -> dict[str, object]:
    """Feed the pipe, connect to the listener, return the child's report."""
    os.write(w, b"through the pipe")
    os.close(w)
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    with socket.create_connection(("127.0.0.1", first["listening_on"])) as c:
        got = c.recv(100)
    assert got == b"hello from " + names[1].encode()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    report: dict[str, object] = json.loads(out)
    return report


def make_pair() -> tuple[int, int, socket.socket]:
    r, w = os.pipe()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    return r, w, lsock


@pytest.mark.parametrize(
    "layout",
    ["high", "swapped", "at-target"],
)
def test_exec_with_fds_passes_pipe_and_listener(layout: str) -> None:
    r, w, lsock = make_pair()
    lfd = lsock.fileno()
    names = ["jobs", "web"]
    # Where the driver holds the two descriptors before exec_with_fds:
    #  high: far above the targets; swapped: the pipe sits at 4 (the listener's target) and the listener at 3
    #  (the pipe's target); at-target: each already sits at its own target number.
    where = {"high": (40, 41), "swapped": (4, 3), "at-target": (3, 4)}[layout]
    try:
        proc = run_driver(
            [r, lfd], [(r, 100), (lfd, 101), (100, where[0]), (101, where[1])], list(where), names
        )
        os.close(r)
        r = -1
        report = exercise(proc, w, names)
    finally:
        if r >= 0:
            os.close(r)
        lsock.close()
    env = report["env"]
    assert isinstance(env, dict)
    assert env["LISTEN_FDS"] == "2"
    assert (
        env["LISTEN_PID"] == str(report["pid"]) == str(proc.pid)
    )  # the exec'd process keeps the driver's pid
    assert env["LISTEN_FDNAMES"] == "jobs:web"
    assert report["fds"] == [[3, "jobs"], [4, "web"]]
    assert report["pipe:jobs"] == "through the pipe"
    assert report["extra"] == "yes"
    assert report["env_after"] is False  # listen_fds unset LISTEN_* by default
    # Exactly 0-2 and the passed descriptors are open (plus the listdir handle): the sources did not leak.
    opened = report["open"]
    assert isinstance(opened, list)
    assert [fd for fd in opened if fd not in (0, 1, 2, 3, 4)] in ([], [5])


def test_same_descriptor_twice_and_unsafe_names() -> None:
    r, w, lsock = make_pair()
    lfd = lsock.fileno()
    try:
        # The pipe twice (it is read once: the second copy sees EOF), then the listener: 3 fds.
        child = CHILD.replace('report["pipe:" + name] =', 'report.setdefault("pipes", []).append(name); _ =')
        proc = run_driver([r, lfd], [], [r, r, lfd], ["a:b", "", "web\n"], [sys.executable, "-c", child])
        os.close(r)
        r = -1
        os.write(w, b"x")
        os.close(w)
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["listening_on"]
        with socket.create_connection(("127.0.0.1", port)) as c:
            assert c.recv(100) == b"hello from web_"
        out, err = proc.communicate(timeout=30)
    finally:
        if r >= 0:
            os.close(r)
        lsock.close()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["env"]["LISTEN_FDNAMES"] == "a_b:unknown:web_"
    assert report["fds"] == [[3, "a_b"], [4, "unknown"], [5, "web_"]]
    assert report["pipes"] == ["a_b", "unknown"]


def test_missing_command_fails_before_moving_descriptors() -> None:
    r, w = os.pipe()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fdbroker.activation",
                "--fd",
                str(r),
                "--name",
                "x",
                "--",
                "no-such-command-fdbroker-test",
            ],
            pass_fds=[r],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 127
    assert "no-such-command-fdbroker-test" in proc.stderr


def test_module_trampoline_sets_listen_pid_to_the_command() -> None:
    """``python -m fdbroker.activation`` is what a multi-threaded parent starts: LISTEN_PID must be CMD's pid."""
    r, w = os.pipe()
    child = (
        "import os, json; from fdbroker.activation import listen_fds; "
        "fds = listen_fds(); print(json.dumps([os.getpid(), fds, os.read(3, 10).decode()]))"
    )
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fdbroker.activation",
                "--fd",
                str(r),
                "--name",
                "in",
                "--",
                sys.executable,
                "-c",
                child,
            ],
            pass_fds=[r],
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(r)
    os.write(w, b"data")
    os.close(w)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    pid, fds, data = json.loads(out)
    assert pid == proc.pid
    assert fds == [[3, "in"]]
    assert data == "data"


def test_listen_fds_ignores_another_pids_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert activation.listen_fds(unset_env=False) == []
    assert os.environ["LISTEN_FDS"] == "2"
    assert activation.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


def test_activation_env_replaces_stale_variables() -> None:
    env = activation.activation_env(
        1, ["web"], 1234, base={"LISTEN_FDS": "9", "LISTEN_FDNAMES": "old", "PATH": "/bin"}
    )
    assert env == {"PATH": "/bin", "LISTEN_FDS": "1", "LISTEN_PID": "1234", "LISTEN_FDNAMES": "web"}
    with pytest.raises(ValueError):
        activation.activation_env(2, ["one"], 1)


def test_reserve_slots_fills_the_low_numbers() -> None:
    held = activation.reserve_slots(3)
    try:
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        os.close(probe)
        assert probe >= 6
        for fd in held:
            assert not os.get_inheritable(fd)
    finally:
        for fd in held:
            os.close(fd)
