"""The keeper (``fdbroker serve --keeper``): crash survival without systemd, for real.

* The keeper runs as PID 1 of a new PID namespace (``unshare --pid --fork --mount-proc``), like a container's
  first process: the broker is SIGKILLed and comes back with every entry (names, labels, owner, expiry, the
  entries' revisions; the registry's revision higher than before), the sessions that could not survive end with the
  events a takeover gives (``LEASE_RELEASED``/``HANDOVER``, ``DELETE``/``SESSION_ENDED``), ``fdbroker status``
  shows the restart and why; an orphan adopted by the keeper is reaped; SIGTERM stops the broker cleanly and the
  keeper exits 0.
* A broker that crashes at start is restarted with a growing back-off (counted in a bounded window), and a usage
  error is not restarted at all.
* Nobody else can inject into, or remove from, the keeper's store: not another uid, not root with its own
  credentials, not root forging the broker's pid in ``SCM_CREDENTIALS`` (the abstract address is in
  ``/proc/net/unix`` for all to see).
* The keeper's own protocol with a stand-in broker (store, remove, metadata update, names too long for
  ``LISTEN_FDNAMES``, SIGUSR2 restart), its descriptor arrangement in the child with shuffled descriptors, and its
  process stays free of gRPC and protobuf.
* The metadata travels with each descriptor: an entry put just before a crash comes back with its owner and
  labels even though ``fdstore.json`` could never be written.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from brokerutil import check_listener_and_pipe, child_env

from fdbroker.broker.survival import keeper
from fdbroker.testing import wait_until

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NEEDS = {tool: shutil.which(tool) is not None for tool in ("unshare", "nsenter", "setpriv")}


# -- helpers -----------------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Host pids whose parent is ``pid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


class Kept:
    """``fdbroker serve --keeper`` as a child process (optionally behind a prefix such as ``unshare``)."""

    def __init__(self, run_dir: Path, args: Sequence[str] = (), prefix: Sequence[str] = ()) -> None:
        self.run_dir = run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="fdbroker-keeper-log-", suffix=".txt")
        self.log_path = Path(name)
        env = child_env(run_dir)
        for k in ("NOTIFY_SOCKET", "FDBROKER_FDSTORE", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(k, None)
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "fdbroker",
            "--run-dir",
            str(run_dir),
            "serve",
            "--keeper",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=fd, env=env)
        os.close(fd)
        # The keeper: this process, or the child unshare forked into the new namespace.
        self.pid = (
            self.proc.pid
            if not prefix
            else wait_until(lambda: children(self.proc.pid), "the keeper", timeout=60)[0]
        )

    def broker_pid(self) -> int:
        return int(wait_until(lambda: children(self.pid), "a broker under the keeper", timeout=60)[0])

    def serving(self, other_than: int = 0) -> Any:
        """Wait for a broker other than ``other_than`` to answer GetInfo; its Info."""
        from fdbroker.client import Client

        def ask() -> Any:
            assert self.proc.poll() is None, self.log()[-4000:]
            try:
                with Client(self.run_dir, timeout=2) as c:
                    info = c.info()
            except Exception:
                return None
            return info if info.broker_pid != other_than else None

        return wait_until(ask, "a serving broker", timeout=60)

    def client(self) -> Any:
        from fdbroker.client import Client

        return Client(self.run_dir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="fdb-keep-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        yield top / "run"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def entries(k: Kept) -> dict[str, Any]:
    with k.client() as c:
        return {e.name: e.raw for e in c.list()}


def watched(k: Kept, start: int, n: int) -> list[Any]:
    with k.client() as c, c.watch(start_revision=start) as w:
        return [next(w) for _ in range(n)]


# -- the keeper as PID 1 -----------------------------------------------------------------------------------------


@ROOT_ONLY
@pytest.mark.slow
@pytest.mark.skipif(not (NEEDS["unshare"] and NEEDS["nsenter"]), reason="needs unshare and nsenter")
def test_keeper_as_pid1_brings_the_broker_back_with_every_entry(run_dir: Path, tmp_path: Path) -> None:
    k = Kept(run_dir, prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    r, w = os.pipe()
    holder = None
    try:
        first = k.serving()
        with open(f"/proc/{k.pid}/status") as f:
            nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        assert nspid[-1] == "1", nspid  # PID 1 of its namespace
        assert first.keeper_pid == 1 and first.keeper_restarts == 0 and first.keeper_last_exit == ""
        with k.client() as c:
            c.put("web/http", lsock, labels={"tier": "web", "team": "edge"})
            c.put("pipes/audit", w, ttl=600)
            with open(tmp_path / "app.log", "a") as f:
                c.put("log/app", f, labels={"rotate": "daily"})
            c.put("locks/db", w)
            with c.lease("locks/db", ttl=30, keepalive=False) as h1:
                epoch1 = h1.epoch
        # A live session: a lease and an ephemeral entry, which cannot outlive the broker process.
        holder = k.client()
        holder.put("tmp/mine", r, ephemeral=True)
        lease = holder.lease("locks/db", ttl=60, keepalive=False)
        assert lease.epoch > epoch1
        before = entries(k)
        with k.client() as c:
            rev_before = c.info().revision

        broker = k.broker_pid()
        os.kill(broker, signal.SIGKILL)
        info = k.serving(other_than=first.broker_pid)
        assert (info.keeper_pid, info.keeper_restarts, info.keeper_last_exit) == (1, 1, "killed by SIGKILL")
        assert info.revision > rev_before

        after = entries(k)
        assert set(after) == {"web/http", "pipes/audit", "log/app", "locks/db"}  # tmp/mine was ephemeral
        for name, a in after.items():
            b = before[name]
            assert a.owner == b.owner and a.labels == b.labels and a.info == b.info, name
            assert a.create_time == b.create_time and a.expire_time == b.expire_time, name
            assert a.create_revision == b.create_revision, name
        for name in ("web/http", "pipes/audit", "log/app"):
            assert after[name].revision == before[name].revision, name
        assert after["pipes/audit"].HasField("expire_time")
        assert after["locks/db"].lease.epoch == lease.epoch and not after["locks/db"].lease.holders

        # The ended sessions end as after a takeover, right after the restored revision.
        evs = watched(k, info.oldest_watch_revision, 2)
        assert {(e.type, e.name, e.reason) for e in evs} == {
            ("lease_released", "locks/db", "handover"),
            ("delete", "tmp/mine", "session_ended"),
        }
        assert next(e for e in evs if e.type == "lease_released").lease_id == lease.lease_id
        with k.client() as c:
            with c.lease("locks/db", ttl=30, keepalive=False) as h2:
                assert h2.epoch > lease.epoch  # fencing epochs keep increasing
            check_listener_and_pipe(c, port, r)
        holder.close()  # its session died with the old broker
        holder = None
        lease.fd.close()

        status = subprocess.run(
            [sys.executable, "-m", "fdbroker", "--run-dir", str(run_dir), "status"],
            env=child_env(run_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert re.search(r"keeper:\s+pid 1, 1 restart, last: killed by SIGKILL", status.stdout), status.stdout

        # An orphan in the namespace is adopted by PID 1 and reaped when it exits: no zombie stays.
        subprocess.run(
            ["nsenter", "--target", str(k.pid), "--pid", "--mount", "--", "sh", "-c", "sleep 1 & exit 0"],
            check=True,
            timeout=60,
        )
        orphan = wait_until(
            lambda: [
                p
                for p in children(k.pid)
                if proc_state(p) and "sleep" in Path(f"/proc/{p}/cmdline").read_text()
            ],
            "the orphan adopted by the keeper",
            timeout=60,
        )[0]
        wait_until(lambda: proc_state(orphan) == "", "the orphan reaped", timeout=60)
        assert not [p for p in children(k.pid) if proc_state(p) == "Z"]

        # SIGTERM: the broker stops cleanly, the keeper exits 0.
        os.kill(k.pid, signal.SIGTERM)
        assert k.proc.wait(60) == 0, k.log()[-4000:]
        log = k.log()
        assert "fdbroker stopped" in log and "after a stop request; keeper exits" in log
        assert log.count("broker started") == 2, log[-4000:]
    finally:
        if holder is not None:
            holder.close()
        lsock.close()
        os.close(r)
        os.close(w)
        k.close()


# -- restarts ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_broker_that_crashes_at_start_is_restarted_with_back_off(run_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text("this is [not toml")  # every broker exits 1 at start
    k = Kept(run_dir, args=["--policy", str(bad)])
    try:
        window = 4.0  # a bounded window: with back-off 0, 0.1, 0.2, 0.4, 0.8, 1.6 s, at most 6 restarts fit
        time.sleep(window)
        os.kill(k.pid, signal.SIGTERM)
        code = k.proc.wait(60)
        log = k.log()
        delays = [float(x) for x in re.findall(r"restart \d+ in ([0-9.]+)s", log)]
        # Restarted, but no spin: a keeper without back-off restarts once per broker start (~0.3 s), 10+ times.
        assert 1 <= len(delays) <= 6, log[-4000:]
        # And the delays it chose are the schedule, whatever the machine's speed.
        assert delays == [0.0, *(min(30.0, 0.1 * 2**i) for i in range(len(delays) - 1))], delays
        assert log.count("broker started") == len(delays) + (0 if "while no broker ran" in log else 1)
        assert code in (0, 1, 128 + signal.SIGTERM), log[-4000:]
    finally:
        k.close()


def test_a_usage_error_is_not_restarted(run_dir: Path) -> None:
    k = Kept(run_dir, args=["--no-such-option"])
    try:
        assert k.proc.wait(60) == 2, k.log()[-4000:]
        assert "restarting would not help" in k.log()
        assert k.log().count("broker started") == 1
    finally:
        k.close()


# -- the channel is the broker's alone ---------------------------------------------------------------------------


def _inject(address: bytes, forge_pid: int = 0) -> str:
    """Python code that tries to store a pipe in the keeper at ``address``; prints the outcome."""
    return textwrap.dedent(
        f"""
        import array, os, socket, struct
        r, w = os.pipe()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))]
        if {forge_pid}:
            anc.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("3i", {forge_pid}, 0, 0)))
        for msg in (b"FDSTORE=1\\nFDNAME=evil/x", b"FDSTOREREMOVE=1\\nFDNAME=web/x"):
            try:
                s.sendmsg([msg], anc if msg.startswith(b"FDSTORE=") else [], 0, {address!r})
                print("sent")
            except OSError as err:
                print(type(err).__name__, err.errno)
        """
    )


@ROOT_ONLY
@pytest.mark.slow
@pytest.mark.skipif(not NEEDS["setpriv"], reason="needs setpriv")
def test_nobody_else_can_use_the_keepers_socket(run_dir: Path) -> None:
    k = Kept(run_dir)
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        first = k.serving()
        with k.client() as c:
            c.put("web/x", lsock, labels={"a": "b"})
        # The keeper loads neither gRPC nor protobuf (it must be far less likely to die than the broker).
        maps = Path(f"/proc/{k.pid}/maps").read_text()
        assert not re.search(r"grpc|protobuf|upb|_message", maps), "the keeper loaded gRPC or protobuf"
        # Its address is public: /proc/net/unix lists it (and the broker's environment names it).
        names = re.findall(r"@(fdbroker-keeper-[0-9a-f]+)", Path("/proc/net/unix").read_text())
        env = Path(f"/proc/{k.broker_pid()}/environ").read_bytes().split(b"\0")
        notify = next(v for v in env if v.startswith(b"NOTIFY_SOCKET=")).split(b"=", 1)[1].decode()
        assert notify.startswith("@") and notify[1:] in names
        address = b"\0" + notify[1:].encode()
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        attempts = {
            "uid 65534": [*nobody, sys.executable, "-c", _inject(address)],
            "root": [sys.executable, "-c", _inject(address)],
            "root, as the broker's pid": [sys.executable, "-c", _inject(address, forge_pid=k.broker_pid())],
        }
        for who, cmd in attempts.items():
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, (who, p.stderr)
            assert p.stdout.split("\n")[:2] == ["PermissionError 1", "PermissionError 1"], (who, p.stdout)
        # The keeper kept exactly what the broker stored: after a crash, web/x is back and nothing else is.
        os.kill(k.broker_pid(), signal.SIGKILL)
        k.serving(other_than=first.broker_pid)
        assert set(entries(k)) == {"web/x"}
        assert "evil" not in k.log() and "dropped a datagram" not in k.log()
        assert k.stop() == 0
    finally:
        lsock.close()
        k.close()


# -- metadata travels with each descriptor -----------------------------------------------------------------------


@pytest.mark.slow
def test_entry_metadata_does_not_wait_for_fdstore_json(run_dir: Path) -> None:
    # fdstore.json cannot be written at all (a directory is in its place): everything must come from the keeper.
    (run_dir / "fdstore.json").mkdir(parents=True)
    (run_dir / "fdstore.json" / "keep").write_text("")
    k = Kept(run_dir)
    r, w = os.pipe()
    try:
        first = k.serving()
        with k.client() as c:
            c.put("late/x", w, labels={"put": "just-before-the-crash"}, ttl=3600)
            before = c.stat("late/x").raw
            rev = c.info().revision
        os.kill(k.broker_pid(), signal.SIGKILL)
        info = k.serving(other_than=first.broker_pid)
        after = entries(k)["late/x"]
        assert after.owner == before.owner and after.owner.pid != info.broker_pid
        assert after.labels == before.labels and after.expire_time == before.expire_time
        assert after.revision == before.revision and info.revision > rev
        assert "cannot write" in k.log()  # it really was not written
        assert k.stop() == 0
    finally:
        os.close(r)
        os.close(w)
        k.close()


# -- the keeper's protocol, with a stand-in broker ---------------------------------------------------------------

STAND_IN = textwrap.dedent(
    r"""
    import array, base64, json, os, signal, socket, sys, time
    report_path = sys.argv[1]
    ch = socket.socket(fileno=int(os.environ["FDBROKER_KEEPER_NOTIFY"]))
    def send(text, fds=()):
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        ch.sendmsg([text.encode()], anc)
    def store(name, meta):
        fd = os.memfd_create(name)
        send(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0\nX_FDBROKER_ENTRY={base64.b64encode(meta.encode()).decode()}", [fd])
        os.close(fd)
    n = int(os.environ["LISTEN_FDS"])
    state_fd = int(os.environ["FDBROKER_KEEPER_STATE"])
    state = os.pread(state_fd, 1 << 24, 0).decode().splitlines()
    report = {
        "pid_ok": os.environ["LISTEN_PID"] == str(os.getpid()),
        "restarts": int(os.environ["FDBROKER_KEEPER_RESTARTS"]),
        "last_exit": os.environ["FDBROKER_KEEPER_LAST_EXIT"],
        "names": os.environ.get("LISTEN_FDNAMES"),
        "fds": [os.readlink(f"/proc/self/fd/{3 + i}") for i in range(n)],
        "state_fd": state_fd == 3 + n,
        "notify_fd": int(os.environ["FDBROKER_KEEPER_NOTIFY"]) == 4 + n,
        "state": [line.split("\t")[0] + "=" + base64.b64decode(line.split("\t")[1]).decode() for line in state[1:]],
        "header": state[0],
        "open": sorted(int(x) for x in os.listdir("/proc/self/fd")),
    }
    with open(report_path, "a") as f:
        f.write(json.dumps(report) + "\n")
    phase = report["restarts"]
    if phase == 0:
        for name in "abcdefgh":
            store(name, name + "1")
        send("FDSTOREREMOVE=1\nFDNAME=a")
        send("FDSTOREREMOVE=1\nFDNAME=b")
        time.sleep(0.5)  # the keeper's closer closes a and b: the next two land on their numbers
        store("i", "i1")
        store("j", "j1")
        send("FDNAME=c\nX_FDBROKER_ENTRY=" + base64.b64encode(b"c2").decode())  # metadata only
        send("READY=1")
        os.kill(os.getpid(), signal.SIGKILL)
    elif phase == 1:
        for i in range(500):  # 500 names of 250 bytes: LISTEN_FDNAMES would pass the kernel's 128 KiB limit
            store(f"long/{i:03d}/" + "x" * 240, "long")  # memfd names: at most 249 bytes
        sys.exit(3)
    elif phase == 2:
        send("READY=1")
        signal.pause()  # SIGUSR2 to the keeper: SIGTERM here, then a restart on request
    else:
        sys.exit(0)  # on its own, with status 0: the keeper exits 0
    """
)


@pytest.mark.slow
def test_keeper_protocol_with_a_stand_in_broker(tmp_path: Path) -> None:
    report = tmp_path / "report.jsonl"
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    code = (
        "import sys; from fdbroker.broker.survival.keeper import main; "
        f"sys.exit(main([sys.executable, {str(script)!r}, {str(report)!r}]))"
    )
    log_path = tmp_path / "keeper.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log, env=child_env(tmp_path))

    def reports() -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in report.read_text().splitlines()]
        except (OSError, ValueError):
            return []

    try:
        wait_until(lambda: len(reports()) >= 3, "the third start", timeout=60)
        p.send_signal(signal.SIGUSR2)
        assert p.wait(60) == 0, log_path.read_text()[-4000:]
        r0, r1, r2, r3 = reports()
        assert all(r["pid_ok"] and r["state_fd"] and r["notify_fd"] for r in (r0, r1, r2, r3))
        assert all(r["header"] == "fdbroker-keeper-state 1" for r in (r0, r1, r2, r3))
        assert (r0["restarts"], r0["last_exit"], r0["fds"], r0["names"]) == (0, "", [], None)
        # Kept in order, under their names, with their latest metadata; descriptors at 3.. in the same order.
        want = ["c", "d", "e", "f", "g", "h", "i", "j"]
        assert (r1["restarts"], r1["last_exit"]) == (1, "killed by SIGKILL")
        assert r1["names"] == ":".join(want)
        assert r1["fds"] == [f"/memfd:{n} (deleted)" for n in want]
        assert r1["state"] == ["c=c2", *(f"{n}={n}1" for n in want[1:])]
        # Nothing else leaked in: stdio, the entries, the state, the channel (and the listing's own descriptor).
        assert r1["open"] == list(range(3 + len(want) + 3)), r1["open"]
        # 508 names do not fit in LISTEN_FDNAMES: it is left out, the state memfd names them.
        assert (r2["restarts"], r2["last_exit"]) == (2, "exited with status 3")
        assert r2["names"] is None and len(r2["fds"]) == len(r2["state"]) == 508
        assert [s.split("=")[0] for s in r2["state"][:9]] == [*want, "long/000/" + "x" * 240]
        assert [f.split(":")[1].split(" ")[0] for f in r2["fds"]] == [s.split("=")[0] for s in r2["state"]]
        assert (r3["restarts"], r3["last_exit"]) == (3, "restarted on request (killed by SIGTERM)")
        assert len(r3["fds"]) == 508
        assert "on its own" in log_path.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- the descriptor arrangement in the child ---------------------------------------------------------------------

CHECKER = textwrap.dedent(
    """
    import json, os, sys
    got = {}
    for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")):
        try:
            got[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    json.dump({"pid_ok": os.environ["LISTEN_PID"] == str(os.getpid()), "fds": got}, open(sys.argv[1], "w"))
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_child_arrangement_puts_every_descriptor_in_place(tmp_path: Path, seed: int) -> None:
    """Shuffled sources, some sitting on their own or on another one's target: each lands at 3 + its index, and
    nothing else stays open in the exec'd program."""
    n = 40
    made = [os.memfd_create(f"m{i}", os.MFD_CLOEXEC) for i in range(n + 2)]
    try:
        rng = random.Random(seed)
        order = list(range(n + 2))
        rng.shuffle(order)
        sources = [made[i] for i in order]
        out = tmp_path / "fds.json"
        pid = os.fork()
        if pid == 0:
            keeper._child_exec(
                [sys.executable, "-c", CHECKER, str(out)],
                dict(os.environ),
                sources[:n],
                sources[n],
                sources[n + 1],
            )
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        report = json.loads(out.read_text())
        assert report["pid_ok"]
        fds = {int(k): v for k, v in report["fds"].items()}
        want = {3 + i: f"/memfd:m{order[i]} (deleted)" for i in range(n + 2)}
        assert {fd: v for fd, v in fds.items() if fd >= 3 and "memfd" in v} == want
        assert [fd for fd in fds if fd >= 3 + n + 2 and "memfd" in fds[fd]] == []
    finally:
        for fd in made:
            os.close(fd)


def test_serve_help_lists_keeper() -> None:
    r = subprocess.run([sys.executable, "-m", "fdbroker", "serve", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--keeper" in r.stdout


def test_keeper_state_is_only_read_from_a_sealed_memfd(tmp_path: Path) -> None:
    """A stale ``FDBROKER_KEEPER_STATE`` naming some other descriptor is ignored (and that descriptor left open)."""
    with open(tmp_path / "f", "w+") as f:
        env = {keeper.STATE_ENV: str(f.fileno())}
        assert keeper.read_state(env) is None
        os.fstat(f.fileno())  # still open
    assert keeper.read_state({}) is None


def test_describe_exit() -> None:
    assert keeper.describe_exit(3 << 8) == "exited with status 3"
    assert keeper.describe_exit(signal.SIGKILL) == "killed by SIGKILL"
    assert keeper.exit_code(signal.SIGTERM) == 128 + signal.SIGTERM
    assert keeper.exit_code(2 << 8) == 2


@pytest.mark.slow
def test_a_running_broker_moves_under_a_keeper_with_takeover(run_dir: Path) -> None:
    """``serve --keeper --takeover`` next to a plain broker: the entries move, and a broker the keeper restarts
    later does not try to take over again (it gets them from the keeper)."""
    from fdbroker.testing import BrokerProcess

    old = BrokerProcess.start(run_dir)
    lsock = socket.create_server(("127.0.0.1", 0))
    k: Kept | None = None
    try:
        with old.client() as c:
            c.put("web/x", lsock, labels={"moved": "yes"})
        k = Kept(run_dir, args=["--takeover"])
        assert old.proc.wait(60) == 0, old.log()[-3000:]
        first = k.serving()
        assert entries(k)["web/x"].labels == {"moved": "yes"}
        broker = k.broker_pid()
        assert "--takeover" in Path(f"/proc/{broker}/cmdline").read_text()
        os.kill(broker, signal.SIGKILL)
        k.serving(other_than=first.broker_pid)
        assert "--takeover" not in Path(f"/proc/{k.broker_pid()}/cmdline").read_text()
        assert entries(k)["web/x"].labels == {"moved": "yes"}
        assert k.stop() == 0
    finally:
        lsock.close()
        old.stop()
        with contextlib.suppress(OSError):
            old.log_path.unlink()
        if k is not None:
            k.close()


@pytest.mark.slow
def test_sigusr2_restarts_the_broker_with_every_entry(run_dir: Path) -> None:
    """The upgrade in place: SIGUSR2 to the keeper stops the broker cleanly and starts the (new) one at once."""
    k = Kept(run_dir)
    r, w = os.pipe()
    try:
        first = k.serving()
        with k.client() as c:
            c.put("a/pipe", w, labels={"x": "1"}, ttl=600)
        before = entries(k)
        # The broker ranks above the keeper for the OOM killer.
        adj = int(Path(f"/proc/{k.broker_pid()}/oom_score_adj").read_text())
        assert adj == min(
            1000, int(Path(f"/proc/{k.pid}/oom_score_adj").read_text()) + keeper.OOM_SCORE_BONUS
        )
        os.kill(k.pid, signal.SIGUSR2)
        info = k.serving(other_than=first.broker_pid)
        assert (info.keeper_restarts, info.keeper_last_exit) == (
            1,
            "restarted on request (exited with status 0)",
        )
        assert entries(k) == before
        assert "fdbroker stopped" in k.log()  # a clean stop, not a kill
        assert k.stop() == 0
    finally:
        os.close(r)
        os.close(w)
        k.close()


OOM_STAND_IN = textwrap.dedent(
    r"""
    import array, json, os, socket, sys
    ch = socket.socket(fileno=int(os.environ["FDBROKER_KEEPER_NOTIFY"]))
    n = int(os.environ["LISTEN_FDS"])
    report = {"last_exit": os.environ["FDBROKER_KEEPER_LAST_EXIT"], "fds": [os.readlink(f"/proc/self/fd/{3 + i}") for i in range(n)]}
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps(report) + "\n")
    if os.environ["FDBROKER_KEEPER_RESTARTS"] == "0":
        fd = os.memfd_create("oom/x")
        ch.sendmsg([b"FDSTORE=1\nFDNAME=oom/x\nFDPOLL=0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        ch.send(b"READY=1")
        hog = []
        while True:  # until the OOM killer ends it
            hog.append(b"x" * (1 << 20))
    """
)


def _memory_cgroup(limit: int) -> tuple[Path, list[str]] | None:
    """A new cgroup-v1 memory cgroup below this process's own, limited to ``limit`` bytes (no swap), and the
    command prefix that runs a program in it; None where that cannot be made."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = next((line.split(":", 2)[2] for line in lines if "memory" in line.split(":")[1].split(",")), None)
    if v1 is None:
        return None
    cg = Path("/sys/fs/cgroup/memory") / v1.lstrip("/") / f"fdbroker-oom-{os.getpid()}"
    try:
        cg.mkdir()
    except OSError:
        return None
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        if (cg / "memory.memsw.limit_in_bytes").exists():
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError:
        cg.rmdir()
        return None
    return cg, ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]


@ROOT_ONLY
@pytest.mark.slow
def test_an_oom_killed_broker_comes_back_and_the_keeper_says_why(tmp_path: Path) -> None:
    made = _memory_cgroup(160 << 20)
    if made is None:
        pytest.skip("no cgroup-v1 memory controller to limit")
    cg, prefix = made
    report = tmp_path / "report.jsonl"
    script = tmp_path / "oom.py"
    script.write_text(OOM_STAND_IN)
    code = (
        "import sys; from fdbroker.broker.survival.keeper import main; "
        f"sys.exit(main([sys.executable, {str(script)!r}, {str(report)!r}]))"
    )
    log_path = tmp_path / "keeper.log"
    try:
        with open(log_path, "wb") as log:
            p = subprocess.Popen(
                [*prefix, sys.executable, "-c", code], stdout=log, stderr=log, env=child_env(tmp_path)
            )
        try:
            assert p.wait(120) == 0, log_path.read_text()[
                -4000:
            ]  # the second stand-in exits 0: so does the keeper
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        first, second = (json.loads(line) for line in report.read_text().splitlines())
        assert first == {"last_exit": "", "fds": []}
        assert second == {"last_exit": "killed by SIGKILL (out of memory)", "fds": ["/memfd:oom/x (deleted)"]}
    finally:
        wait_until(lambda: not (cg / "cgroup.procs").read_text().strip(), "the cgroup to empty", timeout=60)
        cg.rmdir()
