"""deploy/systemd's units, as shipped, in a real systemd (issue 9, §4).

One container per module (tests/systemdutil.py: the host's systemd booted by systemd-nspawn, private network).
Into it, fdbroker is installed as docs/deploy.md tells a user to: ``python3 -m venv /opt/fdbroker``, ``pip
install fdbroker`` (from a wheel of this checkout and its dependencies' wheels: the container has no network),
``deploy/systemd/install.sh``, the example deposit (socket drop-in, env file), ``systemctl enable --now``.
Then the tests run what an operator does — verify, start, reload, restart, ``kill -9`` of the broker, stop and
start — while an application started through ``fdbroker exec`` serves HTTP on the broker-held listener
``web/https`` (0.0.0.0:443 of the container) and a client inside the container's network connects in a loop.

Every wait is on a condition with a generous bound (a busy 2-core machine); nothing asserts a duration.
Skipped, with the reason, only where this machine cannot boot a container (not root, no systemd-nspawn, no
namespaces); .ci/run installs systemd-container where it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemdutil import Machine, cannot_boot_reason, wait_until

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
ENTRY = "web/https"
PORT = 443  # deploy/etc/systemd/system/fdbroker-put@web-https.socket.d/listen.conf, as shipped
UNITS = (
    "fdbroker.service",
    "fdbroker-put@web-https.service",
    "fdbroker-put@web-https.socket",
    "fdbroker-hold@web-https.service",
)
# Clients of the broker: root, trusting the broker's system user to serve /run/fdbroker (docs/deploy.md).
CLIENT_ENV = {"FDBROKER_TRUST_UID": "fdbroker"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def container_python_version() -> str:
    r = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys, ensurepip; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(
            "the container's /usr/bin/python3 cannot make a venv (Debian: python3-venv; .ci/run installs it)"
        )
    return r.stdout.strip()


def build_wheelhouse(dest: Path, tmp: Path) -> None:
    """A wheel of this checkout (built from a copy, so the checkout gets no build/ directory) and wheels of its
    dependencies for the container's Python: what an offline ``pip install --no-index`` needs."""
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".tools", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(src)], check=True
    )
    (wheel,) = dest.glob("fdbroker-*.whl")
    subprocess.run(
        [
            *pip,
            "download",
            "--only-binary=:all:",
            "--python-version",
            container_python_version(),
            "-d",
            str(dest),
            str(wheel),
        ],
        check=True,
    )


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    """A booted container with fdbroker installed as documented and deploy/systemd's units installed by
    deploy/systemd/install.sh (enabled and started by the tests)."""
    reason = cannot_boot_reason()
    if reason:
        pytest.skip(f"cannot boot a systemd container here: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="fdb-nspawn-", dir="/tmp"))
    m = Machine(workdir, binds_ro=[ROOT])
    try:
        build_wheelhouse(m.root / "srv/wheels", workdir)
        shutil.copy(HELPERS / "brokered_http_app.py", m.root / "srv/app.py")
        m.boot()
        # docs/deploy.md, "Under systemd": the program, then the units.
        m.run("python3", "-m", "venv", "/opt/fdbroker", timeout=300)
        m.run(
            "/opt/fdbroker/bin/pip", "install", "-q", "--no-index", "--find-links", "/srv/wheels", "fdbroker"
        )
        m.run(str(ROOT / "deploy/systemd/install.sh"), env={"FDBROKER": "/opt/fdbroker/bin/fdbroker"})
        # The example deposit, as documented.
        dropin = "fdbroker-put@web-https.socket.d/listen.conf"
        m.run(
            "install",
            "-D",
            "-m0644",
            str(ROOT / "deploy/etc/systemd/system" / dropin),
            f"/etc/systemd/system/{dropin}",
        )
        m.run("install", "-m0644", str(ROOT / "deploy/etc/fdbroker/put/web-https.env"), "/etc/fdbroker/put/")
        m.run("systemctl", "daemon-reload")
        yield m
    finally:
        m.close()


# -- reading the container's state ------------------------------------------------------------------------------


def fdb(m: Machine, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return m.run("fdbroker", *args, check=check, env=CLIENT_ENV)


def main_pid(m: Machine, unit: str = "fdbroker.service") -> int:
    return int(m.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout)


def is_active(m: Machine, unit: str) -> str:
    return m.run("systemctl", "is-active", unit, check=False).stdout.strip()


def journal(m: Machine, unit: str) -> str:
    return m.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout


def listeners(m: Machine, port: int) -> list[int]:
    """Socket inodes of the TCP listeners on ``port`` in the container's network namespace (/proc/net/tcp:
    state 0A is LISTEN). One inode = one listening socket, however many processes hold it."""
    r = subprocess.run(m.net_argv("cat", "/proc/net/tcp"), capture_output=True, text=True, check=True)
    out = []
    for line in r.stdout.splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
            out.append(int(f[9]))
    return out


def broker_serving(m: Machine) -> dict[str, Any] | None:
    r = fdb(m, "status", "--json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def start_app(m: Machine, unit: str) -> None:
    """The application: ``fdbroker exec web/https -- python3 /srv/app.py`` as nobody, a transient unit."""
    m.run(
        "systemd-run",
        f"--unit={unit}",
        "--property=User=nobody",
        "--property=Group=nogroup",
        "--property=SupplementaryGroups=fdbroker",  # the broker's sockets are 0660 root... group fdbroker
        "--setenv=FDBROKER_RUN_DIR=/run/fdbroker",
        "--setenv=FDBROKER_TRUST_UID=fdbroker",
        "/usr/local/bin/fdbroker",
        "exec",
        ENTRY,
        "--",
        "/usr/bin/python3",
        "/srv/app.py",
    )


def holds_socket(m: Machine, unit: str, inode: int) -> bool:
    """Whether the main process of ``unit`` has the socket ``inode`` open (the app took over the listener)."""
    pid = main_pid(m, unit)
    if not pid:
        return False
    r = m.run("ls", "-l", f"/proc/{pid}/fd", check=False)
    return f"socket:[{inode}]" in r.stdout


class ClientLoop:
    """tests/helpers/http_client_loop.py in the container's network namespace, connecting to 127.0.0.1:443."""

    def __init__(self, m: Machine, tmp: Path) -> None:
        self.status = tmp / "client.json"
        self.stop_file = tmp / "client.stop"
        self.proc = subprocess.Popen(
            m.net_argv(
                sys.executable,
                str(HELPERS / "http_client_loop.py"),
                "127.0.0.1",
                str(PORT),
                str(self.status),
                str(self.stop_file),
                "600",
            ),
            stdin=subprocess.DEVNULL,
        )

    def counts(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status.read_text()))
        except (OSError, ValueError):
            return {"ok": 0, "refused": 0, "n_errors": 0, "errors": [], "done": False}

    def served_more(self, than: int, what: str) -> int:
        """Wait until more answers than ``than`` arrived (the app serves now); return the count."""
        c = wait_until(lambda: self.counts()["ok"] > than and self.counts(), f"the app to answer {what}")
        return int(c["ok"])

    def finish(self) -> dict[str, Any]:
        self.stop_file.touch()
        try:
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.counts()


# -- the tests ----------------------------------------------------------------------------------------------------


def test_systemd_analyze_verify_after_install(machine: Machine) -> None:
    """The documented install, then ``systemd-analyze verify`` in the booted system: not one finding."""
    r = machine.run("systemd-analyze", "verify", *UNITS, check=False)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, out
    assert machine.run("readlink", "/usr/local/bin/fdbroker").stdout.strip() == "/opt/fdbroker/bin/fdbroker"
    assert machine.run("getent", "passwd", "fdbroker").returncode == 0


def test_enable_now_serves_when_systemctl_returns(machine: Machine) -> None:
    """``systemctl enable --now`` returns once the broker sent READY=1 (Type=notify) and the deposit ran, so
    right then — without waiting — the broker serves and holds web/https, systemd's listener."""
    machine.run("systemctl", "enable", "--now", "fdbroker.service", "fdbroker-put@web-https.service")
    status = broker_serving(machine)
    assert status and status["serving"], "not serving when systemctl start returned"
    assert status["broker_pid"] == main_pid(machine)
    for unit in UNITS[:3]:
        assert is_active(machine, unit) == "active", unit
    stat = json.loads(fdb(machine, "stat", ENTRY, "--json", check=True).stdout)
    assert stat["name"] == ENTRY
    assert stat["labels"] == {"tier": "web"}  # FDBROKER_PUT_ARGS from the env file
    assert len(listeners(machine, PORT)) == 1
    show = machine.run("systemctl", "show", "fdbroker.service", "-p", "Type", "-p", "NRestarts").stdout
    assert "Type=notify" in show
    assert not machine.run("systemctl", "--failed", "--plain", "--no-legend").stdout.strip()


def test_app_serves_through_reload_restart_kill_and_stop_start(machine: Machine, tmp_path: Path) -> None:
    """An application serves on the broker-held listener while the broker is reloaded, restarted, killed with
    SIGKILL, stopped and started again; the client in the container's network never sees a refused (or any
    failed) connection. After each step the broker holds web/https again, and it is the same socket: one
    listener on :443, the very one systemd bound at the start. Then a second app instance takes over from the
    first (the app's own zero-downtime restart), still without a refused connection."""
    m = machine
    m.run("systemctl", "enable", "--now", "fdbroker.service", "fdbroker-put@web-https.service")
    (inode,) = listeners(m, PORT)
    start_app(m, "fdbroker-test-app1")
    wait_until(lambda: holds_socket(m, "fdbroker-test-app1", inode), "the app to get the listener")
    client = ClientLoop(m, tmp_path)
    try:
        ok = client.served_more(0, "at all")

        def settled(step: str) -> None:
            """After ``step``: the broker serves and holds web/https, it is still the one listener, the deposit
            unit succeeded and the app kept answering."""
            nonlocal ok
            wait_until(lambda: broker_serving(m), f"the broker to serve after {step}")
            wait_until(
                lambda: is_active(m, "fdbroker-put@web-https.service") == "active", f"the deposit ({step})"
            )
            assert fdb(m, "stat", ENTRY).returncode == 0, f"{ENTRY} missing after {step}"
            assert listeners(m, PORT) == [inode], f"not the same single listener after {step}"
            ok = client.served_more(ok, f"after {step}")

        # Reload: SIGHUP re-reads the policy; same process.
        pid = main_pid(m)
        reloads = journal(m, "fdbroker.service").count("policy reloaded from")
        m.run("systemctl", "reload", "fdbroker.service")
        wait_until(
            lambda: journal(m, "fdbroker.service").count("policy reloaded from") > reloads,
            "the reload log line",
        )
        settled("systemctl reload")
        assert main_pid(m) == pid

        # Restart: a new broker gets the entry back from the fd store, and the deposit re-runs (same socket).
        m.run("systemctl", "restart", "fdbroker.service")
        settled("systemctl restart")
        assert main_pid(m) != pid
        pid = main_pid(m)

        # kill -9 of the broker: Restart=on-failure, entries restored from the fd store.
        restored = journal(m, "fdbroker.service").count("fd store: restored 1 of 1")
        m.run("kill", "-KILL", str(pid))
        wait_until(lambda: main_pid(m) not in (0, pid), "systemd to restart the killed broker")
        settled("kill -9")
        assert journal(m, "fdbroker.service").count("fd store: restored 1 of 1") > restored
        assert "status=9/KILL" in journal(m, "fdbroker.service")
        pid = main_pid(m)

        # Stop: the broker and the deposit stop, systemd's socket stays; the app serves without a broker.
        m.run("systemctl", "stop", "fdbroker.service")
        assert is_active(m, "fdbroker.service") == "inactive"
        assert is_active(m, "fdbroker-put@web-https.service") == "inactive"
        assert is_active(m, "fdbroker-put@web-https.socket") == "active"
        assert fdb(m, "status").returncode == 10  # no broker
        ok = client.served_more(ok, "while the broker is stopped")
        assert listeners(m, PORT) == [inode]

        # Start: the fd store was dropped with the stop; the deposit brings the same socket back.
        m.run("systemctl", "start", "fdbroker.service")
        settled("systemctl stop + start")

        # The app itself restarts with no downtime: a second instance gets the listener from the broker, then
        # the first one stops.
        start_app(m, "fdbroker-test-app2")
        wait_until(lambda: holds_socket(m, "fdbroker-test-app2", inode), "the second app to get the listener")
        m.run("systemctl", "stop", "fdbroker-test-app1")
        ok = client.served_more(ok, "by the second app alone")
    finally:
        counts = client.finish()
        m.run("systemctl", "stop", "fdbroker-test-app1", "fdbroker-test-app2", check=False)
    print(f"client in the container's network: {counts}")
    assert counts["done"] and counts["refused"] == 0 and counts["n_errors"] == 0, counts
    failed = m.run("systemctl", "--failed", "--plain", "--no-legend").stdout.strip()
    if failed:
        units = [line.split()[0] for line in failed.splitlines()]
        why = m.run("systemctl", "status", "--no-pager", "--lines=30", *units, check=False).stdout
        raise AssertionError(f"failed units:\n{failed}\n{why}")
