"""The ``fdbroker`` command line, end to end: a real broker (``fdbroker_broker``), the CLI run as a separate
process (``python -m fdbroker``), and real descriptors proven to work in the commands it starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fdbroker.cli import VERBS
from fdbroker.cli.format import human_duration, parse_duration
from fdbroker.testing import BrokerProcess


def fdb_env(run_dir: Path | str) -> dict[str, str]:
    env = dict(os.environ)
    env["FDBROKER_RUN_DIR"] = str(run_dir)
    return env


def fdb(
    broker: BrokerProcess | Path | str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    run_dir = broker.run_dir if isinstance(broker, BrokerProcess) else broker
    return subprocess.run(
        [sys.executable, "-m", "fdbroker", *args],
        env=fdb_env(run_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def put_listener(broker: BrokerProcess, name: str) -> int:
    out = ok(fdb(broker, "put", name, "--listen", "tcp://127.0.0.1:0"))
    m = re.search(r"127\.0\.0\.1:(\d+)", out)
    assert m, out
    return int(m.group(1))


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# -- values ----------------------------------------------------------------------------------------------------


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("10s") == 10
    assert parse_duration("5m") == 300
    assert parse_duration("1h") == 3600
    assert parse_duration("1m30s") == 90
    assert parse_duration("2.5") == 2.5
    for bad in ("", "10x", "s", "-1", "1h-"):
        with pytest.raises(Exception, match="duration"):
            parse_duration(bad)
    assert [human_duration(x) for x in (3.9, 300, 7200, 4 * 86400)] == ["3s", "5m", "2h", "4d"]


def test_every_verb_has_a_manual_page() -> None:
    for verb in VERBS:
        r = subprocess.run(
            [sys.executable, "-m", "fdbroker", verb, "--help"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        for section in ("usage: fdbroker " + verb, "options:", "exit codes:", "example:"):
            assert section in r.stdout, f"{verb} --help lacks {section!r}"
    r = subprocess.run([sys.executable, "-m", "fdbroker", "serve", "--help"], capture_output=True, text=True)
    assert "--policy" in r.stdout  # the serve options come from fdbroker.broker.server.add_arguments


# -- the package: one table of exit codes, one module per verb, no broker code ---------------------------------

ROOT = Path(__file__).resolve().parents[1]
CLI_DIR = ROOT / "src" / "fdbroker" / "cli"
# What runs only inside `fdbroker serve`, under the names it has before and after the broker/ package move.
BROKER_SIDE = (
    "fdbroker.broker",
    "fdbroker.server",
    "fdbroker.servicer",
    "fdbroker.registry",
    "fdbroker.tokens",
    "fdbroker.sessions",
    "fdbroker.leases",
    "fdbroker.policy",
    "fdbroker.delivery",
    "fdbroker.conduit_server",
    "fdbroker.handover",
    "fdbroker.fdstore",
    "fdbroker.notify",
    "fdbroker.watch",
    "fdbroker.closer",
    "fdbroker.keeper",
    "fdbroker.metrics",
)


def test_docs_exit_code_table_is_generated_from_the_one_table() -> None:
    from fdbroker.cli import exitcodes

    doc = (ROOT / "docs" / "cli.md").read_text()
    assert exitcodes.replace_in(doc) == doc, (
        "docs/cli.md's exit codes differ from fdbroker.cli.exitcodes.TABLE: "
        "run `python -m fdbroker.cli.exitcodes --update docs/cli.md`"
    )
    codes = [row.code for row in exitcodes.TABLE]
    assert codes == sorted(set(codes)), "one row per code, in order"


def test_exit_code_for_every_error() -> None:
    from fdbroker import errors
    from fdbroker.cli import exitcodes

    expected = {
        errors.Code.INVALID_ARGUMENT: 3,
        errors.Code.NOT_FOUND: 4,
        errors.Code.ALREADY_EXISTS: 5,
        errors.Code.FAILED_PRECONDITION: 6,
        errors.Code.PERMISSION_DENIED: 7,
        errors.Code.UNAUTHENTICATED: 7,
        errors.Code.RESOURCE_EXHAUSTED: 8,
        errors.Code.DEADLINE_EXCEEDED: 9,
        errors.Code.UNAVAILABLE: 10,
        errors.Code.OUT_OF_RANGE: 11,
        errors.Code.ABORTED: 12,
        errors.Code.CANCELLED: 12,
    }
    for code in errors.Code:
        err = errors.error_for_code(code, "x")
        want = expected.get(code, 13)
        assert exitcodes.exit_code_for(err) == want, code
    untrusted = errors.UntrustedBroker("x", uid=1, trusted=(0,))
    assert exitcodes.exit_code_for(untrusted) == 14
    assert exitcodes.exit_code_for(errors.OutcomeUnknown("x", operation="put", name="a")) == 15
    for row in exitcodes.TABLE:
        for name in row.grpc:
            assert name in errors.Code.__members__, (row.code, name)


def test_each_page_lists_the_exit_codes_of_its_verb() -> None:
    from fdbroker.cli import app

    for name in VERBS:
        epilog = app.load(name).parser_kwargs()["epilog"]
        listed = set(re.findall(r"^  (\d+) ", epilog.split("\n\n")[0], re.M))
        takes_cmd = name in ("put", "get", "exec", "take", "lease")
        assert ("126" in listed) == ("127" in listed) == takes_cmd, name
        talks = name not in ("serve", "completion")  # the verbs that are clients of a broker
        assert ("1" in listed) == (name == "serve"), name
        assert ("14" in listed) == talks, name
        assert ("130" in listed) == (talks and name != "watch"), name
        assert max(len(line) for line in epilog.splitlines()) <= 105, name


def _imports(path: Path) -> set[str]:
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_the_cli_imports_no_broker_code() -> None:
    """serve hands the process to the broker through one lazy import, by name, in serve.py; no other module of
    the CLI names a broker-side module, at the top or inside a function."""
    for path in sorted(CLI_DIR.glob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(BROKER_SIDE)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_a_verb_loads_only_itself() -> None:
    """Cold start: `fdbroker ls --help` and an `ls` that finds no broker load neither gRPC, asyncio, the broker
    nor any other verb's module."""
    code = textwrap.dedent(
        """
        import sys
        from fdbroker.cli import main
        argv = sys.argv[1:]
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        print(rc, " ".join(sorted(m for m in sys.modules if m.startswith(("fdbroker", "grpc", "asyncio")))))
        """
    )
    for argv in (["ls", "--help"], ["ls"], ["stat", "x"]):
        r = subprocess.run(
            [sys.executable, "-c", code, *argv],
            env=fdb_env("/nonexistent/fdbroker-run"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        rc, _, loaded = r.stdout.splitlines()[-1].partition(" ")
        modules = set(loaded.split())
        assert rc == ("0" if "--help" in argv else "10"), (argv, r.stdout, r.stderr)
        assert not {m for m in modules if m.startswith(("grpc", "asyncio", *BROKER_SIDE))}, (argv, modules)
        verbs = {m.rsplit(".", 1)[1] for m in modules if m.startswith("fdbroker.cli.")} & set(VERBS.values())
        assert verbs == {argv[0]}, (argv, modules)


# -- descriptors through the CLI, proven in the commands it starts ----------------------------------------------


def test_put_listen_tcp_then_exec_serves_on_fd3(fdbroker_broker: BrokerProcess) -> None:
    port = put_listener(fdbroker_broker, "web")
    child = py(
        """
        import os, socket
        from fdbroker.activation import listen_fds
        assert listen_fds() == [(3, "web")], os.environ
        s = socket.socket(fileno=3)
        c, _ = s.accept()
        c.sendall(b"served by %d" % os.getpid())
        c.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdbroker", "exec", "web", "--", *child],
        env=fdb_env(fdbroker_broker.run_dir),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            got = b""
            while chunk := c.recv(100):
                got += chunk
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # exec replaced the CLI: the server's pid is the pid we started.
    assert got == b"served by %d" % proc.pid


def test_put_file_then_get_and_exec_several(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("file contents\n")
    out = ok(fdb(fdbroker_broker, "put", "cfg/data", "--file", str(data), "--label", "team=core"))
    assert out.startswith("cfg/data: file ")
    port = put_listener(fdbroker_broker, "web")

    # get -- CMD: the file as fd 3.
    r = fdb(
        fdbroker_broker, "get", "cfg/data", "--", *py("import os; print(os.read(3, 100).decode(), end='')")
    )
    assert ok(r) == "file contents\n"

    # get without CMD: fetched, described, closed.
    assert ok(fdb(fdbroker_broker, "get", "cfg/data")).startswith(f"cfg/data: file {data}")

    # exec of two entries: fd 3 and 4 in order, names in LISTEN_FDNAMES.
    code = """
        import os, socket
        print(os.environ["LISTEN_FDS"], os.environ["LISTEN_FDNAMES"], os.environ["LISTEN_PID"] == str(os.getpid()))
        print(os.pread(4, 100, 0).decode(), end="")
        print(socket.socket(fileno=3).getsockname()[1])
        """
    lines = ok(fdb(fdbroker_broker, "exec", "web", "cfg/data", "--", *py(code))).splitlines()
    assert lines == ["2 web:cfg/data True", "file contents", str(port)]

    # Command not found: 127, and the message names it.
    r = fdb(fdbroker_broker, "get", "cfg/data", "--", "no-such-command-fdbroker")
    assert r.returncode == 127
    assert "no-such-command-fdbroker" in r.stderr

    # A CMD's own failure status passes through.
    assert fdb(fdbroker_broker, "get", "cfg/data", "--", *py("raise SystemExit(42)")).returncode == 42


def test_take_moves_the_entry(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("taken")
    ok(fdb(fdbroker_broker, "put", "t", "--file", str(f)))
    assert (
        ok(fdb(fdbroker_broker, "take", "t", "--", *py("import os; print(os.read(3, 10).decode())")))
        == "taken\n"
    )
    assert fdb(fdbroker_broker, "stat", "t").returncode == 4


def test_ls_stat_rm(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    assert ok(fdb(fdbroker_broker, "ls")) == ""
    assert json.loads(ok(fdb(fdbroker_broker, "ls", "--json"))) == []
    port = put_listener(fdbroker_broker, "web/http")
    log = tmp_path / "audit.log"
    ok(
        fdb(
            fdbroker_broker,
            "put",
            "log/audit",
            "--file",
            str(log),
            "--mode",
            "a",
            "--create",
            "--label",
            "tier=log",
            "--ttl",
            "1h",
        )
    )
    assert log.exists()  # --create creates

    table = ok(fdb(fdbroker_broker, "ls")).splitlines()
    assert table[0].split() == ["NAME", "KIND", "DETAIL", "OWNER", "AGE", "EXPIRES", "LEASE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"web/http", "log/audit"}
    assert rows["web/http"][1:3] == ["tcp-listener", f"127.0.0.1:{port}"]
    assert rows["log/audit"][1:3] == ["file", str(log)]
    assert rows["log/audit"][-2] in ("59m", "1h")  # EXPIRES
    assert rows["web/http"][-2:] == ["-", "-"]
    # Columns are aligned: every row has KIND at the same offset.
    assert len({line.index(rows[line.split()[0]][1]) for line in table[1:]}) == 1

    listing = json.loads(ok(fdb(fdbroker_broker, "ls", "--json")))
    by_name = {e["name"]: e for e in listing}
    assert by_name["log/audit"]["labels"] == {"tier": "log"}
    assert by_name["log/audit"]["access_mode"] == "w" and "O_APPEND" in by_name["log/audit"]["flags"]
    assert by_name["web/http"]["local_address"] == f"127.0.0.1:{port}"

    # Prefix and selector.
    assert [e["name"] for e in json.loads(ok(fdb(fdbroker_broker, "ls", "web/", "--json")))] == ["web/http"]
    sel = json.loads(ok(fdb(fdbroker_broker, "ls", "--selector", "tier=log", "--json")))
    assert [e["name"] for e in sel] == ["log/audit"]

    st = ok(fdb(fdbroker_broker, "stat", "log/audit"))
    assert "labels:    tier=log" in st and f"path:      {log}" in st
    sj = json.loads(ok(fdb(fdbroker_broker, "stat", "web/http", "--json")))
    assert sj["kind"] == "tcp-listener" and sj["listening"] is True

    # rm with a wrong revision: 6; right revision: gone.
    assert fdb(fdbroker_broker, "rm", "web/http", "--if-revision", str(sj["revision"] + 100)).returncode == 6
    ok(fdb(fdbroker_broker, "rm", "web/http", "--if-revision", str(sj["revision"])))
    r = fdb(fdbroker_broker, "stat", "web/http")
    assert r.returncode == 4
    assert "web/http" in r.stderr and r.stderr.startswith("fdbroker stat: ")
    assert [e["name"] for e in json.loads(ok(fdb(fdbroker_broker, "ls", "--json")))] == ["log/audit"]


def test_status(fdbroker_broker: BrokerProcess) -> None:
    text = ok(fdb(fdbroker_broker, "status"))
    assert f"pid {fdbroker_broker.pid}" in text
    assert str(fdbroker_broker.run_dir) in text
    put_listener(fdbroker_broker, "s")
    data = json.loads(ok(fdb(fdbroker_broker, "status", "--json")))
    assert data["serving"] is True
    assert data["broker_pid"] == fdbroker_broker.pid
    assert data["entries"] == 1
    assert data["run_dir"] == str(fdbroker_broker.run_dir)
    assert data["max_entries"] > 0 and data["version"]


# -- exit codes ------------------------------------------------------------------------------------------------


def test_exit_codes(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("x")
    r = fdb(fdbroker_broker, "put", "bad:name", "--file", str(f))
    assert r.returncode == 3 and "bad:name" in r.stderr
    assert fdb(fdbroker_broker, "put", "../up", "--file", str(f)).returncode == 3
    r = fdb(fdbroker_broker, "get", "missing", "--", "true")
    assert r.returncode == 4 and "missing" in r.stderr
    assert fdb(fdbroker_broker, "rm", "missing").returncode == 4
    assert fdb(fdbroker_broker, "take", "missing").returncode == 4
    ok(fdb(fdbroker_broker, "put", "x", "--file", str(f)))
    r = fdb(fdbroker_broker, "put", "x", "--file", str(f))
    assert r.returncode == 5 and "--replace" in r.stderr
    ok(fdb(fdbroker_broker, "put", "x", "--file", str(f), "--replace"))
    # Local failures use the same table: a missing file is 4, a bad address 3.
    assert fdb(fdbroker_broker, "put", "y", "--file", str(tmp_path / "nope")).returncode == 4
    assert fdb(fdbroker_broker, "put", "y", "--listen", "tcp://127.0.0.1").returncode == 3
    assert fdb(fdbroker_broker, "put", "y", "--listen", "sctp://127.0.0.1:1").returncode == 3
    # Usage errors: 2.
    assert fdb(fdbroker_broker, "exec", "x").returncode == 2  # no CMD
    assert fdb(fdbroker_broker, "put", "y").returncode == 2  # no source
    assert fdb(fdbroker_broker, "lease", "x", "--", "true").returncode == 2  # no --ttl
    assert fdb(fdbroker_broker, "put", "y", "--file", str(f), "--ephemeral").returncode == 2
    assert fdb(fdbroker_broker, "ls", "--timeout", "soon").returncode == 2


def test_broker_not_running_says_how_to_start_one(tmp_path: Path) -> None:
    # A run directory that exists but where no broker serves.
    empty = tmp_path / "run"
    empty.mkdir()
    for verb in (["ls"], ["status"], ["stat", "x"], ["put", "x", "--listen", "tcp://127.0.0.1:0"]):
        r = fdb(empty, *verb)
        assert r.returncode == 10, (verb, r.stderr)
        assert f"fdbroker serve --run-dir {empty}" in r.stderr
        assert r.stderr.startswith(f"fdbroker {verb[0]}: ")
    # An unknown run directory.
    r = fdb(tmp_path / "no" / "such", "ls")
    assert r.returncode == 10
    assert "does not exist" in r.stderr and "fdbroker serve" in r.stderr
    # --run-dir wins over the environment.
    r = subprocess.run(
        [sys.executable, "-m", "fdbroker", "ls", "--run-dir", str(tmp_path / "other")],
        env=fdb_env(empty),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 10 and str(tmp_path / "other") in r.stderr


# -- watch, lease, ephemeral -----------------------------------------------------------------------------------


def test_watch_prints_events(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    rev = json.loads(ok(fdb(fdbroker_broker, "status", "--json")))["revision"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdbroker", "watch", "w/", "--start-revision", str(rev + 1)],
        env=fdb_env(fdbroker_broker.run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        f = tmp_path / "w"
        f.write_text("w")
        ok(fdb(fdbroker_broker, "put", "other", "--file", str(f)))  # outside the prefix
        ok(fdb(fdbroker_broker, "put", "w/one", "--file", str(f)))
        ok(fdb(fdbroker_broker, "rm", "w/one"))
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        second = proc.stdout.readline().split()
        assert first[1:4] == ["put", "w/one", "file"]
        assert second[1:3] == ["delete", "w/one"]
        assert int(second[0]) > int(first[0]) > rev
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert err == ""


def test_watch_json(fdbroker_broker: BrokerProcess) -> None:
    put_listener(fdbroker_broker, "j")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdbroker", "watch", "--json", "--start-revision", "1"],
        env=fdb_env(fdbroker_broker.run_dir),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ev = json.loads(proc.stdout.readline())
        proc.terminate()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert ev["type"] == "put" and ev["name"] == "j" and ev["entry"]["kind"] == "tcp-listener"
    assert proc.returncode == 0


def test_lease_runs_cmd_holding_the_lease(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    f = tmp_path / "l"
    f.write_text("leased data")
    ok(fdb(fdbroker_broker, "put", "db", "--file", str(f)))
    child = py(
        """
        import json, os, subprocess, sys
        assert os.environ["LISTEN_PID"] == str(os.getpid()), os.environ
        assert os.environ["LISTEN_FDNAMES"] == "db"
        print(os.read(3, 100).decode())
        print(os.environ["FDBROKER_LEASE_EPOCH"], os.environ["FDBROKER_LEASE_ID"] != "")
        st = json.loads(subprocess.run([sys.executable, "-m", "fdbroker", "stat", "db", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
        print(st["lease"]["mode"], st["lease"]["epoch"])
        # A second, exclusive lease attempt fails at once with 6 while we hold ours.
        r = subprocess.run([sys.executable, "-m", "fdbroker", "lease", "db", "--ttl", "5s", "--", "true"],
                           capture_output=True, text=True)
        print(r.returncode)
        sys.exit(7)
        """
    )
    r = fdb(fdbroker_broker, "lease", "db", "--ttl", "5s", "--", *child)
    assert r.returncode == 7, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "leased data"
    epoch, has_id = lines[1].split()
    assert int(epoch) > 0 and has_id == "True"
    assert lines[2] == f"exclusive {epoch}"
    assert lines[3] == "6"
    # Released on exit.
    st = json.loads(ok(fdb(fdbroker_broker, "stat", "db", "--json")))
    assert st["lease"]["mode"] == "" and st["lease"]["holders"] == []
    # The next grant has a larger epoch; a command killed by a signal gives 128+N.
    r = fdb(
        fdbroker_broker,
        "lease",
        "db",
        "--ttl",
        "5s",
        "--shared",
        "--",
        *py(
            "import os, signal; print(os.environ['FDBROKER_LEASE_EPOCH'], flush=True); "
            "os.kill(os.getpid(), signal.SIGTERM)"
        ),
    )
    assert r.returncode == 128 + 15
    assert int(r.stdout.split()[0]) > int(epoch)


def test_lease_forwards_sigterm(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    f = tmp_path / "l"
    f.write_text("x")
    ok(fdb(fdbroker_broker, "put", "held", "--file", str(f)))
    child = py(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(33))
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdbroker", "lease", "held", "--ttl", "5s", "--", *child],
        env=fdb_env(fdbroker_broker.run_dir),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # no terminal: the signal comes only from us
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.terminate()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 33
    assert json.loads(ok(fdb(fdbroker_broker, "stat", "held", "--json")))["lease"]["mode"] == ""


def test_ephemeral_put_lives_while_cmd_runs(fdbroker_broker: BrokerProcess) -> None:
    child = py(
        """
        import json, subprocess, sys
        out = subprocess.run([sys.executable, "-m", "fdbroker", "ls", "--json"], capture_output=True, text=True,
                             check=True).stdout
        print([(e["name"], e["ephemeral"]) for e in json.loads(out)])
        """
    )
    r = fdb(fdbroker_broker, "put", "eph", "--listen", "tcp://127.0.0.1:0", "--ephemeral", "--", *child)
    assert ok(r).splitlines()[-1] == "[('eph', True)]"
    assert fdb(fdbroker_broker, "stat", "eph").returncode == 4


def test_put_unix_and_udp_and_fd(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="fdbcli-", dir="/tmp")) / "s.sock"
    try:
        assert "unix listener" in ok(fdb(fdbroker_broker, "put", "u", "--listen", f"unix:{path}"))
        assert "udp 127.0.0.1:" in ok(fdb(fdbroker_broker, "put", "d", "--listen", "udp://127.0.0.1:0"))
        assert "[::1]:" in ok(fdb(fdbroker_broker, "put", "six", "--listen", "tcp://[::1]:0"))
        # The broker holds the unix listener after the CLI exited: a connection is accepted by a get'ed copy.
        code = "import socket; s = socket.socket(fileno=3); c, _ = s.accept(); c.sendall(b'u!'); c.close()"
        proc = subprocess.Popen(
            [sys.executable, "-m", "fdbroker", "get", "u", "--", *py(code)],
            env=fdb_env(fdbroker_broker.run_dir),
        )
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(30)
            c.connect(str(path))
            assert c.recv(10) == b"u!"
        assert proc.wait(timeout=60) == 0
        # --fd: a descriptor the CLI inherited.
        r, w = os.pipe()
        try:
            res = subprocess.run(
                [sys.executable, "-m", "fdbroker", "put", "p", "--fd", str(w)],
                env=fdb_env(fdbroker_broker.run_dir),
                pass_fds=[w],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "pipe" in ok(res)
        finally:
            os.close(w)
        ok(fdb(fdbroker_broker, "get", "p", "--", *py("import os; os.write(3, b'via broker')")))
        ok(fdb(fdbroker_broker, "rm", "p"))
        assert os.read(r, 100) == b"via broker"
        os.close(r)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


# -- a real third-party server ---------------------------------------------------------------------------------

APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from gunicorn on a brokered socket"]
"""


def _gunicorn() -> list[str]:
    exe = Path(sys.executable).parent / "gunicorn"
    if exe.exists():
        return [str(exe)]
    if shutil.which("gunicorn"):
        return ["gunicorn"]
    pytest.skip("gunicorn is not installed")
    return []


@pytest.mark.slow
def test_exec_gunicorn_on_a_brokered_listener(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    # gunicorn reads LISTEN_FDS/LISTEN_PID itself (gunicorn.systemd); adding --bind fd://3 would make it adopt
    # fd 3 twice (and fail with EBADF, since it closes the original after the first dup).
    gunicorn = _gunicorn()
    (tmp_path / "tests_app.py").write_text(APP)
    port = put_listener(fdbroker_broker, "web")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fdbroker",
            "exec",
            "web",
            "--",
            *gunicorn,
            "--workers",
            "1",
            "--chdir",
            str(tmp_path),
            "tests_app:app",
        ],
        env=fdb_env(fdbroker_broker.run_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    body: Any = None
    try:
        # The broker holds the listener, so connections queue until gunicorn accepts: no retry loop needed.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as resp:
            body = resp.read()
            status = resp.status
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert status == 200, err
    assert body == b"hello from gunicorn on a brokered socket"
    # The broker still holds the listener after the server is gone: the next server can take over.
    assert json.loads(ok(fdb(fdbroker_broker, "stat", "web", "--json")))["listening"] is True
