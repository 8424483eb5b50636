"""Robustness end to end: floods of connections, a peer that stops reading, quotas and RLIMIT_NOFILE, bad names
and labels, unreachable brokers, and the broker's own lifecycle (single instance, SIGTERM, SIGKILL + restart).

Every test ends with the broker's descriptor count back at baseline + held entries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from brokerutil import child_env, run_client
from secutil import Control, Probe, RawConduit, custom_broker, new_run_dir

from fdbroker.errors import InvalidArgument, NotFound, ResourceExhausted
from fdbroker.testing import BrokerProcess, wait_until
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

FDBROKER = [sys.executable, "-m", "fdbroker"]


def info(run_dir: Path) -> pb.GetInfoResponse:
    with Control(run_dir) as ctl:
        resp: pb.GetInfoResponse = ctl.call("GetInfo", pb.GetInfoRequest())
        return resp


# -- floods ----------------------------------------------------------------------------------------------------


def test_200_conduit_connections_opened_and_dropped(fdbroker_broker):
    run_dir = fdbroker_broker.run_dir
    conns: list[socket.socket] = []
    try:
        for i in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(run_dir / "conduit.sock"))
            if i % 3 == 1:
                s.sendall(b"\x00\x00\x01\x00partial")  # a frame that never completes
            conns.append(s)
        # every one of them got a session (the broker keeps up)
        wait_until(lambda: info(run_dir).sessions == 200, what="200 sessions")
        for i, s in enumerate(conns):
            if i % 2:
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        conns.clear()
        # and a burst of control-plane connections that say nothing
        for _ in range(50):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(run_dir / "control.sock"))
        wait_until(lambda: info(run_dir).sessions == 0, what="sessions ended")
        r, w = os.pipe()
        try:
            with fdbroker_broker.client() as c:
                c.put("flood/ok", w)
                c.get_fd("flood/ok").close()
                c.delete("flood/ok")
        finally:
            os.close(r)
            os.close(w)
    finally:
        for s in conns:
            s.close()


@pytest.mark.slow
def test_peer_that_stops_reading_does_not_stall_others():
    # A small descriptor table makes the attack bite: every delivery the kernel cannot take must be queued with
    # a duplicate descriptor in the broker, and a hog must not be able to fill the table with them.
    with custom_broker(["--reserve-fds", "50"], preexec=["prlimit", "--nofile=200:200", "--"]) as b:
        run_dir = b.run_dir
        ev = os.eventfd(0)
        try:
            with b.client() as c:
                c.put("flood/ev", ev)
            with Control(run_dir) as ctl, RawConduit(run_dir) as hog:
                tokens: list[bytes] = []
                for _ in range(3):
                    g = ctl.call("Get", pb.GetRequest(name="flood/ev", prefetch=1024), hog.session_id)
                    tokens += list(g.prefetch_tokens)
                assert len(tokens) == 3072
                # ask for 3072 deliveries, one frame each, and never read one of them
                for t in tokens:
                    try:
                        hog.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[t])))
                    except (BrokenPipeError, ConnectionResetError):
                        break  # cut off
                # the hog is still connected on our side: everybody else must be served all the same
                for _ in range(5):
                    run_client(
                        run_dir,
                        """
                        import fdbroker, os
                        with fdbroker.Client(timeout=5) as c:
                            f = c.get_fd("flood/ev")
                            os.eventfd_write(f.fileno(), 1)
                            f.close()
                        """,
                    )
                assert os.eventfd_read(ev) == 5
                assert b.fd_count() < 200 - 50 // 2  # half the reserve is still free
                assert "does not read its conduit" in b.log()
            with b.client() as c:
                c.delete("flood/ev")
        finally:
            os.close(ev)


# -- quotas ----------------------------------------------------------------------------------------------------

LIMITS = """
[limits]
max_entries_per_uid = 3
max_sessions_per_uid = 4
max_pending_tokens_per_uid = 8
max_prefetch_tokens_per_uid = 5
"""


def test_per_uid_quotas_are_resource_exhausted(tmp_path):
    policy = tmp_path / "limits.toml"
    policy.write_text(LIMITS)
    r, w = os.pipe()
    try:
        with custom_broker(["--policy", str(policy)]) as b, b.client() as c:
            i = c.info()
            assert (i.max_entries_per_uid, i.max_sessions_per_uid, i.max_pending_tokens_per_uid) == (3, 4, 8)
            for n in range(3):
                c.put(f"q/e{n}", r)
            with pytest.raises(ResourceExhausted) as ei:
                c.put("q/e3", r)
            msg = str(ei.value)
            assert "q/e3" in msg and "max_entries_per_uid" in msg, msg
            assert [e.name for e in c.list("q/")] == ["q/e0", "q/e1", "q/e2"]
            c.delete("q/e2")
            c.put("q/e3", r)  # room again

            # pending tokens: 8 PUT tokens whose descriptors never come are the limit; the 9th is refused
            for _ in range(8):
                c.raw.call("Put", pb.PutRequest(name="q/e1", replace=True))
            with pytest.raises(ResourceExhausted) as ei:
                c.raw.call("Put", pb.PutRequest(name="q/e0", replace=True), name="q/e0")
            assert "handoff tokens pending" in str(ei.value) and "q/e0" in str(ei.value), ei.value
            # a get still works (its delivery token is spent at once), and prefetching has a pool of its own
            # (max_prefetch_tokens_per_uid = 5): a full explicit quota does not starve it, and it never fails
            g = c.raw.call("Get", pb.GetRequest(name="q/e0", prefetch=7))
            assert len(g.prefetch_tokens) == 5
            kind, _, fd = c.raw.await_answers([g.handoffs[0].token])[0]
            assert kind == "deliver"
            os.close(fd)
            g = c.raw.call("Get", pb.GetRequest(name="q/e0", prefetch=7))
            assert list(g.prefetch_tokens) == []  # pool full: fewer tokens, no error
            kind, _, fd = c.raw.await_answers([g.handoffs[0].token])[0]
            os.close(fd)

            # sessions: this client is one; three more fit, the fifth is refused
            others = [RawConduit(b.run_dir) for _ in range(3)]
            try:
                with pytest.raises(ResourceExhausted) as ei, b.client() as extra:
                    extra.connect()
                assert "max_sessions_per_uid" in str(ei.value)
                # a raw connection past the limit gets the error frame, then EOF
                with RawConduit(b.run_dir, welcome=False) as over:
                    frames = over.frames_until_eof()
                    assert [f.error.code for f in frames] == [8], frames
            finally:
                for o in others:
                    o.close()
            for name in ("q/e0", "q/e1", "q/e3"):
                c.delete(name)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.slow
def test_rlimit_nofile_fills_to_capacity_then_refuses_and_serves():
    with custom_broker(["--reserve-fds", "50"], preexec=["prlimit", "--nofile=200:200", "--"]) as b:
        cap = info(b.run_dir).max_entries
        assert cap == 150
        fds = [os.eventfd(i + 1) for i in range(cap)]
        try:
            with b.client() as c:
                names = [f"fill/{i:03d}" for i in range(cap)]
                c.put_many(list(zip(names, fds, strict=True)))
                with pytest.raises(ResourceExhausted) as ei:
                    c.put("fill/one-too-many", fds[0])
                assert "fill/one-too-many" in str(ei.value)
                # a flood of sessions at the descriptor limit is refused, not fatal
                conns = []
                for _ in range(60):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(str(b.run_dir / "conduit.sock"))
                    conns.append(s)
                for s in conns:
                    s.close()
                # still serving: every entry can be got, and it is the right one
                got = c.get_many(names[:100], raw=True)
                for i, g in enumerate(got):
                    assert os.eventfd_read(g.fileno()) == i + 1
                    g.close()
                assert c.stat("fill/149").name == "fill/149"
            assert b.proc.poll() is None
        finally:
            for fd in fds:
                os.close(fd)


# -- bad input from well-behaved clients -----------------------------------------------------------------------


def test_invalid_names_and_oversize_labels(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client() as c:
            for bad in ["", "a//b", "a/../b", "x:y", "/abs", "sp ace", "a" * 256]:
                with pytest.raises(InvalidArgument) as ei:
                    c.put(bad, r)
                assert "name" in str(ei.value), (bad, str(ei.value))
            with pytest.raises(InvalidArgument) as ei:
                c.put("lab/many", r, labels={f"k{i}": "v" for i in range(33)})
            assert "32" in str(ei.value) and "lab/many" in str(ei.value)
            with pytest.raises(InvalidArgument) as ei:
                c.put("lab/key", r, labels={"k" * 64: "v"})
            assert "k" * 64 in str(ei.value) and "1-63 bytes" in str(ei.value) and "lab/key" in str(ei.value)
            with pytest.raises(InvalidArgument) as ei:
                c.put("lab/value", r, labels={"k": "v" * 256})
            assert "255 bytes" in str(ei.value) and "lab/value" in str(ei.value)
            # the limits themselves are fine
            c.put("lab/max", r, labels={**{f"k{i}": "v" for i in range(31)}, "k" * 63: "v" * 255})
            assert [e.name for e in c.list()] == ["lab/max"]
            c.delete("lab/max")
    finally:
        os.close(r)
        os.close(w)


def _cli(*args: str, run_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = child_env(run_dir or "/nonexistent")
    if run_dir is None:
        env.pop("FDBROKER_RUN_DIR")
    return subprocess.run([*FDBROKER, *args], env=env, capture_output=True, text=True, timeout=30)


def test_cli_errors_name_the_entry_and_say_what_to_do(fdbroker_broker, tmp_path):
    rd = fdbroker_broker.run_dir
    p = _cli("stat", "a/../b", run_dir=rd)
    assert p.returncode == 3 and "a/../b" in p.stderr, p
    p = _cli("stat", "no/such", run_dir=rd)
    assert p.returncode == 4 and "no/such" in p.stderr, p
    p = _cli("put", "lab/x", "--file", "/dev/null", *[f"--label=k{i}=v" for i in range(33)], run_dir=rd)
    assert p.returncode == 3 and "at most 32 labels" in p.stderr, p
    # unknown run directory, and a directory with no broker (stale socket of a dead one)
    for d in (tmp_path / "missing", tmp_path):
        p = _cli("--run-dir", str(d), "ls")
        assert p.returncode == 10, p
        assert f"no broker at {d}" in p.stderr and "fdbroker serve" in p.stderr, p.stderr
    stale = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    p = _cli("--run-dir", str(tmp_path), "stat", "x")
    assert p.returncode == 10 and "fdbroker serve" in p.stderr, p


# -- lifecycle -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lifecycle_single_instance_sigterm_and_stale_sockets():
    run_dir = new_run_dir()
    probe = Probe()
    try:
        with custom_broker(run_dir=run_dir) as first:
            second = subprocess.run(
                [*FDBROKER, "serve", "--run-dir", str(run_dir)],
                env=child_env(run_dir),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert second.returncode != 0
            assert f"pid {first.pid}" in second.stderr, second.stderr
            assert (run_dir / "control.sock").exists()  # the loser did not touch the winner's sockets
            with first.client() as c:
                c.put("life/pipe", probe.send_fd)
                c.get_fd("life/pipe").close()
            probe.drop_ours()
            assert probe.r >= 0 and first.proc.poll() is None
            first.assert_no_leak()
            assert first.stop() == 0
            assert not (run_dir / "control.sock").exists() and not (run_dir / "conduit.sock").exists()
            assert probe.closed_everywhere(timeout=1), "a held descriptor outlived the broker"
            first.baseline = None  # stopped: nothing left for the context manager to check

        # a SIGKILLed broker leaves its sockets behind; the next start removes them and serves
        b = BrokerProcess.start(run_dir)
        try:
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait()
            assert (run_dir / "control.sock").exists() and (run_dir / "conduit.sock").exists()
            p = _cli("--run-dir", str(run_dir), "ls")
            assert p.returncode == 10 and "no broker" in p.stderr
        finally:
            b.stop()
            b.log_path.unlink(missing_ok=True)
        with custom_broker(run_dir=run_dir) as again, again.client() as c:
            assert c.info().entries == 0
            with pytest.raises(NotFound):
                c.stat("life/pipe")
    finally:
        probe.close()
