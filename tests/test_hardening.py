"""The hardening guarantees (issue 7), each attacked for real: an unprivileged uid through setpriv, real sockets,
real descriptors, the broker's own descriptor table read from /proc.

* caller-supplied times are range-checked at the door (property tests over the edges, in process and end to end);
* a descriptor reaches only the process the policy gives it to, whatever sequence of requests another uid sends;
* no close of a client's descriptor runs on the event loop (SO_LINGER sockets by every route);
* sessions equal live conduit connections, whoever hangs up when;
* watchers are capped; speculative prefetch never fails an explicit operation; malformed requests are
  INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secutil import (
    NOBODY,
    Control,
    RawConduit,
    custom_broker,
    new_run_dir,
    run_as,
    unprivileged_python,
)

from fdbroker import limits
from fdbroker.broker.core import Broker, BrokerConfig
from fdbroker.broker.policy import Identity, Policy
from fdbroker.client import Client
from fdbroker.conduit.frames import encode_frame
from fdbroker.errors import BrokerError, Code, InvalidArgument
from fdbroker.testing import BrokerProcess, wait_until
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

HELPERS = Path(__file__).resolve().parent / "helpers"
MAX_DURATION_SECONDS = 315_576_000_000


# -- in-process: the range checks ------------------------------------------------------------------------------


class Sink:
    """Where an in-process broker's frames for a session go (they are dropped; descriptors are not ours)."""

    def send(self, message: cpb.ConduitFrame, fds: object = ()) -> None:
        pass

    def send_raw(self, data: bytes, fds: object = ()) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(BrokerConfig(capacity=64), Policy.default(broker_uid=0))
    yield b
    b.close()


def _duration(seconds: int, nanos: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.seconds, d.nanos = seconds, nanos  # raw fields: the wire can carry anything, normalized or not
    return d


edges = st.sampled_from(
    [0, 1, 59, 86400, 366 * 86400, 366 * 86400 + 1, MAX_DURATION_SECONDS, 2**62, -1, -(2**62)]
)
nanos = st.sampled_from([0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31)])


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seconds=st.one_of(edges, st.integers(-(2**63), 2**63 - 1)),
    nanos=st.one_of(nanos, st.integers(-(2**31), 2**31 - 1)),
)
def test_entry_ttl_is_accepted_exactly_inside_its_documented_range(
    broker: Broker, seconds: int, nanos: int
) -> None:
    s = broker.open_session(Identity(1, 0, 0), Sink())
    try:
        req = pb.PutRequest(name="ttl/edge")
        req.options.ttl.CopyFrom(_duration(seconds, nanos))
        total = seconds * 10**9 + nanos
        inside = seconds >= 0 and 0 <= nanos < 10**9 and total <= limits.MAX_ENTRY_TTL * 10**9
        inside = inside and (total == 0 or total >= limits.MIN_ENTRY_TTL * 10**9)
        try:
            r = broker.put_begin(s, req)
        except InvalidArgument as err:
            assert not inside, f"refused a valid ttl ({seconds}s {nanos}ns): {err}"
            assert "ttl" in err.message and "ttl/edge" in err.message
        else:
            assert inside, f"accepted ttl {seconds}s {nanos}ns"
            assert r.handoff.expire_time.seconds > 0
    finally:
        broker.end_session(s)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(seconds=st.one_of(edges, st.integers(-(2**63), 2**63 - 1)), nanos=nanos)
def test_lease_ttl_is_range_checked_before_anything_happens(broker: Broker, seconds: int, nanos: int) -> None:
    s = broker.open_session(Identity(1, 0, 0), Sink())
    try:
        req = pb.LeaseRequest(name="no/such/entry")
        req.ttl.CopyFrom(_duration(seconds, nanos))
        total = seconds * 10**9 + nanos
        inside = seconds >= 0 and 0 <= nanos < 10**9
        inside = inside and limits.MIN_LEASE_TTL * 10**9 <= total <= limits.MAX_LEASE_TTL * 10**9
        with pytest.raises(BrokerError) as ei:
            asyncio.run(broker.lease(s, req, None))
        # A valid ttl gets as far as looking the entry up (NOT_FOUND); an invalid one never does.
        assert (ei.value.code == Code.NOT_FOUND) == inside, ei.value
    finally:
        broker.end_session(s)


def test_limits_are_far_inside_the_timestamp_range() -> None:
    # An expiry computed from any wall clock before 9998 plus the largest TTL must still be a valid Timestamp.
    from google.protobuf import timestamp_pb2

    t = timestamp_pb2.Timestamp()
    import datetime

    y9998 = datetime.datetime(9998, 1, 1, tzinfo=datetime.UTC).timestamp()
    t.FromNanoseconds(int((y9998 + limits.MAX_ENTRY_TTL) * 1e9))
    assert limits.MAX_LEASE_TTL <= limits.MAX_ENTRY_TTL


# -- end to end: what a local attacker sends -------------------------------------------------------------------


@pytest.fixture(scope="module")
def nobody() -> list[str]:
    cmd = unprivileged_python()
    if cmd is None:
        pytest.skip("cannot run Python as uid 65534 here (setpriv missing or the venv unreadable)")
    return cmd


def _open_broker(extra: list[str] | None = None) -> contextlib.AbstractContextManager[BrokerProcess]:
    return custom_broker(["--socket-mode", "0666", "--token-ttl", "1", *(extra or [])], run_dir=new_run_dir())


def test_a_ttl_past_the_timestamp_range_is_refused_and_poisons_nothing(nobody: list[str]) -> None:
    """The reported attack: a put with the largest Duration used to store an entry that could not be encoded,
    close its descriptor on an error path and keep the number, so the next descriptor the broker opened went to
    the attacker's take, and List/Stat/Query failed for everyone."""
    with _open_broker() as b, Control(b.run_dir) as ctl:
        code = f"""
            import sys, json
            sys.path.insert(0, {str(HELPERS.parent)!r})
            import grpc
            from google.protobuf import duration_pb2
            from secutil import Control, RawConduit
            from fdbroker.v1 import broker_pb2 as pb
            from fdbroker.v1 import conduit_pb2 as cpb
            out = []
            with Control({str(b.run_dir)!r}) as ctl, RawConduit({str(b.run_dir)!r}) as rc:
                for s, n in [({MAX_DURATION_SECONDS}, 999999999), (2**62, 0), (-1, 0), (0, 1000000000), (366*86400, 1)]:
                    req = pb.PutRequest(name="p/x")
                    req.options.ttl.seconds, req.options.ttl.nanos = s, n
                    try:
                        ctl.call("Put", req, rc.session_id)
                        out.append("OK")
                    except grpc.RpcError as e:
                        out.append(e.code().name + ": " + e.details())
            print(json.dumps(out))
        """
        answers = json.loads(run_as(nobody, code).stdout)
        assert [a.split(":")[0] for a in answers] == ["INVALID_ARGUMENT"] * 5, answers
        assert "entry ttl for 'p/x'" in answers[0], answers
        assert ctl.snapshot() == []
        with pytest.raises(grpc.RpcError) as ei:
            ctl.call("Stat", pb.StatRequest(name="p/x"))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        with RawConduit(b.run_dir) as rc:
            rc.send(cpb.ConduitFrame(query=cpb.Query(id=7, list=pb.ListRequest())))
            (res, _) = rc.recv_kind("query_result")
            assert res.id == 7 and not res.HasField("error")


def _root_depositor(
    run_dir: Path, stop: threading.Event, seen: set[tuple[int, int]], errors: list[str]
) -> None:
    """Root keeps depositing and replacing secret pipes, so the broker keeps opening, closing and reusing
    descriptor numbers while the thief works. Every secret's (dev, inode) goes into ``seen``."""
    from fdbroker import Client

    i = 0
    try:
        with Client(run_dir) as c:
            while not stop.is_set():
                r, w = os.pipe()
                try:
                    st_ = os.fstat(r)
                    seen.add((st_.st_dev, st_.st_ino))
                    c.put(f"root/secret{i % 8}", r, replace=True)
                    if i % 5 == 4:
                        c.delete(f"root/secret{i % 8}")
                finally:
                    os.close(r)
                    os.close(w)
                i += 1
    except Exception as err:  # reported by the test
        errors.append(repr(err))


@pytest.mark.slow
def test_an_unprivileged_uid_never_obtains_a_descriptor_it_did_not_deposit(nobody: list[str]) -> None:
    rounds = int(os.environ.get("FDBROKER_THIEF_ROUNDS", "6"))
    with _open_broker() as b:
        stop = threading.Event()
        secrets_seen: set[tuple[int, int]] = set()
        errors: list[str] = []
        t = threading.Thread(target=_root_depositor, args=(b.run_dir, stop, secrets_seen, errors))
        t.start()
        try:
            r = subprocess.run(
                [*nobody, str(HELPERS / "thief.py"), str(b.run_dir), str(rounds), "7"],
                capture_output=True,
                text=True,
                timeout=300,
                cwd="/",
            )
        finally:
            stop.set()
            t.join()
        assert r.returncode == 0, r.stderr[-4000:]
        report = json.loads(r.stdout)
        received = {tuple(x) for x in report["received"]}
        deposited = {tuple(x) for x in report["deposited"]}
        assert not errors, errors
        assert secrets_seen, "root deposited nothing"
        stolen = received & secrets_seen
        assert not stolen, f"the thief received {len(stolen)} of root's descriptors"
        assert received <= deposited, (
            f"the thief received descriptors it never deposited: {received - deposited}"
        )
        answers = report["answers"]
        # It did get its own descriptors back (the routes were exercised), and every refusal was a clear code.
        assert report["received"], answers
        assert not any(k.endswith((":UNKNOWN", ":INTERNAL")) for k in answers), answers
        for k in [k for k in answers if k.startswith("Put:")]:
            assert k.split(":")[1] in {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "ALREADY_EXISTS"}, (
                answers
            )
        with b.client() as c:
            for e in c.list("thief/"):
                c.delete(e.name)
            for e in c.list("root/"):
                c.delete(e.name)


# -- close off the loop ----------------------------------------------------------------------------------------

LINGER = 60  # seconds a close of one of these sockets would block


class Lingering:
    """A TCP socket whose last close blocks for LINGER seconds: SO_LINGER {1, LINGER} and unsent data queued to a
    peer that never reads. ``fd`` is ours to send (and close); :meth:`release` ends the linger at once (the peer
    resets), so the test never waits for it."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.connect(self.listener.getsockname())
        self.peer, _ = self.listener.accept()
        s.setblocking(False)
        try:
            while True:
                s.send(b"x" * 65536)
        except BlockingIOError:
            pass
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER))
        self.fd = s.detach()

    def drop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # our copy is not the last: the broker holds one
            self.fd = -1

    def release(self) -> None:
        self.drop()
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.peer.close()  # RST: a lingering close on the other side returns now
        self.listener.close()


def _lingering_closes(pid: int) -> int:
    """Threads of ``pid`` blocked in a socket close's linger (the kernel's wait_woken in sk_stream_wait_close)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                n += f.read().strip() == "wait_woken"
        except OSError:
            pass
    return n


def _served_while_lingering(
    b: BrokerProcess, other: Client, route: Callable[[Lingering], None], spare: int
) -> None:
    """Run ``route(lingering)``; then another client's calls must all complete while the broker still has a
    thread blocked in that close — an ordering check, not a timing one: had the close run on the event loop, the
    calls would have waited LINGER seconds, by which time the close would be over."""
    ling = Lingering()
    try:
        route(ling)
        ling.drop()
        wait_until(
            lambda: _lingering_closes(b.pid) >= 1, timeout=20, what="the broker's lingering close to start"
        )
        for _ in range(20):
            other.info()
            other.put("other/x", spare, replace=True)
            got = other.get("other/x")
            got.close()
        assert _lingering_closes(b.pid) >= 1, "the lingering close was over before other calls were served"
    finally:
        ling.release()
    wait_until(lambda: _lingering_closes(b.pid) == 0, timeout=20, what="the lingering close to end")


def test_no_close_of_a_client_descriptor_blocks_the_event_loop() -> None:
    with custom_broker(["--token-ttl", "1"]) as b, b.client() as other, b.client() as attacker:
        rc = RawConduit(b.run_dir)
        spare, spare_w = os.pipe()  # a plain pipe the other client keeps depositing
        try:

            def split_send(frame: cpb.ConduitFrame, ling: Lingering) -> None:
                # The descriptor rides on the length prefix; ours is closed before the rest of the frame goes,
                # so the broker's close (when it handles the frame) is the last one, the one that lingers.
                data = encode_frame(frame, 1)
                rc.send_raw(data[:4], [ling.fd])
                ling.drop()
                rc.send_raw(data[4:])

            def bad_token(ling: Lingering) -> None:
                split_send(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[os.urandom(32)])), ling)

            def unsolicited(kind: str) -> Callable[[Lingering], None]:
                def route(ling: Lingering) -> None:
                    frame = {
                        "ping": cpb.ConduitFrame(ping=cpb.Ping(nonce=1)),
                        "redeem": cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[os.urandom(32)])),
                        "ack": cpb.ConduitFrame(ack=cpb.Ack(tokens=[os.urandom(32)])),
                        "query": cpb.ConduitFrame(query=cpb.Query(id=1, info=pb.GetInfoRequest())),
                    }[kind]
                    split_send(frame, ling)

                route.__name__ = f"unsolicited_{kind}"
                return route

            def deleted(ling: Lingering) -> None:
                attacker.put("ling/del", ling.fd)
                ling.drop()
                attacker.delete("ling/del")

            def replaced(ling: Lingering) -> None:
                attacker.put("ling/rep", ling.fd)
                ling.drop()
                attacker.put("ling/rep", spare, replace=True)

            def expired(ling: Lingering) -> None:
                attacker.put("ling/exp", ling.fd, ttl=1)
                ling.drop()

            def session_end(ling: Lingering) -> None:
                with b.client() as eph:
                    eph.put("ling/eph", ling.fd, ephemeral=True)
                    ling.drop()

            routes = [bad_token, *(unsolicited(k) for k in ("ping", "redeem", "ack", "query"))]
            routes += [deleted, replaced, expired, session_end]
            for route in routes:
                _served_while_lingering(b, other, route, spare)
            attacker.delete("ling/rep")
            other.delete("other/x")
        finally:
            rc.close()
            os.close(spare)
            os.close(spare_w)


# -- sessions equal live connections ---------------------------------------------------------------------------


def test_sessions_equal_live_connections_after_1000_connect_close_cycles() -> None:
    """Some clients read their Welcome, some hang up before it was sent (the broker's send then fails): the
    session table must come back to zero, and the uid is not locked out."""
    with custom_broker() as b, Control(b.run_dir) as ctl:
        path = str(b.run_dir / "conduit.sock")
        for i in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            if i % 3 == 0:
                s.recv(1)  # part of the Welcome, then gone mid-frame
            s.close()  # i % 3 != 0: gone before the broker even accepted it
        wait_until(lambda: ctl.call("GetInfo", pb.GetInfoRequest()).sessions == 0, what="sessions back to 0")
        with RawConduit(b.run_dir) as rc:  # a new one opens
            assert rc.session_id
            assert ctl.call("GetInfo", pb.GetInfoRequest()).sessions == 1


# -- fairness --------------------------------------------------------------------------------------------------

WATCH_LIMITS = """
[limits]
max_watchers_per_uid = 3
max_anonymous_watchers = 2
"""


def _watch(ctl: Control, session: str | None) -> object:
    call = ctl.stub.Watch(pb.WatchRequest(), metadata=[("fdbroker-session", session)] if session else [])
    next(call)  # the header: the stream is open
    return call


def test_watchers_are_capped_per_uid_and_in_total_for_anonymous_callers(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(WATCH_LIMITS)
    with (
        custom_broker(["--policy", str(policy)]) as b,
        Control(b.run_dir) as ctl,
        RawConduit(b.run_dir) as rc,
    ):
        calls = [_watch(ctl, None) for _ in range(2)]
        with pytest.raises(grpc.RpcError) as ei:
            _watch(ctl, None)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_anonymous_watchers" in ei.value.details()
        calls += [_watch(ctl, rc.session_id) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as ei:
            _watch(ctl, rc.session_id)
        assert "uid 0" in ei.value.details() and "max_watchers_per_uid" in ei.value.details()
        for c in calls:
            c.cancel()  # type: ignore[attr-defined]
        # The quota comes back when streams end.
        wait_until(lambda: _try_watch(ctl), what="a watch slot to free up")


def _try_watch(ctl: Control) -> bool:
    try:
        _watch(ctl, None).cancel()  # type: ignore[attr-defined]
        return True
    except grpc.RpcError:
        return False


def test_watch_from_the_future_or_from_a_garbage_revision_is_invalid_argument(fdbroker_broker) -> None:
    with Control(fdbroker_broker.run_dir) as ctl:
        rev = ctl.revision()
        for start in (rev + 2, 2**63, 2**64 - 1):
            call = ctl.stub.Watch(pb.WatchRequest(start_revision=start))
            with pytest.raises(grpc.RpcError) as ei:
                next(call)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, start
            assert "in the future" in ei.value.details()


PREFETCH_LIMITS = """
[limits]
max_pending_tokens_per_uid = 64
"""


def test_prefetch_never_makes_an_explicit_operation_fail(tmp_path: Path) -> None:
    """Eight well-behaved clients of one uid, each getting a name over and over (the clients prefetch up to 256
    tokens) and putting: before, the prefetched tokens used up the uid's pending-token quota and puts failed."""
    policy = tmp_path / "p.toml"
    policy.write_text(PREFETCH_LIMITS)
    errors: list[str] = []
    with custom_broker(["--policy", str(policy)]) as b:
        r, w = os.pipe()
        try:
            with b.client() as c:
                for k in range(8):
                    c.put(f"pf/{k}", r)

            def worker(k: int) -> None:
                try:
                    with b.client() as c:
                        for i in range(120):
                            c.get(f"pf/{k}").close()
                            if i % 10 == 0:
                                c.put(f"pf/{k}/n{i}", r)
                                c.delete(f"pf/{k}/n{i}")
                except Exception as err:
                    errors.append(repr(err))

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with b.client() as c:
                for k in range(8):
                    c.delete(f"pf/{k}")
        finally:
            os.close(r)
            os.close(w)
    assert not errors, errors[:3]


def test_malformed_requests_are_invalid_argument(fdbroker_broker) -> None:
    channel = grpc.insecure_channel(f"unix://{fdbroker_broker.run_dir / 'control.sock'}")
    try:
        for method in (
            "GetInfo",
            "Put",
            "Get",
            "List",
            "Stat",
            "Delete",
            "Take",
            "BatchGet",
            "BatchPut",
            "Release",
        ):
            call = channel.unary_unary(f"/fdbroker.v1.FdBroker/{method}")
            with pytest.raises(grpc.RpcError) as ei:
                call(b"\xff\xff\xff\xff\x0f", timeout=10)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, ei.value)
            assert "not a valid fdbroker.v1 message" in ei.value.details()
        watch = channel.unary_stream("/fdbroker.v1.FdBroker/Watch")
        with pytest.raises(grpc.RpcError) as ei:
            next(watch(b"\x0a\xff", timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A page token nested deeply enough to make a JSON decoder recurse, and one far too long.
        stub_list = channel.unary_unary(
            "/fdbroker.v1.FdBroker/List",
            request_serializer=pb.ListRequest.SerializeToString,
            response_deserializer=pb.ListResponse.FromString,
        )
        import base64

        for token in (base64.urlsafe_b64encode(b"[" * 100_000).decode(), "A" * 5000, "%%%", "Zm9v"):
            with pytest.raises(grpc.RpcError) as ei:
                stub_list(pb.ListRequest(page_token=token), timeout=10)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token[:20]
            assert "page_token" in ei.value.details()
    finally:
        channel.close()


# -- a refusal does not say whether a name exists ---------------------------------------------------------------

HIDDEN_NAMES = """
# Nobody but root may do anything under secret/: every refusal is decided by the name alone.
[[rule]]
names = ["secret/**"]
deny = ["*"]

# hidden/ may not be seen; get, take, delete, lease are left to the built-in rule (own entries only), which
# depends on the owner: the refusal must still not depend on whether the entry is there.
[[rule]]
names = ["hidden/**"]
deny = ["stat", "list", "watch"]

[anonymous]
names = ["public/**"]
"""

_PROBE_NAMES = f"""
    import sys, json
    sys.path.insert(0, {str(HELPERS.parent)!r})
    import grpc
    from google.protobuf import duration_pb2
    from secutil import Control, RawConduit
    from fdbroker.v1 import broker_pb2 as pb
    from fdbroker.v1 import conduit_pb2 as cpb
    run_dir, names = RUN_DIR, NAMES
"""


def test_a_refused_caller_cannot_tell_whether_a_name_exists(nobody: list[str], tmp_path: Path) -> None:
    """uid 65534 asks for every by-name operation on names root holds and on names nobody holds, where the
    policy refuses it: the answers (code and message, the name aside) are the same, and never NOT_FOUND. Before,
    the broker looked the entry up first: NOT_FOUND for an absent name, PERMISSION_DENIED for a present one."""
    policy = tmp_path / "p.toml"
    policy.write_text(HIDDEN_NAMES)
    os.chmod(tmp_path, 0o755)
    code = (
        _PROBE_NAMES
        + """
    out = {}
    ttl = duration_pb2.Duration(seconds=5)
    with Control(run_dir) as ctl, RawConduit(run_dir) as rc:
        sid = rc.session_id
        calls = {
            "stat": lambda n: ctl.call("Stat", pb.StatRequest(name=n), sid),
            "anonymous stat": lambda n: ctl.call("Stat", pb.StatRequest(name=n)),
            "anonymous delete": lambda n: ctl.call("Delete", pb.DeleteRequest(name=n)),
            "get": lambda n: ctl.call("Get", pb.GetRequest(name=n), sid),
            "batch get": lambda n: ctl.call("BatchGet", pb.BatchGetRequest(names=[n]), sid),
            "take": lambda n: ctl.call("Take", pb.TakeRequest(name=n), sid),
            "delete": lambda n: ctl.call("Delete", pb.DeleteRequest(name=n), sid),
            "lease": lambda n: ctl.call("Lease", pb.LeaseRequest(name=n, ttl=ttl), sid),
        }
        for n in names:
            for what, call in calls.items():
                try:
                    call(n)
                    out[f"{what} {n}"] = "OK"
                except grpc.RpcError as e:
                    out[f"{what} {n}"] = e.code().name + ": " + e.details().replace(n, "NAME")
            rc.send(cpb.ConduitFrame(query=cpb.Query(id=1, stat=pb.StatRequest(name=n))))
            (res, _) = rc.recv_kind("query_result")
            out[f"query stat {n}"] = str(res.error.code) + ": " + res.error.message.replace(n, "NAME")
    print(json.dumps(out))
"""
    )
    names = ["secret/there", "secret/absent", "hidden/there", "hidden/absent"]
    r, w = os.pipe()
    try:
        with custom_broker(["--socket-mode", "0666", "--policy", str(policy)]) as b:
            with Client(b.run_dir) as c:
                c.put("secret/there", r)
                c.put("hidden/there", r)
            answers = json.loads(
                run_as(
                    nobody,
                    code.replace("RUN_DIR", repr(str(b.run_dir))).replace("NAMES", repr(names)),
                    timeout=60,
                ).stdout
            )
            with Client(b.run_dir) as c:
                c.connect()  # listed as root: anonymous callers see only public/
                assert sorted(e.name for e in c.list()) == ["hidden/there", "secret/there"]  # nothing changed
    finally:
        os.close(r)
        os.close(w)
    for prefix in ("secret", "hidden"):
        for what in (
            "stat",
            "anonymous stat",
            "anonymous delete",
            "get",
            "batch get",
            "take",
            "delete",
            "lease",
            "query stat",
        ):
            there, absent = answers[f"{what} {prefix}/there"], answers[f"{what} {prefix}/absent"]
            assert there == absent, (what, there, absent)
            assert not there.startswith(("NOT_FOUND", "5:")), (what, there)
            assert "uid 0" not in there, (what, there)  # nor who owns it


# -- leases per uid are capped ----------------------------------------------------------------------------------

LEASE_LIMITS = """
[[rule]]
uids = [65534]
names = ["l/**"]
allow = ["lease"]

[limits]
max_leases_per_uid = 2
max_lease_waiters_per_uid = 2
"""

_LEASE_HOG = f"""
    import sys, json
    sys.path.insert(0, {str(HELPERS.parent)!r})
    import grpc
    from google.protobuf import duration_pb2
    from secutil import Control, RawConduit
    from fdbroker.v1 import broker_pb2 as pb
    out = {{}}
    ttl = duration_pb2.Duration(seconds=60)
    with Control(RUN_DIR) as ctl, RawConduit(RUN_DIR) as rc:
        md = [("fdbroker-session", rc.session_id)]
        def lease(key, name, wait=False):
            try:
                out[key] = "OK " + ctl.call("Lease", pb.LeaseRequest(name=name, ttl=ttl, wait=wait), rc.session_id).lease_id
            except grpc.RpcError as e:
                out[key] = e.code().name + ": " + e.details()
        lease("a", "l/a")
        lease("b", "l/b")
        lease("c", "l/c")  # a third held lease: refused
        ctl.call("Release", pb.ReleaseRequest(lease_id=out["b"][3:]), rc.session_id)
        waiters = [ctl.stub.Lease.future(pb.LeaseRequest(name="l/busy", ttl=ttl, wait=True), metadata=md, timeout=60)
                   for _ in range(2)]
        while ctl.call("Stat", pb.StatRequest(name="l/busy"), rc.session_id).entry.lease.waiters < 2:
            pass
        lease("third waiter", "l/busy", wait=True)  # a third queued request: refused
        lease("c again", "l/c")  # held: a and c, the limit
        print("queued", flush=True)
        sys.stdin.readline()  # root releases l/busy: each waiter in turn would be a third held lease
        for i, w in enumerate(waiters):
            try:
                out[f"waiter {{i}}"] = "OK " + w.result().lease_id
            except grpc.RpcError as e:
                out[f"waiter {{i}}"] = e.code().name + ": " + e.details()
    print(json.dumps(out), flush=True)
"""


def test_leases_and_queued_lease_requests_are_capped_per_uid(nobody: list[str], tmp_path: Path) -> None:
    """uid 65534 may hold max_leases_per_uid leases and queue max_lease_waiters_per_uid requests, no more: past
    either it is RESOURCE_EXHAUSTED naming the limit, counted as a quota refusal and audited; a queued request
    whose turn comes while its uid holds the limit is refused the same way, and the next in line is served.
    Before, a uid could hold and queue without bound."""
    from opsutil import audit_records, matching, scrape, tcp_metrics_address

    policy = tmp_path / "p.toml"
    policy.write_text(LEASE_LIMITS)
    os.chmod(tmp_path, 0o755)
    args = ["--socket-mode", "0666", "--policy", str(policy), "--log-format", "json"]
    r, w = os.pipe()
    try:
        with custom_broker([*args, "--metrics-listen", "127.0.0.1:0"]) as b, Client(b.run_dir) as root:
            for name in ("l/a", "l/b", "l/c", "l/busy"):
                root.put(name, r)
            busy = root.lease("l/busy", ttl=60, keepalive=False)
            code = textwrap.dedent(_LEASE_HOG).replace("RUN_DIR", repr(str(b.run_dir)))
            hog = subprocess.Popen(
                [*nobody, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
            )
            try:
                assert hog.stdout is not None and hog.stdin is not None
                assert hog.stdout.readline().strip() == "queued"
                busy.release()
                hog.stdin.write("go\n")
                hog.stdin.flush()
                out = json.loads(hog.stdout.readline())
            finally:
                hog.kill()
                hog.wait()
            refusals = scrape(tcp_metrics_address(b)).value
            log = b.log()
    finally:
        os.close(r)
        os.close(w)
    assert out["a"].startswith("OK") and out["b"].startswith("OK") and out["c again"].startswith("OK"), out
    assert out["c"].startswith("RESOURCE_EXHAUSTED") and "max_leases_per_uid" in out["c"], out
    assert "uid 65534 holds 2 leases" in out["c"], out
    assert out["third waiter"].startswith("RESOURCE_EXHAUSTED"), out
    assert "max_lease_waiters_per_uid" in out["third waiter"], out
    for i in range(2):
        assert (
            out[f"waiter {i}"].startswith("RESOURCE_EXHAUSTED") and "max_leases_per_uid" in out[f"waiter {i}"]
        )
    assert refusals("fdbroker_quota_refusals_total", quota="max_leases_per_uid") == 3
    assert refusals("fdbroker_quota_refusals_total", quota="max_lease_waiters_per_uid") == 1
    audited = matching(audit_records(log), verb="lease", outcome="refused", uid=NOBODY)
    assert (
        sorted(rec["quota"] for rec in audited) == ["max_lease_waiters_per_uid"] + ["max_leases_per_uid"] * 3
    )
