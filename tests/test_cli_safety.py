"""The CLI must not destroy data (issue 7, section 7).

A put the broker refuses leaves the system as it was: the file it opened keeps its content, size, mtime and ctime
in every mode, a file or unix socket file the command created is gone again, and a path that existed before is
never removed. Nothing irreversible (truncating, taking an entry, granting a lease) happens before the broker said
yes or before the command to run was found. A real broker, the CLI as a separate process (as root, and as uid
65534 against a policy that denies it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from secutil import NOBODY, custom_broker, unprivileged_python

from fdbroker.testing import BrokerProcess

MODES = ("r", "w", "a", "rw")
OLD_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09: any write would move the mtime away from it
DATA = b"precious data, not to be lost\n"


def variants() -> list[tuple[str, list[str]]]:
    """Every way to open a file: each mode plain (first: what main already had), then with --create, and the
    writable modes with --truncate, with or without --create."""
    out: list[tuple[str, list[str]]] = [(mode, []) for mode in MODES]
    for mode in MODES:
        out.append((mode, ["--create"]))
        if mode != "r":
            out += [(mode, ["--truncate"]), (mode, ["--create", "--truncate"])]
    return out


def cli(
    run_dir: BrokerProcess | Path, *args: str, prefix: Sequence[str] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``fdbroker ARGS`` as a separate process; with ``prefix`` (see ``unprivileged_python``) as another uid."""
    rd = run_dir.run_dir if isinstance(run_dir, BrokerProcess) else run_dir
    if prefix:
        cmd = [*prefix[:-1], f"FDBROKER_RUN_DIR={rd}", prefix[-1], "-m", "fdbroker", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    env = dict(os.environ, FDBROKER_RUN_DIR=str(rd))
    return subprocess.run(
        [sys.executable, "-m", "fdbroker", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def refused(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, f"expected exit {code}, got {r.returncode}\n{r.stdout}{r.stderr}"
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def precious(path: Path) -> Path:
    path.write_bytes(DATA)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return path


def snapshot(path: Path) -> tuple[bytes, int, int, int, int]:
    """What a put must not change: content, size, mtime, ctime, and which inode is there."""
    st = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
    return content, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (sun_path is 108 bytes) that other uids may enter."""
    d = Path(tempfile.mkdtemp(prefix="fdbsafe-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- refused puts ----------------------------------------------------------------------------------------------


def test_refused_put_leaves_the_file_as_it_was(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    # On main: --mode w opened with O_TRUNC, so the refused put emptied the file.
    ok(cli(fdbroker_broker, "put", "taken", "--file", "/dev/null"))
    target = precious(tmp_path / "data.txt")
    before = snapshot(target)
    for mode, extra in variants():
        r = cli(fdbroker_broker, "put", "taken", "--file", str(target), "--mode", mode, *extra)
        refused(r, 5, "'taken' already exists")
        assert snapshot(target) == before, (mode, extra)
    # Another kind of refusal (a revision mismatch on --replace): the same.
    r = cli(
        fdbroker_broker,
        *(
            "put",
            "taken",
            "--file",
            str(target),
            "--mode",
            "w",
            "--truncate",
            "--replace",
            "--if-revision",
            "999",
        ),
    )
    refused(r, 6)
    assert snapshot(target) == before
    assert os.listdir(tmp_path) == ["data.txt"]


def test_refused_put_creates_no_file(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    # On main: w, a and rw opened with O_CREAT, so a put of a missing path created it, refused or not.
    ok(cli(fdbroker_broker, "put", "taken", "--file", "/dev/null"))
    missing = tmp_path / "new.log"
    for mode in MODES:
        # Without --create a missing file is an error before the broker is asked (even for a free name).
        for name in ("taken", "fresh"):
            r = cli(fdbroker_broker, "put", name, "--file", str(missing), "--mode", mode)
            assert not os.path.lexists(missing), (mode, name)
            refused(r, 4)
    assert "no such file (--create creates it)" in r.stderr
    for mode, extra in variants():
        if "--create" in extra:  # made, and removed again when the broker refuses the put
            r = cli(fdbroker_broker, "put", "taken", "--file", str(missing), "--mode", mode, *extra)
            refused(r, 5, "'taken' already exists")
            assert not os.path.lexists(missing), (mode, extra)
    assert os.listdir(tmp_path) == []
    assert fdb_names(fdbroker_broker) == ["taken"]
    # Accepted, the created file stays (the broker holds it open).
    ok(cli(fdbroker_broker, "put", "made", "--file", str(missing), "--mode", "a", "--create"))
    assert missing.read_bytes() == b""


def test_refused_unix_listener_leaves_no_socket_file_and_no_path_is_removed(
    fdbroker_broker: BrokerProcess, short_dir: Path
) -> None:
    # On main: the socket file bound before the refused put stayed behind.
    ok(cli(fdbroker_broker, "put", "taken", "--file", "/dev/null"))
    new = short_dir / "new.sock"
    refused(cli(fdbroker_broker, "put", "taken", "--listen", f"unix:{new}"), 5, "'taken' already exists")
    assert not os.path.lexists(new)

    # Paths that exist are never removed or replaced, whatever they are and whether or not the name is taken.
    regular = precious(short_dir / "regular")
    stale = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on any more
    dangling = short_dir / "dangling"
    dangling.symlink_to(short_dir / "nowhere")
    before = {p: snapshot(p) for p in (regular, stale)}
    for p in (regular, stale, dangling):
        for name in ("taken", "fresh"):
            refused(cli(fdbroker_broker, "put", name, "--listen", f"unix:{p}"), 5)
    assert {p: snapshot(p) for p in (regular, stale)} == before
    assert os.readlink(dangling) == str(short_dir / "nowhere")
    assert sorted(os.listdir(short_dir)) == ["dangling", "regular", "stale.sock"]
    assert fdb_names(fdbroker_broker) == ["taken"]

    # Accepted, the socket file stays: the broker holds the listener.
    ok(cli(fdbroker_broker, "put", "sock", "--listen", f"unix:{new}"))
    assert stat.S_ISSOCK(os.lstat(new).st_mode)


@pytest.fixture(scope="module")
def nobody() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as uid 65534")
    cmd = unprivileged_python()
    if cmd is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    return cmd


DENY_FROZEN = """
[[rule]]
uids = [65534]
names = ["frozen/**"]
deny = ["put"]
"""


def test_policy_denied_put_leaves_everything_as_it_was(
    nobody: list[str], short_dir: Path, tmp_path: Path
) -> None:
    # On main: the denied put with --mode w emptied the file (and w/a/rw created missing ones).
    policy = tmp_path / "policy.toml"
    policy.write_text(DENY_FROZEN)
    os.chown(short_dir, NOBODY, NOBODY)  # so that creating a file is up to the broker's answer alone
    target = precious(short_dir / "data")
    os.chown(target, NOBODY, NOBODY)
    before = snapshot(target)
    with custom_broker(["--socket-mode", "0666", "--policy", str(policy)]) as b:
        for mode, extra in variants():
            r = cli(b, "put", "frozen/x", "--file", str(target), "--mode", mode, *extra, prefix=nobody)
            refused(r, 7, "frozen/x", "uid 65534")
            assert snapshot(target) == before, (mode, extra)
        for mode in MODES:
            r = cli(
                b,
                "put",
                "frozen/x",
                "--file",
                str(short_dir / "new"),
                "--mode",
                mode,
                "--create",
                prefix=nobody,
            )
            refused(r, 7, "frozen/x")
        refused(cli(b, "put", "frozen/x", "--listen", f"unix:{short_dir / 'n.sock'}", prefix=nobody), 7)
        assert os.listdir(short_dir) == ["data"]
        assert snapshot(target) == before

        # The same put under a name the policy allows works: the refusals above were the broker's.
        ok(cli(b, "put", "mine/x", "--file", str(target), "--mode", "w", "--truncate", prefix=nobody))
        assert target.read_bytes() == b""
        ok(cli(b, "rm", "mine/x"))


# -- truncation ------------------------------------------------------------------------------------------------


def test_truncate_happens_only_once_the_broker_stored_the_entry(
    fdbroker_broker: BrokerProcess, tmp_path: Path
) -> None:
    # On main there is no --truncate (exit 2 everywhere): --mode w truncated at open, before any answer.
    target = precious(tmp_path / "out.txt")
    before = snapshot(target)
    # Without --truncate even an accepted --mode w put leaves the file alone.
    ok(cli(fdbroker_broker, "put", "plain", "--file", str(target), "--mode", "w"))
    assert snapshot(target) == before
    ok(cli(fdbroker_broker, "put", "taken", "--file", "/dev/null"))
    refused(cli(fdbroker_broker, "put", "taken", "--file", str(target), "--mode", "w", "--truncate"), 5)
    assert snapshot(target) == before

    ok(cli(fdbroker_broker, "put", "log", "--file", str(target), "--mode", "w", "--truncate"))
    assert target.read_bytes() == b""
    # The entry is that very file, open for writing: what its holder writes lands in it.
    ok(cli(fdbroker_broker, "get", "log", "--", *py("import os; os.write(3, b'new')")))
    assert target.read_bytes() == b"new"

    # Misuse is refused before anything is opened or asked.
    target = precious(tmp_path / "other.txt")
    before = snapshot(target)
    refused(cli(fdbroker_broker, "put", "x", "--file", str(target), "--truncate"), 2, "writable")  # --mode r
    refused(cli(fdbroker_broker, "put", "x", "--listen", "tcp://127.0.0.1:0", "--truncate"), 2, "--file")
    refused(cli(fdbroker_broker, "put", "x", "--fd", "0", "--create"), 2, "--file")
    refused(
        cli(fdbroker_broker, "put", "x", "--file", "/dev/null", "--mode", "w", "--truncate"), 3, "regular"
    )
    assert snapshot(target) == before
    assert sorted(fdb_names(fdbroker_broker)) == ["log", "plain", "taken"]


def test_writable_modes_do_not_follow_a_symlink(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    # On main: `put --file LINK --mode w` truncated whatever LINK pointed at.
    target = precious(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(target)
    for mode in ("w", "a", "rw"):
        for extra in ([], ["--truncate"], ["--create"]):
            r = cli(fdbroker_broker, "put", "s", "--file", str(link), "--mode", mode, *extra)
            refused(r, 3, "symbolic link")
            assert snapshot(target) == before, (mode, extra)
    assert fdb_names(fdbroker_broker) == []
    # Reading through a symlink changes nothing, so --mode r follows it.
    assert f"file {target}" in ok(cli(fdbroker_broker, "put", "s", "--file", str(link)))
    assert snapshot(target) == before


# -- commands: found before the broker is asked ----------------------------------------------------------------


def test_a_missing_command_costs_nothing(fdbroker_broker: BrokerProcess, short_dir: Path) -> None:
    # On main: `take t -- typo` removed the entry and then failed to run typo (the descriptor was lost);
    # `lease` granted and released a lease (a fencing epoch spent); `put --ephemeral` bound and left a socket file.
    f = precious(short_dir / "data")
    ok(cli(fdbroker_broker, "put", "t", "--file", str(f)))
    before = json.loads(ok(cli(fdbroker_broker, "stat", "t", "--json")))
    not_exec = short_dir / "not-executable"
    not_exec.write_text("#!/bin/sh\n")
    for verb in (["take", "t"], ["get", "t"], ["exec", "t"], ["lease", "t", "--ttl", "5s"]):
        for cmd, code in (("no-such-command-fdb", 127), (str(not_exec), 126)):
            refused(cli(fdbroker_broker, *verb, "--", cmd), code, cmd)
            assert fdb_names(fdbroker_broker) == ["t"], (verb, cmd)
    after = json.loads(ok(cli(fdbroker_broker, "stat", "t", "--json")))
    assert after["revision"] == before["revision"]
    assert after["lease"]["epoch"] == before["lease"]["epoch"]

    sock = short_dir / "e.sock"
    r = cli(
        fdbroker_broker, "put", "e", "--listen", f"unix:{sock}", "--ephemeral", "--", "no-such-command-fdb"
    )
    refused(r, 127)
    new = short_dir / "new"
    r = cli(
        fdbroker_broker,
        *(
            "put",
            "e",
            "--file",
            str(new),
            "--mode",
            "w",
            "--create",
            "--ephemeral",
            "--",
            "no-such-command-fdb",
        ),
    )
    refused(r, 127)
    assert sorted(os.listdir(short_dir)) == ["data", "not-executable"]
    assert fdb_names(fdbroker_broker) == ["t"]


def fdb_names(broker: BrokerProcess) -> list[str]:
    return [e["name"] for e in json.loads(ok(cli(broker, "ls", "--json")))]


# -- the clean-up itself ---------------------------------------------------------------------------------------


def test_cleanup_removes_only_what_this_command_created(short_dir: Path) -> None:
    """The undo step, in process: it removes the very file or socket file it created, and nothing that took its
    place or was written into meanwhile. (On main there is no undo step: the names do not exist.)"""
    from fdbroker.cli.source import open_file, open_listen

    made = short_dir / "made"
    fd, created = open_file(str(made), "w", create=True)
    assert created is not None
    created.remove()
    created.close()
    os.close(fd)
    assert not os.path.lexists(made)

    # Someone wrote into the file we created: their data stays.
    fd, created = open_file(str(made), "w", create=True)
    assert created is not None
    with open(made, "ab") as other:
        other.write(b"theirs")
    created.remove()
    created.close()
    os.close(fd)
    assert made.read_bytes() == b"theirs"

    # An existing file is opened, not created: nothing to undo.
    fd, created = open_file(str(made), "rw", create=True)
    os.close(fd)
    assert created is None

    # A socket file replaced after bind (by a regular file, or by another socket): the replacement stays.
    path = short_dir / "l.sock"
    for replace in ("file", "socket"):
        sock, screated = open_listen(f"unix:{path}", 1)
        assert screated is not None
        os.unlink(path)
        other_sock = socket.socket(socket.AF_UNIX)
        if replace == "file":
            precious(path)
        else:
            other_sock.bind(str(path))
        screated.remove()
        screated.close()
        sock.close()
        other_sock.close()
        assert os.path.lexists(path), replace
        os.unlink(path)

    sock, screated = open_listen(f"unix:{path}", 1)
    assert screated is not None
    screated.remove()
    screated.close()
    sock.close()
    assert not os.path.lexists(path)
    # An abstract socket has no file to undo.
    sock, screated = open_listen(f"unix:@fdbsafe-{os.getpid()}", 1)
    sock.close()
    assert screated is None


def test_an_unknown_outcome_removes_nothing(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only a definite refusal undoes --create: after a deadline, a broken conduit or Ctrl-C the entry may exist
    (holding the very file), so the file stays and a note says so. (In process: the race is not reproducible.)"""
    from fdbroker.cli.source import Source, open_file
    from fdbroker.errors import AlreadyExists, Cancelled, DeadlineExceeded, PermissionDenied

    made = short_dir / "made"
    for err, removed in (
        (DeadlineExceeded("no answer"), False),
        (Cancelled("cancelled"), False),
        (KeyboardInterrupt(), False),
        (AlreadyExists("exists"), True),
        (PermissionDenied("denied"), True),
    ):
        fd, created = open_file(str(made), "w", create=True)
        src = Source(fd, str(made), fd, created, truncate=True)
        src.refused(err, "n")
        src.close()
        assert os.path.lexists(made) != removed, err
        note = capsys.readouterr().err
        assert ("whether the broker stored 'n' is unknown" in note) != removed, note
        if not removed:
            os.unlink(made)
