"""A real systemd for the tests: the host's own systemd booted in a container (tests/test_systemd.py).

``systemd-nspawn`` (Debian: systemd-container) boots ``/usr/lib/systemd/systemd`` as PID 1 of a minimal root
made here: the host's ``/usr`` under a private overlay (an install step may write ``/usr/local/bin``; the host's
``/usr`` is never written), its own ``/etc``, ``/var`` and ``/opt``, and a private network namespace with only
a loopback device (``--private-network``). ``--register=no`` keeps it away from systemd-machined and
``--keep-unit`` from asking the host's service manager for a scope (without it nspawn needs the host's D-Bus and
exits at once on a host that does not run systemd).

The tests control it from the host by entering the namespaces of the container's PID 1 with ``nsenter(1)``:
:meth:`Machine.run` runs a command inside (``systemctl``, ``journalctl``, the fdbroker CLI),
:meth:`Machine.net_argv` runs a host program in the container's network namespace only (a client of the
container's loopback). :meth:`Machine.close` always tears it down: a clean poweroff (SIGTERM to nspawn), then
SIGKILL to whatever of this container still runs, then the directory goes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SYSTEMD = Path("/usr/lib/systemd/systemd")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 90.0, interval: float = 0.1) -> Any:
    """Poll until ``cond()`` is truthy and return it; fail naming ``what`` after ``timeout`` seconds (a bound
    on a busy machine, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def cannot_boot_reason() -> str | None:
    """Why this machine cannot boot a systemd container, or None if it can."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install {package}; .ci/run does)"
    if not SYSTEMD.exists():
        return f"no systemd to boot ({SYSTEMD} missing; Debian: systemd)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs (needed for the container's /usr)"
    r = subprocess.run(
        ["unshare", "--mount", "--pid", "--net", "--uts", "--ipc", "--fork", "true"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return f"cannot create namespaces here: {r.stderr.strip()}"
    return None


class Machine:
    """One booted container. ``workdir`` (empty, short path) holds its root, the overlay's upper layer and the
    console log; ``binds_ro`` are host paths made visible read-only at the same path inside."""

    def __init__(self, workdir: Path, binds_ro: Sequence[Path] = ()) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.upper = workdir / "usr-upper"
        self.log_path = workdir / "console.log"
        self.binds_ro = list(binds_ro)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.pidns = 0
        self._make_root()

    def _make_root(self) -> None:
        r = self.root
        for d in ("etc", "var", "run", "tmp", "root", "proc", "sys", "dev", "usr", "opt", "srv"):
            (r / d).mkdir(parents=True)
        self.upper.mkdir()
        for link in ("bin", "sbin", "lib", "lib64"):
            (r / link).symlink_to(f"usr/{link}")
        shutil.copy("/etc/os-release", r / "etc/os-release")
        (r / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (r / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (r / "etc/machine-id").write_text("")  # empty: systemd makes a transient one at boot

    def argv(self) -> list[str]:
        return [
            "systemd-nspawn",
            f"--directory={self.root}",
            f"--overlay=/usr:{self.upper}:/usr",
            *(f"--bind-ro={p}" for p in self.binds_ro),
            "--private-network",
            "--register=no",
            "--keep-unit",
            "--boot",
        ]

    def boot(self, timeout: float = 120.0) -> None:
        """Start nspawn and wait until the container's systemd finished booting ("running" or "degraded")."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid1 = wait_until(self._find_pid1, "the container's systemd to start", timeout)
        self.pidns = os.stat(f"/proc/{self.pid1}/ns/pid").st_ino
        # Until PID 1 has its private socket, systemctl cannot connect and prints nothing; then --wait blocks
        # until the boot finished.
        last: list[str] = []

        def booted() -> bool:
            r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            state = r.stdout.strip()
            last[:] = [state, r.stderr.strip()]
            assert state in ("", "running", "degraded", "starting", "initializing"), (
                f"the container's systemd is {state!r}\n{self.console()}"
            )
            return state in ("running", "degraded")

        try:
            wait_until(booted, "the container's systemd to finish booting", timeout, interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}: {last}\n{self.console()}") from None

    def _find_pid1(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.console()}")
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
        return 0

    def console(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def inside_argv(self, *argv: str, env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run inside the container (every namespace of its PID 1, its root), as root, with a clean
        environment."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return [
            "nsenter",
            "-t",
            str(self.pid1),
            "-a",
            "env",
            "-i",
            f"PATH={PATH}",
            "LANG=C.UTF-8",
            "SYSTEMD_COLORS=0",
            "SYSTEMD_PAGER=",
            *extra,
            *argv,
        ]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container and wait (bounded) for it; with ``check``, fail on a non-zero exit
        showing its output."""
        r = subprocess.run(
            self.inside_argv(*argv, env=env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check:
            assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r

    def net_argv(self, *argv: str) -> list[str]:
        """``argv`` (a host program, host file system) run in the container's network namespace only."""
        return ["nsenter", "-t", str(self.pid1), "-n", *argv]

    def close(self) -> None:
        """Power the container off (SIGTERM to nspawn: it asks the container's systemd to halt), kill what is
        left of it after a bounded wait, and remove the work directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self._kill_container()
                    self.proc.kill()
                    self.proc.wait(30)
            self._kill_container()
        finally:
            # nspawn mounts in its own mount namespace: nothing of it is left in ours. Make sure.
            with open("/proc/self/mountinfo") as f:
                stale = [line.split()[4] for line in f if line.split()[4].startswith(str(self.workdir))]
            for mnt in sorted(stale, reverse=True):
                subprocess.run(["umount", "-l", mnt], check=False)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_container(self) -> None:
        """SIGKILL every process in this container's PID namespace (found by its inode; none of anyone else)."""
        if not self.pidns:
            return
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(entry / "ns/pid").st_ino == self.pidns:
                        os.kill(int(entry.name), signal.SIGKILL)
