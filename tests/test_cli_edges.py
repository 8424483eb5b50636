"""The command line without rough edges (issue 10, section 2), each edge as an operator met it: the CLI run as a
separate process against a real broker, as root and as uid 65534."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from fdbroker.testing import BrokerProcess


def cli(
    run_dir: BrokerProcess | Path | str | None,
    *args: str,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``fdbroker ARGS`` as a separate process (``run_dir`` None: FDBROKER_RUN_DIR unset); with ``prefix``
    (``secutil.unprivileged_python``) as uid 65534."""
    rd = run_dir.run_dir if isinstance(run_dir, BrokerProcess) else run_dir
    extra = dict(env or {})
    if rd is not None:
        extra["FDBROKER_RUN_DIR"] = str(rd)
    if prefix:
        cmd = [*prefix[:-1], *(f"{k}={v}" for k, v in extra.items()), prefix[-1], "-m", "fdbroker", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    full = {k: v for k, v in os.environ.items() if k != "FDBROKER_RUN_DIR"}
    full.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "fdbroker", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def refused(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The command failed with ``code``, one line on stderr naming ``words``, and no traceback."""
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


# -- durations: one strict grammar (systemd time spans), each option with its range ----------------------------


def test_durations_are_systemd_spans_with_ranges(fdbroker_broker: BrokerProcess) -> None:
    from fdbroker.cli.format import parse_duration

    assert parse_duration("1M") == 2_629_800  # a month, as systemd reads it (was: one minute)
    assert parse_duration("1min30s") == parse_duration("1m30s") == 90
    # On main: inf was accepted, then crashed (OverflowError) in --ttl and --timeout.
    for args in (
        ["put", "t", "--file", "/dev/null", "--ttl", "inf"],
        ["ls", "--timeout", "inf"],
        ["lease", "t", "--ttl", "inf", "--", "true"],
        ["lease", "t", "--ttl", "1s", "--wait", "infinity"],
        ["ls", "--timeout", "nan"],
        ["ls", "--timeout", "1e3"],
        ["ls", "--timeout=-1s"],
    ):
        refused(cli(fdbroker_broker, *args), 2, "duration")
    # Ranges: the broker's own for TTLs; --timeout 0 (was: "the broker closed the conduit") is refused.
    refused(cli(fdbroker_broker, "ls", "--timeout", "0"), 2, "at least 1ms")
    refused(cli(fdbroker_broker, "ls", "--timeout", "25h"), 2, "at most 1d")
    refused(cli(fdbroker_broker, "put", "t", "--file", "/dev/null", "--ttl", "367d"), 2, "at most 366d")
    refused(cli(fdbroker_broker, "put", "t", "--file", "/dev/null", "--ttl", "0"), 2, "at least 1ms")
    refused(cli(fdbroker_broker, "lease", "t", "--ttl", "50ms", "--", "true"), 2, "at least 100ms")
    refused(cli(fdbroker_broker, "lease", "t", "--ttl", "2d", "--", "true"), 2, "at most 1d")
    refused(cli(fdbroker_broker, "ls", "--timeout", "5mo"), 2, "M is a month")
    # 1M is a month: the entry expires in about 30 days, not in a minute.
    ok(cli(fdbroker_broker, "put", "month", "--file", "/dev/null", "--ttl", "1M"))
    st = json.loads(ok(cli(fdbroker_broker, "stat", "month", "--json")))
    assert 29 * 86400 < st["expire_time"] - st["create_time"] < 31 * 86400
    ok(cli(fdbroker_broker, "ls", "--timeout", "1h 30min"))


def test_a_broker_that_does_not_answer_is_a_deadline_not_a_closed_conduit(
    fdbroker_broker: BrokerProcess,
) -> None:
    # On main: --timeout ran out while the broker was stopped, and the CLI said "closed the conduit" (exit 10,
    # "start one"). Now: exit 9, and the message says it did not answer in time.
    os.kill(fdbroker_broker.pid, 19)  # SIGSTOP
    try:
        for args in (["ls"], ["status"], ["rm", "x"]):
            err = refused(cli(fdbroker_broker, *args, "--timeout", "300ms"), 9, "did not answer within 0.3s")
            assert "closed" not in err
    finally:
        os.kill(fdbroker_broker.pid, 18)  # SIGCONT
    ok(cli(fdbroker_broker, "status"))


def test_help_states_each_duration_range() -> None:
    for verb, words in (
        ("ls", ["1ms..24h"]),
        ("put", ["1ms..366d"]),
        ("lease", ["100ms..1d", "0..1d"]),
    ):
        out = ok(cli(None, verb, "--help"))
        for w in words:
            assert w in " ".join(out.split()), (verb, w)


@pytest.mark.parametrize("text", ["0", "0.5", "1.5h", "10 s", "2w"])
def test_any_valid_span_is_accepted(text: str) -> None:
    from fdbroker.cli.format import parse_duration

    assert parse_duration(text) >= 0


# -- finding the broker: the system one when the user has none; permission denied said as such ------------------


def test_find_run_dir_falls_back_to_the_system_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools
    import socket

    from fdbroker import rundir

    system = tmp_path / "system"
    own = tmp_path / "xdg"
    monkeypatch.setattr(rundir, "SYSTEM_RUN_DIR", system)
    env = {"XDG_RUNTIME_DIR": str(own)}
    find = functools.partial(rundir.find_run_dir, uid=1000)
    # Named: no lookup at all.
    assert find("/named", environ=env) == Path("/named")
    assert find(None, environ={**env, "FDBROKER_RUN_DIR": "/env"}) == Path("/env")
    # Neither holds a broker: the user's own default (where `fdbroker serve` would start one).
    assert find(None, environ=env) == own / "fdbroker"
    system.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(system / "conduit.sock"))
        # Only the system one holds a broker: a client finds it; serve's resolution does not move.
        assert find(None, environ=env) == system
        assert rundir.default_run_dir(uid=1000, environ=env) == own / "fdbroker"
        # The user's own broker wins.
        (own / "fdbroker").mkdir(parents=True)
        with socket.socket(socket.AF_UNIX) as mine:
            mine.bind(str(own / "fdbroker" / "conduit.sock"))
            assert find(None, environ=env) == own / "fdbroker"


@pytest.fixture(scope="module")
def nobody() -> list[str]:
    """A command prefix running Python as uid 65534 with fdbroker importable (``secutil``)."""
    from secutil import unprivileged_python

    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as uid 65534")
    cmd = unprivileged_python()
    if cmd is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    return cmd


# The CLI as uid 65534 with no run directory named: fdbroker.rundir.SYSTEM_RUN_DIR points at the stand-in for
# /run/fdbroker given as argv[1] (the real one is not touched), then `fdbroker ARGS`.
WITH_SYSTEM_DIR = (
    "import sys; from pathlib import Path; import fdbroker.rundir as r; r.SYSTEM_RUN_DIR = Path(sys.argv[1]); "
    "sys.argv[0] = 'fdbroker'; from fdbroker.cli import main; sys.exit(main(sys.argv[2:]))"
)


def as_nobody_finding(
    nobody: list[str], system: Path, xdg: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [*nobody[:-1], f"XDG_RUNTIME_DIR={xdg}", nobody[-1], "-c", WITH_SYSTEM_DIR, str(system), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")


def test_nonroot_finds_the_system_broker_or_is_told_permission_denied(nobody: list[str]) -> None:
    from secutil import custom_broker, new_run_dir

    system = new_run_dir()  # /tmp/fdb-XXXX/run, the stand-in for /run/fdbroker
    xdg = system.parent / "xdg-65534"  # uid 65534's own default: no broker there
    try:
        # No broker anywhere: the user's own default, and how to start one (10).
        r = as_nobody_finding(nobody, system, xdg, "ls")
        refused(r, 10, f"no broker at {xdg / 'fdbroker'}", "fdbroker serve")

        # Root's broker with its default sockets (0660, group root): found, and refused by the kernel. On main:
        # "no broker ... start one" (10). Now: permission denied, naming the socket's group and mode (7).
        with custom_broker(run_dir=system):
            for args in (["ls"], ["status"], ["get", "x"], ["put", "x", "--file", "/dev/null"], ["watch"]):
                err = refused(as_nobody_finding(nobody, system, xdg, *args), 7, "permission denied")
                assert "group root" in err and "mode 0660" in err and str(system / "conduit.sock") in err, err
                assert "start one" not in err and "--socket-group" in err, err
            # Named explicitly, the same answer.
            refused(cli(system, "ls", prefix=nobody), 7, "permission denied", "group root")

        # Sockets for group 65534: the same user, naming nothing, lists what root's broker holds.
        with custom_broker(["--socket-group", str(65534)], run_dir=system) as b:
            ok(cli(b, "put", "shared/web", "--listen", "tcp://127.0.0.1:0"))
            out = ok(as_nobody_finding(nobody, system, xdg, "ls", "--json"))
            assert [e["name"] for e in json.loads(out)] == ["shared/web"]
            st = json.loads(ok(as_nobody_finding(nobody, system, xdg, "status", "--json")))
            assert st["run_dir"] == str(system) and st["caller"][1] == 65534
            ok(cli(b, "rm", "shared/web"))
    finally:
        import shutil

        shutil.rmtree(system.parent, ignore_errors=True)


def test_a_directory_on_the_way_that_may_not_be_entered(nobody: list[str]) -> None:
    from secutil import custom_broker, new_run_dir

    run = new_run_dir()
    try:
        with custom_broker(["--socket-mode", "0666"], run_dir=run) as b:
            os.chmod(run.parent, 0o700)
            try:
                r = cli(b, "ls", prefix=nobody)
                refused(r, 7, "permission denied", f"may not enter the directory {run.parent}", "mode 0700")
            finally:
                os.chmod(run.parent, 0o755)
            ok(cli(b, "ls", prefix=nobody))
    finally:
        import shutil

        shutil.rmtree(run.parent, ignore_errors=True)


# -- put --listen on an address it cannot have --------------------------------------------------------------------


def test_put_listen_on_a_port_in_use_or_privileged_exits_with_its_code(
    fdbroker_broker: BrokerProcess, nobody: list[str]
) -> None:
    # Before the CLI split: an UnboundLocalError traceback and exit 1 for both.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):
            addr = f"tcp://{host}:{port}"
            refused(cli(fdbroker_broker, "put", "a", "--listen", addr), 5, addr, "Address already in use")
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if start.exists() and int(start.read_text()) <= 53:
        pytest.skip("this kernel lets any uid bind low ports (net.ipv4.ip_unprivileged_port_start)")
    for addr in ("tcp://127.0.0.1:80", "tcp://[::1]:443", "udp://127.0.0.1:53"):
        r = cli(fdbroker_broker, "put", "a", "--listen", addr, prefix=nobody)
        refused(r, 7, addr, "Permission denied")
    assert json.loads(ok(cli(fdbroker_broker, "ls", "--json"))) == []


# -- exec: socket activation, or plain descriptors ------------------------------------------------------------------

APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from gunicorn on a brokered socket"]
"""


def _gunicorn() -> list[str]:
    import shutil

    exe = Path(sys.executable).parent / "gunicorn"
    if exe.exists():
        return [str(exe)]
    if shutil.which("gunicorn"):
        return ["gunicorn"]
    pytest.skip("gunicorn is not installed")
    return []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("exec_opts", "gunicorn_opts"),
    [
        pytest.param([], [], id="LISTEN_FDS, no --bind"),
        pytest.param(["--no-listen-env"], ["--bind", "fd://3"], id="plain fd 3, --bind fd://3"),
    ],
)
def test_gunicorn_serves_a_brokered_listener_both_ways(
    fdbroker_broker: BrokerProcess, tmp_path: Path, exec_opts: list[str], gunicorn_opts: list[str]
) -> None:
    # On main, only the first way worked: `exec` always set LISTEN_*, so gunicorn told --bind fd://3 as well
    # adopted fd 3 twice and died with EBADF (and deploy/kubernetes/sidecar-pod.yaml recommended exactly that).

    import urllib.request

    gunicorn = _gunicorn()
    (tmp_path / "tests_app.py").write_text(APP)
    out = ok(cli(fdbroker_broker, "put", "web", "--listen", "tcp://127.0.0.1:0"))
    m = re.search(r"127\.0\.0\.1:(\d+)", out)
    assert m, out
    port = int(m.group(1))
    env = {k: v for k, v in os.environ.items() if k != "FDBROKER_RUN_DIR"}
    env["FDBROKER_RUN_DIR"] = str(fdbroker_broker.run_dir)
    argv = [*gunicorn, *gunicorn_opts, "--workers", "1", "--chdir", str(tmp_path), "tests_app:app"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdbroker", "exec", "web", *exec_opts, "--", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    status, body = 0, b""
    try:
        # The broker holds the listener: connections queue until gunicorn accepts.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as resp:
            status, body = resp.status, resp.read()
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert status == 200 and body == b"hello from gunicorn on a brokered socket", err
    assert "Bad file descriptor" not in err


def test_no_listen_env_passes_plain_descriptors(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    f = tmp_path / "data"
    f.write_text("plain data")
    ok(cli(fdbroker_broker, "put", "d", "--file", str(f)))
    show = (
        "import os; print(sorted(k for k in os.environ if k.startswith('LISTEN_')), "
        "os.pread(3, 20, 0).decode(), os.environ.get('FDBROKER_LEASE_EPOCH', '-') != '-')"
    )
    stale = {"LISTEN_FDS": "5", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x"}  # inherited: never passed on
    for verb in (["get", "d"], ["exec", "d"], ["lease", "d", "--ttl", "5s"]):
        plain = ok(
            cli(fdbroker_broker, *verb, "--no-listen-env", "--", sys.executable, "-c", show, env=stale)
        )
        assert plain.split("]")[0] == "[", (verb, plain)
        assert "plain data" in plain
        activated = ok(cli(fdbroker_broker, *verb, "--", sys.executable, "-c", show, env=stale))
        assert activated.startswith("['LISTEN_FDNAMES', 'LISTEN_FDS', 'LISTEN_PID'] plain data"), activated
        # lease's own variables stay either way.
        assert plain.endswith("True\n" if verb[0] == "lease" else "False\n")
    ok(cli(fdbroker_broker, "take", "d", "--no-listen-env", "--", sys.executable, "-c", show))


# -- --version, --json on every verb that prints ----------------------------------------------------------------


def test_version() -> None:
    import fdbroker

    for args in (["--version"], ["--run-dir", "/nowhere", "--version"]):
        assert ok(cli(None, *args)) == f"fdbroker {fdbroker.__version__}\n"


def test_json_on_every_verb_that_prints(fdbroker_broker: BrokerProcess, tmp_path: Path) -> None:
    f = tmp_path / "data"
    f.write_text("x")
    put = json.loads(ok(cli(fdbroker_broker, "put", "j", "--file", str(f), "--label", "a=b", "--json")))
    assert (
        put["name"] == "j" and put["kind"] == "file" and put["labels"] == {"a": "b"} and put["revision"] > 0
    )
    assert json.loads(ok(cli(fdbroker_broker, "stat", "j", "--json"))) == put
    got = json.loads(ok(cli(fdbroker_broker, "get", "j", "--json")))
    assert got["name"] == "j" and got["kind"] == "file" and got["descriptor"]["path"] == str(f)
    taken = json.loads(ok(cli(fdbroker_broker, "take", "j", "--json")))
    assert taken["taken"] is True and taken["kind"] == "file"
    ok(cli(fdbroker_broker, "put", "j", "--file", str(f)))
    rm = json.loads(ok(cli(fdbroker_broker, "rm", "j", "--json")))
    assert rm["name"] == "j" and rm["deleted"] is True and rm["revision"] > put["revision"]
    r = cli(fdbroker_broker, "rm", "nothing", "--json")
    refused(r, 4, "nothing")
    assert r.stdout == ""  # an error prints no JSON
    # ls, stat, status and watch had --json already; exec and lease print nothing of their own on stdout.
    for verb in ("ls", "stat", "status", "watch", "put", "rm", "get", "take"):
        assert "--json" in ok(cli(None, verb, "--help")), verb


# -- shell completion, generated from the parser ---------------------------------------------------------------

BASH_DRIVER = r"""
source "$1"
shift
COMP_WORDS=("$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMPREPLY=()
_fdbroker fdbroker "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def _completion_env(broker: BrokerProcess | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FDBROKER_RUN_DIR"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"  # `fdbroker` itself
    if broker is not None:
        env["FDBROKER_RUN_DIR"] = str(broker.run_dir)
    return env


def test_bash_completes_verbs_options_values_entries_and_cmd(
    fdbroker_broker: BrokerProcess, tmp_path: Path
) -> None:
    import shutil

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = tmp_path / "fdbroker.bash"
    script.write_text(ok(cli(None, "completion", "bash")))
    ok(cli(fdbroker_broker, "put", "web/https", "--listen", "tcp://127.0.0.1:0"))
    ok(cli(fdbroker_broker, "put", "db/main", "--file", "/dev/null"))
    (tmp_path / "dir-one").mkdir()

    def complete(*words: str) -> list[str]:
        r = subprocess.run(
            ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER, "driver", str(script), "fdbroker", *words],
            capture_output=True,
            text=True,
            timeout=60,
            env=_completion_env(fdbroker_broker),
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert complete("l") == ["ls", "lease"]
    assert set(complete("s")) == {"serve", "stat", "status"}
    assert "completion" in complete("")
    assert complete("put", "x", "--mo") == ["--mode"]
    assert complete("put", "x", "--mode", "") == ["a", "r", "rw", "w"]
    assert {"--listen", "--file", "--ttl", "--json", "--timeout"} <= set(complete("put", "x", "--"))
    assert complete("exec", "web/https", "--no") == ["--no-listen-env"]
    assert complete("--ti") == ["--timeout"]
    assert complete("completion", "") == ["bash", "zsh"]
    assert complete("--run-dir", "dir-") == ["dir-one"]
    # Entry names come from the broker.
    assert sorted(complete("get", "")) == ["db/main", "web/https"]
    assert complete("rm", "we") == ["web/https"]
    # After --, a command.
    assert "bash" in complete("exec", "web/https", "--", "bas")


def test_zsh_completes_verbs_and_options(tmp_path: Path) -> None:
    import shutil

    if shutil.which("zsh") is None:
        pytest.skip("no zsh")
    fpath = tmp_path / "functions"
    fpath.mkdir()
    (fpath / "_fdbroker").write_text(ok(cli(None, "completion", "zsh")))
    # A real interactive zsh on a pseudo-terminal (zsh/zpty): type the words and TAB twice, read the listing.
    driver = r"""
    zmodload zsh/zpty
    zpty z 'zsh -f -i'
    zpty -w z "fpath=($1 \$fpath); autoload -U compinit; compinit -u -D; PROMPT='%% '; echo READY"
    out=''
    SECONDS=0
    while (( SECONDS < 20 )) && [[ $out != *READY*READY* ]]; do zpty -r -t z line && out+=$line; done
    zpty -n -w z "$2"$'\t\t'
    res=''
    SECONDS=0
    while (( SECONDS < 20 )) && [[ $res != *$3* ]]; do zpty -r -t z line && res+=$line || sleep 0.05; done
    zpty -d z
    print -r -- "$res"
    """
    import textwrap

    def listing(typed: str, until: str) -> str:
        r = subprocess.run(
            ["zsh", "-f", "-c", textwrap.dedent(driver), "driver", str(fpath), typed, until],
            capture_output=True,
            text=True,
            timeout=90,
            env=_completion_env(None),
        )
        return r.stdout

    out = listing("fdbroker l", "list entries")
    assert "lease" in out and "ls" in out and "list entries" in out, out
    out = listing("fdbroker put x --mo", "--mode")
    assert "--mode" in out, out


# -- the pytest plugin ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]

LEFT_OPEN = """
from fdbroker import Client


def test_leaves_its_client_open(fdbroker_broker):
    c = Client(fdbroker_broker.run_dir)
    c.connect()
    test_leaves_its_client_open.kept = c  # still referenced at teardown
"""


def _pytest_in(tmp_path: Path, name: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a user's test module ``name`` in a directory of its own (the plugin from the entry point,
    none of this repository's conftest)."""
    (tmp_path / name).write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "FDBROKER_RUN_DIR"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_docs_testing_example_runs_as_a_users_suite(tmp_path: Path) -> None:

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "testing.md").read_text(), re.S)
    assert len(blocks) == 1
    r = _pytest_in(tmp_path, "test_example.py", blocks[0])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout


def test_a_client_left_open_is_reported_as_such(tmp_path: Path) -> None:
    # On main: "broker descriptor leak: 18 open, expected ..." and a list of the broker's descriptors.
    r = _pytest_in(tmp_path, "test_left_open.py", LEFT_OPEN)
    assert r.returncode != 0, r.stdout
    out = r.stdout
    assert "a client is still open" in out and "1 session(s) open at the broker" in out, out
    assert re.search(r"this test process \(pid \d+\) is still connected to it on fd\(s\) \d+", out), out
    assert "broker descriptor leak" not in out, out


def test_broker_process_env(fdbroker_broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    env = fdbroker_broker.env
    assert env["FDBROKER_RUN_DIR"] == str(fdbroker_broker.run_dir)
    assert fdbroker_broker.uid == os.getuid() and "FDBROKER_TRUST_UID" not in env
    assert env is not fdbroker_broker.env  # a new dict each time
    # A broker run as another uid (through a preexec such as setpriv): the client is told to trust it.
    monkeypatch.setenv("FDBROKER_TRUST_UID", "4321")
    monkeypatch.setattr(fdbroker_broker, "uid", 1234)
    assert fdbroker_broker.env["FDBROKER_TRUST_UID"] == "4321,1234"
    out = ok(
        subprocess.run(
            [sys.executable, "-m", "fdbroker", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert json.loads(out)["broker_pid"] == fdbroker_broker.pid


# -- non-UTF-8 on the command line ----------------------------------------------------------------------------


def _fdb_bytes(broker: BrokerProcess, *args: bytes | str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FDBROKER_RUN_DIR"}
    env["FDBROKER_RUN_DIR"] = str(broker.run_dir)
    argv = [os.fsencode(a) for a in (sys.executable, "-m", "fdbroker", *args)]
    r = subprocess.run(argv, env=env, capture_output=True, timeout=60)
    return subprocess.CompletedProcess(
        r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    )


def test_a_file_whose_path_is_not_utf8_can_be_deposited(
    fdbroker_broker: BrokerProcess, tmp_path: Path
) -> None:
    # On main: the broker failed describing the descriptor (a protobuf string must be UTF-8), never answered the
    # deposit, and the CLI said "no answer on the conduit" after --timeout (exit 9).
    path = os.fsencode(tmp_path) + b"/data-\xff.txt"
    with open(path, "wb") as f:
        f.write(b"bytes")
    ok(_fdb_bytes(fdbroker_broker, "put", "odd/path", "--file", path, "--timeout", "20s"))
    st = json.loads(ok(cli(fdbroker_broker, "stat", "odd/path", "--json")))
    assert st["path"] == f"{tmp_path}/data-\\xff.txt"
    assert "data-\\xff.txt" in ok(cli(fdbroker_broker, "ls"))


def test_names_that_are_not_utf8_are_invalid_arguments(fdbroker_broker: BrokerProcess) -> None:
    # On main: UnicodeEncodeError tracebacks (exit 1) from every verb given such a name, prefix or selector.
    argvs: list[list[bytes | str]] = [
        ["stat", b"\xff"],
        ["put", b"\xff", "--file", "/dev/null"],
        ["get", b"na\xffme", "--", "true"],
        ["exec", "ok", b"\xfe", "--", "true"],
        ["rm", b"\xff"],
        ["take", b"\xff"],
        ["ls", b"\xff"],
        ["watch", b"\xff"],
        ["ls", "--selector", b"a=\xff"],
        ["put", "x", "--file", "/dev/null", "--label", b"k=\xff"],
        ["lease", b"\xff", "--ttl", "1s", "--", "true"],
    ]
    for args in argvs:
        r = _fdb_bytes(fdbroker_broker, *args)
        refused(r, 3, "not UTF-8", "\\x")
    assert json.loads(ok(cli(fdbroker_broker, "ls", "--json"))) == []


def test_whole_numbers_out_of_range_are_usage_errors(fdbroker_broker: BrokerProcess) -> None:
    # On main: ValueError/OverflowError tracebacks (exit 1) once the value reached protobuf or listen(2).
    for args in (
        ["rm", "x", "--if-revision=-1"],
        ["take", "x", "--if-revision", "99999999999999999999999"],
        ["put", "x", "--file", "/dev/null", "--replace", "--if-revision=-2"],
        ["watch", "--start-revision=-5"],
        ["watch", "--start-revision", "999999999999999999999999"],
        ["put", "x", "--listen", "tcp://127.0.0.1:0", "--backlog", "99999999999"],
        ["put", "x", "--listen", "tcp://127.0.0.1:0", "--backlog", "0"],
        ["rm", "x", "--if-revision", "seven"],
    ):
        refused(cli(fdbroker_broker, *args), 2, args[-1].split("=")[-1])
    assert json.loads(ok(cli(fdbroker_broker, "ls", "--json"))) == []
