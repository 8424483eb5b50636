"""Trust runs both ways (issue 7, section 5): the broker serves only from a run directory no other uid controls,
and a client checks who serves the run directory before it sends anything. Attacked for real: the other uid is
65534, through setpriv, with real directories, symlinks, sockets and brokers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from secutil import NOBODY, new_run_dir, run_as, unprivileged_python

import fdbroker.aio
from fdbroker.cli.exitcodes import exit_code_for
from fdbroker.client import Client
from fdbroker.client.quick import QuickClient
from fdbroker.client.trust import TRUST_UID_ENV, Trust
from fdbroker.conduit.frames import encode_frame
from fdbroker.errors import Code, InvalidArgument, UntrustedBroker
from fdbroker.testing import BrokerProcess, checked_broker
from fdbroker.v1 import conduit_pb2 as cpb

AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
ROOT_ONLY = "this client trusts only uid 0 (root, this client)"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv(1) to act as uid 65534",
)


@pytest.fixture(autouse=True)
def no_ambient_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the environment running the suite trusts, these tests start from root and ourselves only."""
    monkeypatch.delenv(TRUST_UID_ENV, raising=False)


@pytest.fixture(scope="module")
def nobody_python() -> list[str]:
    cmd = unprivileged_python()
    if cmd is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    return cmd


def as_nobody(*cmd: str) -> None:
    """Run a command (mkdir, ln, ...) as uid 65534: what it creates is really 65534's."""
    subprocess.run([*AS_NOBODY, *cmd], check=True, cwd="/")


def sticky_base() -> Path:
    """A fresh root-owned directory that works like /tmp: mode 1777, so uid 65534 can create entries in it."""
    base = new_run_dir().parent
    os.chmod(base, 0o1777)
    return base


def refused_start(run_dir: Path) -> str:
    """Start a real root broker on ``run_dir``; return what it said when it refused. Fails if it served."""
    try:
        broker = BrokerProcess.start(run_dir, timeout=30)
    except RuntimeError as err:
        return str(err)
    with broker:
        pytest.fail(f"the broker served from {run_dir}:\n{broker.log()[-2000:]}")
    raise AssertionError("unreachable")


def cli(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != TRUST_UID_ENV}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fdbroker", "--run-dir", str(run_dir), "--timeout", "3s", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )


# -- the broker: where it agrees to serve ----------------------------------------------------------------------


def _owned_by_nobody(base: Path) -> tuple[Path, str]:
    run = base / "run"
    as_nobody("mkdir", "-m", "0755", str(run))
    return run, f"run directory {run} is owned by uid {NOBODY}, not by this broker's uid 0"


def _under_parent_of_nobody(base: Path) -> tuple[Path, str]:
    shared = base / "shared"
    as_nobody("mkdir", "-m", "0755", str(shared))
    run = shared / "run"
    return run, f"{shared} (on the way to {run}) is owned by uid {NOBODY} (mode 0755)"


def _under_parent_nobody_can_write(base: Path) -> tuple[Path, str]:
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # root's, but not sticky: 65534 can rename anything in it away and replace it
    as_nobody("touch", str(shared / "written-by-nobody"))
    run = shared / "run"
    return run, (
        f"{shared} (on the way to {run}) is writable by group or others without the sticky bit "
        "(mode 0777, owner uid 0)"
    )


def _through_symlink_of_nobody(base: Path) -> tuple[Path, str]:
    real = base / "real"
    real.mkdir(mode=0o755)  # a perfectly good root-owned directory...
    run = base / "run"
    as_nobody("ln", "-s", str(real), str(run))  # ...but 65534 chose where "run" leads, and may change it
    assert os.lstat(run).st_uid == NOBODY
    return run, f"{run} (on the way to {run}) is a symlink owned by uid {NOBODY}"


@pytest.mark.parametrize(
    "setup",
    [_owned_by_nobody, _under_parent_of_nobody, _under_parent_nobody_can_write, _through_symlink_of_nobody],
    ids=["owned-by-65534", "parent-owned-by-65534", "parent-writable-by-65534", "symlink-of-65534"],
)
def test_root_broker_refuses_a_run_dir_another_uid_controls(
    setup: Callable[[Path], tuple[Path, str]],
) -> None:
    """Whoever controls the run directory or a directory above it could swap conduit.sock under a root broker
    and have root's own clients connect to them: the broker refuses to start, naming the path and its owner."""
    base = sticky_base()
    try:
        run, expected = setup(base)
        before = sorted(p.name for p in base.rglob("*"))
        said = refused_start(run)
        assert "exit 1" in said and "fdbroker serve:" in said
        assert expected in " ".join(said.split()), said
        assert sorted(p.name for p in base.rglob("*")) == before  # nothing created, no socket bound there
    finally:
        shutil.rmtree(base)


def test_root_broker_serves_from_its_own_dir_under_tmp_and_binds_through_it(nobody_python: list[str]) -> None:
    """A directory of its own under sticky /tmp is fine, however deep: the sockets are bound through the
    directory's descriptor (/proc/self/fd/N/conduit.sock), so even a path longer than sun_path's 108 bytes works
    (today's main cannot bind there), and so do clients, which connect the same way. A root-owned symlink on
    the way is followed (root chose it, nobody else can change it)."""
    base = new_run_dir().parent  # /tmp/fdb-XXXX, root's own, 0755
    deep = base / ("d" * 100)
    (deep / "real").mkdir(parents=True)
    (deep / "link").symlink_to("real")
    run = deep / "link" / "sub" / "run"
    assert len(str(run / "conduit.sock")) > 108
    r, w = os.pipe()
    try:
        with checked_broker(["--socket-mode", "0666"], run_dir=run) as b:
            real = deep / "real" / "sub" / "run"
            st = os.stat(real)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
            for name in ("control.sock", "conduit.sock"):
                assert stat.S_ISSOCK(os.lstat(real / name).st_mode)
            with b.client() as c:
                c.put("trust/pipe", r)
                with c.get("trust/pipe") as got:
                    assert os.fstat(got.fileno()).st_ino == os.fstat(r).st_ino
                c.delete("trust/pipe")
            assert cli(run, "ls").returncode == 0
            # uid 65534 may use root's broker with nothing configured: root is always trusted.
            out = run_as(
                nobody_python,
                f"""
                import fdbroker, json, os
                with fdbroker.Client({str(run)!r}) as c:
                    c.connect()
                    print(json.dumps([c.identity[1], c.info().version]))
                """,
            )
            assert json.loads(out.stdout.strip().splitlines()[-1])[0] == NOBODY
    finally:
        os.close(r)
        os.close(w)
        shutil.rmtree(base)


# -- the client: whom it agrees to talk to ---------------------------------------------------------------------

# A fake broker run by uid 65534: a plain Unix listener on conduit.sock that sends a Welcome to whoever connects,
# and one on control.sock; it counts connections and the bytes it receives, and reports when stdin closes.
SQUATTER = r"""
import json, os, selectors, socket, sys
run, welcome, create = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3] == "create"
if create:
    os.mkdir(run, 0o755)
sel = selectors.DefaultSelector()
stats, listeners, conns = {}, {}, []
for name in ("conduit.sock", "control.sock"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(run, name))
    os.chmod(os.path.join(run, name), 0o666)
    s.listen(64)
    s.setblocking(False)
    listeners[name] = s
    stats[name] = {"connections": 0, "bytes": 0}
    sel.register(s, selectors.EVENT_READ, ("listen", name))
sel.register(sys.stdin, selectors.EVENT_READ, ("stdin", None))

def accept(name):
    while True:
        try:
            c, _ = listeners[name].accept()
        except BlockingIOError:
            return
        stats[name]["connections"] += 1
        if name == "conduit.sock":
            try:
                c.sendall(welcome)
            except OSError:  # the client already left
                pass
        c.setblocking(False)
        conns.append((c, name))
        sel.register(c, selectors.EVENT_READ, ("conn", name))

def drain(c, name):
    while True:
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        stats[name]["bytes"] += len(data)

print("ready", flush=True)
done = False
while not done:
    for key, _ in sel.select():
        kind, name = key.data
        if kind == "stdin":
            done = True
        elif kind == "listen":
            accept(name)
        elif not drain(key.fileobj, name):
            sel.unregister(key.fileobj)
for name in listeners:  # anything still queued or unread counts too
    accept(name)
for c, name in conns:
    drain(c, name)
print(json.dumps(stats), flush=True)
"""


class Squatter:
    """The fake broker above, running as uid 65534 in ``run`` (which it creates if ``create``)."""

    def __init__(self, python: list[str], run: Path, *, create: bool) -> None:
        welcome = encode_frame(cpb.ConduitFrame(welcome=cpb.Welcome(session_id="squatted", version="0.1.0")))
        self.proc = subprocess.Popen(
            [*python, "-c", SQUATTER, str(run), welcome.hex(), "create" if create else "use"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != "ready\n":
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the squatter did not start: {line!r}")

    def received(self) -> dict[str, dict[str, int]]:
        """Stop it; what it got: per socket, connections and bytes."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.stdout.close()
        assert self.proc.wait(timeout=30) == 0
        stats: dict[str, dict[str, int]] = json.loads(out.strip().splitlines()[-1])
        return stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@contextlib.contextmanager
def squatter(python: list[str], where: str) -> Iterator[tuple[Squatter, Path]]:
    """A fake broker of uid 65534 in a run directory root's client will be pointed at.

    ``squatted-dir``: 65534 created the run directory first (as it can under a shared temp dir when the client has
    no XDG_RUNTIME_DIR) and serves from it. ``planted-socket``: the directory is root's and closed again
    (0755), but 65534 bound both sockets while it was open: the directory passes, the sockets' owners do not.
    """
    base = sticky_base()
    run = base / "fdbroker-0"
    if where == "planted-socket":
        run.mkdir()
        os.chmod(run, 0o777)
    sq = Squatter(python, run, create=where == "squatted-dir")
    try:
        if where == "planted-socket":
            os.chmod(run, 0o755)
        yield sq, run
    finally:
        sq.kill()
        shutil.rmtree(base)


async def _aio_refusals(run: Path) -> list[UntrustedBroker]:
    out = []
    async with fdbroker.aio.Client(run, timeout=3) as c:
        for call in (c.connect, c.info):
            with pytest.raises(UntrustedBroker) as ei:
                await call()
            out.append(ei.value)
    return out


@pytest.mark.parametrize("where", ["squatted-dir", "planted-socket"])
def test_root_client_refuses_a_squatter_before_sending_anything(nobody_python: list[str], where: str) -> None:
    """Every client (sync, asyncio, quick, CLI), for a session and for an anonymous call, refuses a broker served
    by uid 65534 before it sends a single byte, and the error names the uid found and the uids trusted."""
    with squatter(nobody_python, where) as (sq, run):
        errors: list[UntrustedBroker] = []
        with Client(run, timeout=3) as c:
            for call in (c.connect, c.info, c.list):
                with pytest.raises(UntrustedBroker) as ei:
                    call()
                errors.append(ei.value)
        errors += asyncio.run(_aio_refusals(run))
        with pytest.raises(UntrustedBroker) as ei:
            QuickClient(run, timeout=3)
        errors.append(ei.value)
        r = cli(run, "ls")
        got = sq.received()
    for err in errors:
        assert err.uid == NOBODY and err.trusted == (0,), err
        assert err.code == Code.UNAUTHENTICATED
        text = " ".join(str(err).split())
        assert f"uid {NOBODY}" in text and ROOT_ONLY in text and "nothing was sent" in text, text
        assert f"{TRUST_UID_ENV}={NOBODY}" in text
    assert r.returncode == 14, r.stderr
    assert f"uid {NOBODY}" in r.stderr and ROOT_ONLY in " ".join(r.stderr.split())
    # Not one byte reached the squatter. A squatted directory is refused before anything connects; a planted
    # conduit is connected to (that is how SO_PEERCRED is read) and dropped; a planted control.sock is
    # refused by its owner before gRPC connects at all.
    assert got["conduit.sock"]["bytes"] == 0 and got["control.sock"]["bytes"] == 0, got
    assert got["control.sock"]["connections"] == 0, got
    if where == "squatted-dir":
        assert got["conduit.sock"]["connections"] == 0, got
        assert all(f"{run} is owned by uid {NOBODY}" in str(e) for e in errors)
    else:
        assert got["conduit.sock"]["connections"] == 4, got  # connect x2 (sync, aio), the quick client, ls
        assert any(f"{run / 'conduit.sock'} is served by uid {NOBODY} (pid " in str(e) for e in errors)
        assert any(f"{run / 'control.sock'} belongs to uid {NOBODY}" in str(e) for e in errors)


async def _aio_session(run: Path, trust: Any) -> str:
    async with fdbroker.aio.Client(run, timeout=3, trust_uids=trust) as c:
        return await c.connect()


@pytest.mark.parametrize("where", ["squatted-dir", "planted-socket"])
def test_a_uid_the_client_trusts_may_serve(
    nobody_python: list[str], where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same fake broker is accepted once its uid is trusted (Client argument, environment, by number or
    name), and then the client does talk to it: the refusal above is the trust check, nothing else."""
    name = pwd.getpwuid(NOBODY).pw_name
    with squatter(nobody_python, where) as (sq, run):
        with Client(run, timeout=3, trust_uids=[NOBODY]) as c:
            assert c.connect() == "squatted"
        assert asyncio.run(_aio_session(run, f"{name}")) == "squatted"
        monkeypatch.setenv(TRUST_UID_ENV, f"4242,{name}")
        with Client(run, timeout=1) as c:
            assert c.connect() == "squatted"
            with pytest.raises(Exception) as ei:
                c.info()
            assert not isinstance(ei.value, UntrustedBroker)
        # The argument replaces the environment: trusting nobody extra refuses again.
        with Client(run, timeout=3, trust_uids=()) as c, pytest.raises(UntrustedBroker):
            c.connect()
        got = sq.received()
    # three trusted sessions; the refused one connects only where the directory passes (to read SO_PEERCRED)
    assert got["conduit.sock"]["connections"] == 3 + (where == "planted-socket"), got
    assert got["control.sock"]["bytes"] > 0, got  # trusted: gRPC did connect and send its preface


def test_trust_between_root_and_a_broker_of_another_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real broker running as uid 65534 (in its own directory under a sticky parent, as it must): root's
    clients refuse it unless they trust uid 65534, then use it normally."""
    probe = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", "import fdbroker.broker.server"], capture_output=True, cwd="/"
    )
    if probe.returncode != 0:
        pytest.skip("uid 65534 cannot run this interpreter")
    base = sticky_base()
    run = base / "run"
    # The harness's own client (baseline, leak check) must trust the broker it started.
    monkeypatch.setenv(TRUST_UID_ENV, str(NOBODY))
    r, w = os.pipe()
    try:
        with checked_broker(["--socket-mode", "0666"], preexec=AS_NOBODY, run_dir=run):
            assert os.stat(run).st_uid == NOBODY
            monkeypatch.delenv(TRUST_UID_ENV)
            for call in ("info", "connect"):
                with Client(run, timeout=3) as c, pytest.raises(UntrustedBroker) as ei:
                    getattr(c, call)()
                text = " ".join(str(ei.value).split())
                assert f"{run} is owned by uid {NOBODY}" in text and ROOT_ONLY in text, text
            assert cli(run, "ls").returncode == 14
            monkeypatch.setenv(TRUST_UID_ENV, str(NOBODY))
            # Trusted: a root client does everything as usual.
            with Client(run, timeout=3, trust_uids=[NOBODY]) as c:
                c.put("root/pipe", r)
                assert c.identity is not None and c.identity[1] == 0
                with c.get("root/pipe") as got:
                    assert os.fstat(got.fileno()).st_ino == os.fstat(r).st_ino
                c.delete("root/pipe")
            assert asyncio.run(_aio_session(run, [NOBODY]))
            assert cli(run, "ls", env={TRUST_UID_ENV: str(NOBODY)}).returncode == 0
    finally:
        os.close(r)
        os.close(w)
        shutil.rmtree(base)


def test_the_conduit_peer_decides_even_in_a_trusted_directory(
    nobody_python: list[str],
) -> None:
    """SO_PEERCRED is what decides for the conduit, not the directory or the file: a socket root bound in
    root's directory but listened on by uid 65534 (the kernel records the listener) is refused."""
    base = new_run_dir().parent
    run = base / "run"
    run.mkdir(mode=0o755)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lsock.bind(str(run / "conduit.sock"))
        os.chmod(run / "conduit.sock", 0o666)
        code = (
            "import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); s.listen(4); "
            "print('ready', flush=True); c, _ = s.accept(); c.settimeout(5); print(len(c.recv(100)), flush=True)"
        )
        proc = subprocess.Popen(
            [*nobody_python, "-c", code, str(lsock.fileno())],
            pass_fds=[lsock.fileno()],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline() == "ready\n"
            assert os.lstat(run / "conduit.sock").st_uid == 0  # the file is root's; the listener is not
            with Client(run, timeout=3) as c, pytest.raises(UntrustedBroker) as ei:
                c.connect()
            assert f"is served by uid {NOBODY}" in str(ei.value)
            assert proc.stdout.readline() == "0\n"  # it saw us connect and leave, without a byte
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    finally:
        lsock.close()
        shutil.rmtree(base)


# -- settings and errors ---------------------------------------------------------------------------------------


def test_trust_settings_and_the_error() -> None:
    me = os.geteuid()
    name = pwd.getpwuid(NOBODY).pw_name
    assert Trust(environ={}).uids == {0, me}
    assert Trust(environ={TRUST_UID_ENV: f" 10001, {name},,"}).uids == {0, me, 10001, NOBODY}
    assert Trust([10001, name]).uids == Trust(f"10001,{name}").uids == {0, me, 10001, NOBODY}
    assert Trust((), environ={TRUST_UID_ENV: "10001"}).uids == {
        0,
        me,
    }  # the argument replaces the environment
    with pytest.raises(InvalidArgument) as ei:
        Trust(environ={TRUST_UID_ENV: "no-such-user-fdbroker"})
    assert TRUST_UID_ENV in str(ei.value) and "no-such-user-fdbroker" in str(ei.value)
    with pytest.raises(InvalidArgument):
        Trust([-1])
    err = UntrustedBroker("x", uid=NOBODY, trusted=(0,))
    assert err.code == Code.UNAUTHENTICATED and exit_code_for(err) == 14
