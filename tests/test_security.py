"""Adversarial end-to-end tests against a real broker process: token misuse and malformed frames on a raw
conduit, take atomicity and session death with SIGKILLed client processes, access control with real uids.

Every test ends with the broker's descriptor count back at baseline + held entries (the ``fdbroker_broker``
fixture, or ``custom_broker`` for brokers started with options)."""

from __future__ import annotations

import os
import secrets
import signal
import stat

import grpc
import pytest
from brokerutil import spawn_client
from secutil import (
    NOBODY,
    Control,
    Probe,
    RawConduit,
    custom_broker,
    new_run_dir,
    prefix_only,
    run_as,
    unprivileged_python,
)

from fdbroker.errors import Code
from fdbroker.testing import wait_until
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb


def deposit(conduit: RawConduit, tokens: list[bytes], fds: list[int], fd_count: int | None = None) -> None:
    conduit.send(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=tokens)), fds, fd_count=fd_count)


@pytest.fixture
def ctl(fdbroker_broker):
    with Control(fdbroker_broker.run_dir) as c:
        yield c


@pytest.fixture
def probe():
    p = Probe()
    yield p
    p.close()


# -- token misuse ----------------------------------------------------------------------------------------------


def test_reused_put_token_is_refused_and_its_descriptor_closed(fdbroker_broker, ctl, probe):
    r, w = os.pipe()
    try:
        with RawConduit(fdbroker_broker.run_dir) as rc:
            tok = ctl.put_token(rc.session_id, "sec/reuse")
            deposit(rc, [tok], [r])
            (done, _) = rc.recv_kind("deposited")
            assert not done.results[0].HasField("error") and done.results[0].name == "sec/reuse"
            before = ctl.snapshot()
            deposit(rc, [tok], [probe.send_fd])
            (done, _) = rc.recv_kind("deposited")
            err = done.results[0].error
            assert err.code == Code.FAILED_PRECONDITION and "already used" in err.message, err
            assert probe.closed_everywhere(), "the broker kept the descriptor of a reused token"
            assert ctl.snapshot() == before
            ctl.call("Delete", pb.DeleteRequest(name="sec/reuse"), rc.session_id)
    finally:
        os.close(r)
        os.close(w)


def test_expired_token_is_refused(probe):
    with custom_broker(["--token-ttl", "0.3"]) as b, Control(b.run_dir) as ctl, RawConduit(b.run_dir) as rc:
        tok = ctl.put_token(rc.session_id, "sec/late")
        before = ctl.snapshot()
        wait_until(lambda: ctl.call("GetInfo", pb.GetInfoRequest()).pending_tokens == 0, what="token expiry")
        deposit(rc, [tok], [probe.send_fd])
        (done, _) = rc.recv_kind("deposited")
        err = done.results[0].error
        assert err.code == Code.FAILED_PRECONDITION and "expired" in err.message, err
        assert "ask the broker for a new one" in err.message
        assert probe.closed_everywhere()
        assert ctl.snapshot() == before == []
        log = b.log()
        # refusals are logged (the audit log), tokens never whole
        assert "verb=put outcome=refused" in log and "reason=expired" in log
        assert tok.hex() not in log and tok.hex()[:16] not in log


def test_token_of_another_session_is_refused_and_not_consumed(fdbroker_broker, ctl, probe):
    r, w = os.pipe()
    try:
        with RawConduit(fdbroker_broker.run_dir) as a, RawConduit(fdbroker_broker.run_dir) as thief:
            tok = ctl.put_token(a.session_id, "sec/foreign")
            deposit(thief, [tok], [probe.send_fd])
            (done, _) = thief.recv_kind("deposited")
            err = done.results[0].error
            assert err.code == Code.PERMISSION_DENIED and "another session" in err.message, err
            assert probe.closed_everywhere()
            assert ctl.snapshot() == []
            # the rightful owner can still use it: a foreign presentation must not destroy a handoff
            deposit(a, [tok], [r])
            (done, _) = a.recv_kind("deposited")
            assert not done.results[0].HasField("error")
            # and a GET token delivered to one session cannot be redeemed by another
            g = ctl.call("Get", pb.GetRequest(name="sec/foreign", prefetch=1), a.session_id)
            a.recv_kind("deliver")
            thief.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[g.prefetch_tokens[0]])))
            (e, _) = thief.recv_kind("error")
            assert e.code == Code.PERMISSION_DENIED and e.token == g.prefetch_tokens[0]
            ctl.call("Delete", pb.DeleteRequest(name="sec/foreign"), a.session_id)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    "token", [secrets.token_bytes(32), b"short", b""], ids=["made-up", "malformed", "empty"]
)
def test_made_up_token_is_refused(fdbroker_broker, ctl, probe, token):
    with RawConduit(fdbroker_broker.run_dir) as rc:
        deposit(rc, [token], [probe.send_fd])
        (done, _) = rc.recv_kind("deposited")
        err = done.results[0].error
        assert err.code in (Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT), err
        assert "token" in err.message and ("unknown" in err.message or "malformed" in err.message)
        assert probe.closed_everywhere()
        # the connection goes on
        rc.send(cpb.ConduitFrame(ping=cpb.Ping(nonce=7)))
        (pong, _) = rc.recv_kind("pong")
        assert pong.nonce == 7
    assert ctl.snapshot() == []


def test_deposit_without_token_and_with_fewer_tokens_than_descriptors(fdbroker_broker, ctl):
    probes = [Probe() for _ in range(3)]
    try:
        with RawConduit(fdbroker_broker.run_dir) as rc:
            deposit(rc, [], [probes[0].send_fd])
            (e, _) = rc.recv_kind("error")
            assert e.code == Code.INVALID_ARGUMENT and "1 descriptors for 0 tokens" in e.message, e
            assert probes[0].closed_everywhere()

            tok = ctl.put_token(rc.session_id, "sec/half")
            deposit(rc, [tok], [probes[1].send_fd, probes[2].send_fd])
            (e, _) = rc.recv_kind("error")
            assert e.code == Code.INVALID_ARGUMENT and "2 descriptors for 1 tokens" in e.message, e
            assert e.token == tok  # the error names the deposit it refused
            assert probes[1].closed_everywhere() and probes[2].closed_everywhere()
            assert ctl.snapshot() == []
            assert ctl.call("GetInfo", pb.GetInfoRequest()).pending_tokens == 0  # the token was spent too
    finally:
        for p in probes:
            p.close()


@pytest.mark.parametrize("kind", ["redeem", "ack", "ping"])
@pytest.mark.parametrize("claimed", [True, False], ids=["claimed", "unclaimed"])
def test_descriptor_attached_to_a_frame_that_carries_none(fdbroker_broker, ctl, probe, kind, claimed):
    bodies = {
        "redeem": cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[secrets.token_bytes(32)])),
        "ack": cpb.ConduitFrame(ack=cpb.Ack(tokens=[secrets.token_bytes(32)])),
        "ping": cpb.ConduitFrame(ping=cpb.Ping(nonce=42)),
    }
    with RawConduit(fdbroker_broker.run_dir) as rc:
        rc.send(bodies[kind], [probe.send_fd], fd_count=1 if claimed else 0)
        assert probe.closed_everywhere(), f"the broker kept a descriptor sent with a {kind} frame"
        # whatever else it answers, the unsolicited descriptor is called out in an error frame
        rc.send(cpb.ConduitFrame(ping=cpb.Ping(nonce=99)))
        errors = []
        while True:
            f = rc.recv()
            f.close_fds()
            body = f.message.WhichOneof("body")
            if body == "pong" and f.message.pong.nonce == 99:
                break
            if body == "error":
                errors.append(f.message.error)
        assert any("descriptor" in e.message for e in errors), errors
        assert all(e.code == Code.INVALID_ARGUMENT for e in errors if "descriptor" in e.message)
    assert ctl.snapshot() == []


@pytest.mark.parametrize(
    "payload",
    [
        prefix_only(16) + b"\xff" * 16,  # a body that is not a ConduitFrame
        prefix_only(0x7FFFFFFF) + b"\x00" * 64,  # an oversize length prefix
        prefix_only(0),  # a zero length
    ],
    ids=["garbage", "oversize", "zero-length"],
)
def test_fatal_frames_drop_the_connection_and_its_descriptors(fdbroker_broker, ctl, probe, payload):
    with RawConduit(fdbroker_broker.run_dir) as rc:
        sid = rc.session_id
        rc.send_raw(payload, [probe.send_fd])
        frames = rc.frames_until_eof()
        assert probe.closed_everywhere()
        assert all(f.WhichOneof("body") == "error" for f in frames), frames
        for f in frames:
            assert f.error.code == Code.INVALID_ARGUMENT and "drop the connection" in f.error.message
    # the session ended with the connection
    with pytest.raises(grpc.RpcError) as ei:
        ctl.call("Get", pb.GetRequest(name="x"), sid)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ctl.snapshot() == []


def test_truncated_frame_then_hang_up_closes_the_held_descriptor(fdbroker_broker, ctl, probe):
    with RawConduit(fdbroker_broker.run_dir) as rc:
        tok = ctl.put_token(rc.session_id, "sec/truncated")
        whole = cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[tok]))
        from fdbroker.conduit.frames import encode_frame

        data = encode_frame(whole, 1)
        rc.send_raw(data[:10], [probe.send_fd])  # the descriptor arrives with a frame that never completes
        probe.drop_ours()
        # the broker holds it while the frame is incomplete ...
        wait_until(lambda: ctl.call("GetInfo", pb.GetInfoRequest()).sessions >= 1)
    # ... and closes it when the peer hangs up mid-frame
    assert probe.closed_everywhere()
    assert ctl.snapshot() == []
    wait_until(lambda: ctl.call("GetInfo", pb.GetInfoRequest()).pending_tokens == 0, what="token voided")


# -- take atomicity, session death -----------------------------------------------------------------------------

TAKE_AND_DIE = """
import fdbroker, os, sys, time
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb
c = fdbroker.Client()
resp = c.raw.call("Take", pb.TakeRequest(name="atom/x"), name="atom/x")
kind, item, fd = c.raw.await_answers([resp.handoff.token])[0]
assert kind == "deliver", kind
print("DELIVERED", fd, flush=True)
time.sleep(120)   # never acks
"""


def test_take_receiver_killed_before_ack_leaves_the_entry(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client() as c:
            c.put("atom/x", w)
        os.close(w)
        w = -1
        child = spawn_client(fdbroker_broker.run_dir, TAKE_AND_DIE)
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("DELIVERED"), (line, child.stderr.read() if child.stderr else "")
        # the receiver really has the descriptor: the take is past delivery, only the Ack is missing
        fd_in_child = int(line.split()[1])
        assert os.stat(f"/proc/{child.pid}/fd/{fd_in_child}").st_ino == os.fstat(r).st_ino
        with fdbroker_broker.client() as other:
            from fdbroker.errors import FailedPrecondition

            with pytest.raises(FailedPrecondition) as ei:  # reserved while the take is in flight
                other.take("atom/x")
            assert "atom/x" in str(ei.value) and "taken" in str(ei.value)
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            if child.stderr:
                child.stderr.close()
            assert other.stat("atom/x").name == "atom/x"  # nothing was lost
            taken = other.take("atom/x")
            os.write(taken.fileno(), b"moved")
            taken.close()
            assert [e.name for e in other.list("atom/")] == []
        assert os.read(r, 10) == b"moved"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


DIE_HOLDING = """
import fdbroker, os, time
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb
r, w = os.pipe()
c = fdbroker.Client(prefetch=4)
c.put("dead/eph1", r, ephemeral=True)
c.put("dead/eph2", w, ephemeral=True)
c.put("dead/kept", r)
g = c.raw.call("Get", pb.GetRequest(name="dead/eph1", prefetch=4))  # 4 prefetched GET tokens pending
os.close(c.raw.await_answers([g.handoffs[0].token])[0].fd)
gets = list(g.prefetch_tokens)
put = c.raw.call("Put", pb.PutRequest(name="dead/never")).handoff.token
print("TOKENS", put.hex(), " ".join(t.hex() for t in gets), flush=True)
time.sleep(120)
"""


def test_killed_session_drops_entries_and_voids_tokens(fdbroker_broker, ctl, probe):
    child = spawn_client(fdbroker_broker.run_dir, DIE_HOLDING)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line and line[0] == "TOKENS", child.stderr.read() if child.stderr else ""
        put_tok, get_toks = bytes.fromhex(line[1]), [bytes.fromhex(t) for t in line[2:]]
        assert len(get_toks) == 4
        info = ctl.call("GetInfo", pb.GetInfoRequest())
        assert info.pending_tokens == 5 and info.entries == 3
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for f in (child.stdout, child.stderr):
            if f:
                f.close()
    wait_until(lambda: [n for n, _ in ctl.snapshot()] == ["dead/kept"], what="ephemeral entries removed")
    assert ctl.call("GetInfo", pb.GetInfoRequest()).pending_tokens == 0
    with RawConduit(fdbroker_broker.run_dir) as rc:
        rc.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=get_toks[:1])))
        (e, fds) = rc.recv_kind("error")
        assert not fds and e.code == Code.FAILED_PRECONDITION and "unknown handoff token" in e.message, e
        deposit(rc, [put_tok], [probe.send_fd])
        (done, _) = rc.recv_kind("deposited")
        assert "unknown handoff token" in done.results[0].error.message
        assert probe.closed_everywhere()
        assert [n for n, _ in ctl.snapshot()] == ["dead/kept"]
        ctl.call("Delete", pb.DeleteRequest(name="dead/kept"), rc.session_id)


# -- access control with real uids -----------------------------------------------------------------------------

POLICY = """
[[rule]]
uids = [65534]
names = ["web/*"]
allow = ["get", "stat"]
"""

POLICY_DB_TOO = POLICY.replace('names = ["web/*"]', 'names = ["web/*", "db/*"]')

NOBODY_CLIENT = """
import fdbroker, json, os, socket, sys
from fdbroker.errors import BrokerError
from fdbroker.v1 import broker_pb2 as pb
out = {}
def attempt(key, fn):
    try:
        v = fn()
        out[key] = "ok"
        return v
    except BrokerError as e:
        out[key] = [type(e).__name__, str(e)]
with fdbroker.Client() as c:
    # anonymous first: listing works, moving a descriptor does not
    out["anon_list"] = [e.name for e in c.list()]
    attempt("anon_get", lambda: c.raw.call("Get", pb.GetRequest(name="web/https"), session=False))
    s = attempt("get_web", lambda: c.get("web/https"))
    if s is not None:
        out["web_is_listener"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        s.close()
    attempt("get_db", lambda: c.get("db/primary"))
    attempt("delete_web", lambda: c.delete("web/https"))
    attempt("take_web", lambda: c.take("web/https"))
    r, w = os.pipe()
    e = attempt("put_own", lambda: c.put("nobody/mine", r))
    os.close(r); os.close(w)
    # GetInfo with the session, after claiming to be root in metadata: the kernel's identity wins
    raw = c.stub.GetInfo(pb.GetInfoRequest(), metadata=[("fdbroker-session", c.connect()), ("uid", "0")])
    out["caller"] = [raw.caller.uid, raw.caller.gid, raw.caller.pid == os.getpid()]
    out["owner"] = [x.owner.uid for x in c.raw.call("List", pb.ListRequest(prefix="nobody/")).entries]
    attempt("delete_own", lambda: c.delete("nobody/mine"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def nobody_python():
    if os.geteuid() != 0:
        pytest.skip("needs root to run clients as uid 65534")
    cmd = unprivileged_python()
    if cmd is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    return cmd


def _nobody(nobody_python, run_dir, code=NOBODY_CLIENT):
    import json

    r = run_as(nobody_python, code, env={"FDBROKER_RUN_DIR": str(run_dir)})
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_policy_with_real_uids_and_reload(nobody_python, tmp_path):
    import socket

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    os.chmod(tmp_path, 0o755)
    args = ["--socket-mode", "0666", "--policy", str(policy)]
    lsock = socket.create_server(("127.0.0.1", 0))
    r, w = os.pipe()
    try:
        with custom_broker(args) as b:
            # modes: the run directory is not writable by others; the sockets are exactly as asked
            assert stat.S_IMODE(os.stat(b.run_dir).st_mode) == 0o755
            for sock in ("control.sock", "conduit.sock"):
                st = os.stat(b.run_dir / sock)
                assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666, oct(st.st_mode)
            with b.client() as c:
                c.put("web/https", lsock)
                c.put("db/primary", r)
            out = _nobody(nobody_python, b.run_dir)
            assert out["anon_list"] == ["db/primary", "web/https"]
            assert out["anon_get"][0] == "Unauthenticated" and "session" in out["anon_get"][1]
            assert out["get_web"] == "ok" and out["web_is_listener"] == 1
            assert out["get_db"][0] == "PermissionDenied" and "db/primary" in out["get_db"][1]
            assert out["delete_web"][0] == "PermissionDenied" and "web/https" in out["delete_web"][1]
            assert out["take_web"][0] == "PermissionDenied"
            assert out["put_own"] == "ok" and out["delete_own"] == "ok"
            assert out["caller"] == [NOBODY, NOBODY, True]  # the kernel's identity, not a claim
            assert out["owner"] == [NOBODY]
            with b.client() as c:
                assert c.stat("web/https").name == "web/https"  # untouched

            # reload: a good file takes effect for new calls ...
            policy.write_text(POLICY_DB_TOO)
            os.kill(b.pid, signal.SIGHUP)
            wait_until(lambda: "policy reloaded" in b.log(), what="policy reload")
            assert _nobody(nobody_python, b.run_dir)["get_db"] == "ok"
            # ... a bad one is logged with its line and the old policy stays
            policy.write_text(POLICY + '\n[[rule]]\nuids = [65534]\nallow = ["gett"]\n')
            os.kill(b.pid, signal.SIGHUP)
            wait_until(lambda: "policy reload failed" in b.log(), what="failed reload logged")
            assert "gett" in b.log()
            assert _nobody(nobody_python, b.run_dir)["get_db"] == "ok"
            with b.client() as c:
                c.delete("web/https")
                c.delete("db/primary")
    finally:
        lsock.close()
        os.close(r)
        os.close(w)


def test_default_socket_modes_keep_other_uids_out(fdbroker_broker, nobody_python):
    for sock in ("control.sock", "conduit.sock"):
        st = os.stat(fdbroker_broker.run_dir / sock)
        assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    # a uid outside the owner and group cannot even connect
    run_dir = new_run_dir()
    run_dir.mkdir(mode=0o755)
    # the fixture's run dir lives in a 0700 temp dir; use a twin broker whose directory others can reach
    with custom_broker(run_dir=run_dir) as b:
        r = run_as(
            nobody_python,
            """
            import fdbroker
            from fdbroker.errors import BrokerError
            try:
                fdbroker.Client().connect()
            except BrokerError as e:
                print("REFUSED", type(e).__name__, e)
            """,
            env={"FDBROKER_RUN_DIR": str(b.run_dir)},
            check=False,
        )
        assert "REFUSED" in r.stdout and "Permission denied" in r.stdout, (r.stdout, r.stderr)


def test_a_deposit_of_no_tokens_is_answered_by_an_empty_deposited(fdbroker_broker):
    """Splitting answers by size must not drop the answer to an empty Deposit (the conduit fuzz found it)."""
    with RawConduit(fdbroker_broker.run_dir) as rc:
        rc.send(cpb.ConduitFrame(deposit=cpb.Deposit()))
        (d, fds) = rc.recv_kind("deposited")
        assert list(d.results) == [] and fds == []
