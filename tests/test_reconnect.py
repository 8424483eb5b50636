"""Clients ride through a takeover and a restart (issue 9, section 2; docs/client.md, "Reconnecting").

* The rules, deterministically: each verb's flow driven by hand (tests/flowutil.py), the broker going away at
  each step — what is tried again, what is settled by asking the successor, what is ``OutcomeUnknown``.
* Both drivers against the scripted broker (tests/fakebroker.py) forgetting every session, as a successor does.
* For real: 8 client processes (4 blocking, 4 asyncio; two callers sharing each client) hammering put, get,
  take, delete, stat, list and info while the broker is replaced (``serve --takeover``) — and, once
  ``serve --keeper`` exists, while the keeper restarts a SIGKILLed broker. 0 failed calls, 0 wrong answers
  (inode identity of every descriptor received, the final state against every answer), every unknown outcome
  reported as such and checked against the final state; a watcher resumes without loss or repetition. The
  longest pause a caller saw is printed (never asserted: 2 shared cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerutil import child_env
from clientutil import client, close_watch, next_event
from fakebroker import FakeBroker
from flowutil import ByHand

import fdbroker
import fdbroker.aio
import fdbroker.errors
from fdbroker.client import flows
from fdbroker.client.session import Answer
from fdbroker.client.steps import AwaitAnswers, CallRpc, EndSession, SendFrame
from fdbroker.errors import (
    Aborted,
    DeadlineExceeded,
    NotFound,
    OutcomeUnknown,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from fdbroker.testing import BrokerProcess, wait_until
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

# -- the rules, by hand ----------------------------------------------------------------------------------------


def _state(**kw: Any) -> flows.State:
    """A client's state, as after a broker answered it once."""
    state = flows.State(None, threading.Event, **kw)
    state.reached = True
    return state


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def _deliver(token: bytes, fd: int, name: str = "x") -> list[Answer]:
    return [
        Answer(
            "deliver", cpb.DeliverItem(token=token, name=name, info=pb.DescriptorInfo(kind=pb.KIND_PIPE)), fd
        )
    ]


def _gone(hand: ByHand) -> Any:
    """The broker went away: the session's conduit closed under the step in progress."""
    hand.lose()
    return hand.fail(Aborted("the conduit to the broker broke"))


def test_a_get_is_tried_again_on_a_new_session(pipe: tuple[int, int]) -> None:
    state = _state()
    hand = ByHand(state, flows.get_fd(state, "g/1"))
    assert isinstance(hand.step, CallRpc) and hand.step.method == "Get" and hand.step.session == "s-1"
    step = _gone(hand)
    assert isinstance(step, CallRpc) and step.method == "Get" and step.session == "s-2" and step.ready
    step = hand.ok(pb.GetResponse(handoffs=[pb.Handoff(token=b"t")]))
    assert isinstance(step, AwaitAnswers) and step.session == "s-2"
    assert hand.ok(_deliver(b"t", os.dup(pipe[1]))) is None
    assert isinstance(hand.value, fdbroker.OwnedFd) and state.stats["retries"] == 1
    hand.value.close()


def test_an_unknown_session_is_ended_and_the_call_tried_again() -> None:
    state = _state()
    hand = ByHand(state, flows.stat(state, "s/1"))
    assert isinstance(hand.step, CallRpc) and hand.step.session == "s-1"
    step = hand.fail(Unauthenticated("unknown or ended session"))  # a successor answers
    assert EndSession("s-1") in hand.steps
    assert isinstance(step, CallRpc) and step.method == "Stat" and step.session == "s-2"
    hand.ok(pb.StatResponse(entry=pb.Entry(name="s/1")))
    assert hand.value.name == "s/1"


def test_a_refusal_is_not_tried_again() -> None:
    for err in (PermissionDenied("no"), NotFound("none"), Unauthenticated("anonymous callers may not")):
        state = _state()
        hand = ByHand(
            state, flows.stat(state, "s/1"), session=False
        )  # anonymous: UNAUTHENTICATED is a refusal
        assert hand.step.session is False
        with pytest.raises(type(err)):
            hand.fail(err)
        assert state.stats["retries"] == 0


def test_a_client_that_never_reached_a_broker_is_told_at_once() -> None:
    state = flows.State(None, threading.Event)  # nothing has answered it yet
    hand = ByHand(state, flows.info(state), session=False)
    with pytest.raises(Unavailable):
        hand.fail(Unavailable("no broker at /x"))
    state = flows.State(None, threading.Event)
    hand = ByHand(state, flows.delete(state, "d/1"))
    with pytest.raises(Unavailable):  # not OutcomeUnknown: no RPC of it ever reached a broker
        hand.fail(Unavailable("no broker at /x"))


def test_without_reconnect_nothing_is_tried_again() -> None:
    state = _state(reconnect=False)
    hand = ByHand(state, flows.get_fd(state, "g/1"))
    with pytest.raises(Aborted):
        _gone(hand)


def test_once_the_time_is_up_the_last_error_is_raised() -> None:
    state = _state(timeout=0.2)
    hand = ByHand(state, flows.info(state))
    step, tries = hand.step, 0
    with pytest.raises(Unavailable):
        while True:
            tries += 1
            if isinstance(step, CallRpc):
                step = hand.fail(Unavailable("no broker at /x"))
            else:  # the Ping that finds out whether the session lives: it does
                step = hand.ok(None) if isinstance(step, SendFrame) else hand.ok([Answer("pong", None, -1)])
    assert (tries > 2 and state.stats["retries"] == tries // 3 - 1) or state.stats["retries"] >= 1


def _put_to_deposit(hand: ByHand, revision: int = 10) -> Any:
    """Answer a put's RPC (its token issued at ``revision``) and its Deposit frame; the AwaitAnswers step."""
    assert isinstance(hand.step, CallRpc) and hand.step.method == "Put"
    resp = pb.PutResponse(handoff=pb.Handoff(token=b"pt"))
    resp.header.revision = revision
    step = hand.ok(resp)
    assert isinstance(step, SendFrame) and step.frame.WhichOneof("body") == "deposit"
    step = hand.ok(None)
    assert isinstance(step, AwaitAnswers)
    return step


def _mine(name: str, revision: int, **kw: Any) -> pb.StatResponse:
    e = pb.Entry(name=name, revision=revision, create_revision=revision)
    e.owner.pid, e.owner.uid = kw.get("pid", os.getpid()), kw.get("uid", os.getuid())
    e.create_time.FromNanoseconds(time.time_ns())
    return pb.StatResponse(entry=e)


def test_a_put_whose_deposit_never_went_out_is_tried_again(pipe: tuple[int, int]) -> None:
    state = _state()
    hand = ByHand(state, flows.put(state, "p/1", pipe[1]))
    hand.ok(pb.PutResponse(handoff=pb.Handoff(token=b"pt")))
    step = _gone(hand)  # the Deposit frame could not be sent: nothing was stored
    assert isinstance(step, CallRpc) and step.method == "Put" and step.session == "s-2"


def test_a_put_in_doubt_is_settled_by_what_the_successor_holds(pipe: tuple[int, int]) -> None:
    w = pipe[1]
    # Stored: an entry newer than the token, deposited by this process, holding the very same open file.
    state = _state()
    hand = ByHand(state, flows.put(state, "p/1", w))
    _put_to_deposit(hand)
    step = _gone(hand)
    assert isinstance(step, CallRpc) and step.method == "Stat" and step.session == "s-2"
    step = hand.ok(_mine("p/1", 11))
    assert isinstance(step, CallRpc) and step.method == "Get"  # a copy, to compare the inode
    hand.ok(pb.GetResponse(handoffs=[pb.Handoff(token=b"gt")]))
    copy = os.dup(w)
    assert hand.ok(_deliver(b"gt", copy)) is None
    assert hand.value.revision == 11 and not _is_open(copy) and state.stats["found_done"] == 1

    # Not stored: the entry is no newer than the revision the token was issued at — tried again.
    state = _state()
    hand = ByHand(state, flows.put(state, "p/1", w, replace=True))
    _put_to_deposit(hand)
    _gone(hand)
    step = hand.ok(_mine("p/1", 10))
    assert isinstance(step, CallRpc) and step.method == "Put" and step.session == "s-2"

    # Another descriptor under the name, or none at all: cannot tell.
    other_r, other_w = os.pipe()
    os.close(other_r)
    # "another uid": a local user who put its own descriptor of the very same file (same st_dev/st_ino: e.g. it
    # opened the same world-readable file) under the name in the window, even with the victim's pid (a pid
    # namespace): the owner's uid differs, so it is never taken for the victim's deposit.
    for answer in ("another file", "another process", "another uid", "no entry"):
        state = _state()
        hand = ByHand(state, flows.put(state, "p/1", w))
        _put_to_deposit(hand)
        _gone(hand)
        with pytest.raises(OutcomeUnknown) as ei:
            if answer == "no entry":
                hand.fail(NotFound("p/1"))
            elif answer == "another process":
                hand.ok(_mine("p/1", 11, pid=1))
            elif answer == "another uid":
                step = hand.ok(_mine("p/1", 11, uid=65534 if os.getuid() != 65534 else 0))
                assert not isinstance(step, CallRpc) or step.method != "Get", step  # not even fetched
                hand.ok(pb.GetResponse(handoffs=[pb.Handoff(token=b"gt")]))
                hand.ok(_deliver(b"gt", os.dup(w)))
            else:
                hand.ok(_mine("p/1", 11))
                hand.ok(pb.GetResponse(handoffs=[pb.Handoff(token=b"gt")]))
                hand.ok(_deliver(b"gt", os.dup(other_w)))
        assert ei.value.operation == "put" and ei.value.names == ("p/1",), answer
        assert "outcome unknown" in str(ei.value) and state.stats["unknown"] == 1
    os.close(other_w)


def test_a_put_in_doubt_without_reconnect_or_time_is_unknown(pipe: tuple[int, int]) -> None:
    state = _state(reconnect=False)
    hand = ByHand(state, flows.put(state, "p/1", pipe[1]))
    _put_to_deposit(hand)
    with pytest.raises(OutcomeUnknown, match="reconnect=False"):
        _gone(hand)
    state = _state()
    hand = ByHand(state, flows.put(state, "p/1", pipe[1]))
    _put_to_deposit(hand)
    with pytest.raises(OutcomeUnknown, match="no answer came in time"):
        hand.fail(DeadlineExceeded("no answer on the conduit within 10s"))


def _take_to_ack(hand: ByHand, fd: int, revision: int = 5) -> None:
    assert isinstance(hand.step, CallRpc) and hand.step.method == "Take"
    resp = pb.TakeResponse(handoff=pb.Handoff(token=b"tt"))
    resp.entry.revision = revision
    assert isinstance(hand.ok(resp), AwaitAnswers)
    step = hand.ok(_deliver(b"tt", fd, "t/1"))
    assert isinstance(step, SendFrame) and step.frame.WhichOneof("body") == "ack"


def test_a_take_in_doubt(pipe: tuple[int, int]) -> None:
    w = pipe[1]
    # The Ack never went out: the entry stays; the copy is closed and the take tried again.
    state = _state()
    hand = ByHand(state, flows.take(state, "t/1"))
    copy = os.dup(w)
    _take_to_ack(hand, copy)
    step = _gone(hand)
    assert (
        not _is_open(copy) and isinstance(step, CallRpc) and step.method == "Take" and step.session == "s-2"
    )

    # The Ack went out; the entry is still there at the revision taken: it did not happen — tried again.
    state = _state()
    hand = ByHand(state, flows.take(state, "t/1"))
    copy = os.dup(w)
    _take_to_ack(hand, copy)
    hand.ok(None)
    step = _gone(hand)
    assert isinstance(step, CallRpc) and step.method == "Stat"
    step = hand.ok(pb.StatResponse(entry=pb.Entry(name="t/1", revision=5)))
    assert not _is_open(copy) and isinstance(step, CallRpc) and step.method == "Take"

    # The Ack went out and the entry is gone: unknown, and the copy is the caller's (it may be the only one).
    state = _state()
    hand = ByHand(state, flows.take(state, "t/1"))
    copy = os.dup(w)
    _take_to_ack(hand, copy)
    hand.ok(None)
    _gone(hand)
    with pytest.raises(OutcomeUnknown) as ei:
        hand.fail(NotFound("t/1"))
    assert ei.value.operation == "take" and ei.value.received.fileno() == copy and _is_open(copy)
    ei.value.received.close()


def test_a_delete_in_flight_when_the_broker_went(pipe: tuple[int, int]) -> None:
    def start() -> tuple[flows.State, ByHand]:
        state = _state()
        state.revision = 20  # the client has seen revision 20: an entry created by then is one it may delete
        hand = ByHand(state, flows.delete(state, "d/1"))
        assert isinstance(hand.step, CallRpc) and hand.step.method == "Delete"
        step = hand.fail(Unavailable("the connection broke"))  # it may have happened
        assert (
            isinstance(step, SendFrame) and step.frame.WhichOneof("body") == "ping"
        )  # does the session live?
        step = _gone(hand)  # no
        assert isinstance(step, CallRpc) and step.method == "Stat" and step.session == "s-2"
        return state, hand

    state, hand = start()
    e = pb.Entry(name="d/1", revision=18, create_revision=15)  # the very entry it was for: not deleted
    step = hand.ok(pb.StatResponse(entry=e))
    assert isinstance(step, CallRpc) and step.method == "Delete" and step.session == "s-2"
    resp = pb.DeleteResponse()
    resp.header.revision = 21
    assert hand.ok(resp) is None and hand.value == 21

    for answer in (
        NotFound("d/1"),
        pb.StatResponse(entry=pb.Entry(name="d/1", revision=22, create_revision=22)),
    ):
        state, hand = start()
        with pytest.raises(OutcomeUnknown) as ei:
            hand.fail(answer) if isinstance(answer, Exception) else hand.ok(answer)
        assert ei.value.operation == "delete" and ei.value.name == "d/1"

    # UNAUTHENTICATED: refused before anything was done — tried again as it is.
    state = _state()
    hand = ByHand(state, flows.delete(state, "d/1"))
    step = hand.fail(Unauthenticated("unknown or ended session"))
    assert isinstance(step, CallRpc) and step.method == "Delete" and step.session == "s-2"


# -- both drivers, against a broker that forgets every session -------------------------------------------------


@pytest.fixture(scope="module")
def fake_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeBroker]:
    with FakeBroker(tmp_path_factory.mktemp("fake")) as f:
        yield f


@pytest.fixture
def fake(fake_broker: FakeBroker) -> Iterator[FakeBroker]:
    fake_broker.reset()
    yield fake_broker
    assert fake_broker.leaked() == []


@pytest.mark.parametrize("close", [True, False], ids=["conduits-closed", "ids-forgotten"])
def test_both_clients_ride_through_a_broker_that_forgets_every_session(
    kind: str, fake: FakeBroker, close: bool
) -> None:
    with client(kind, fake.run_dir, prefetch=0) as c:
        c.get_fd("x").close()
        before = c.session_id
        lease = c.lease("x", ttl=30, keepalive=False)
        fake.forget_sessions(close=close)
        c.get_fd("x").close()  # tried again on a new session
        assert c.session_id != before and c.stats["reconnects"] == 1, c.stats
        assert lease.lost.is_set()  # the lease ended with its session; never taken again behind our back
        assert fake.calls.count("Lease") == 1
        lease.fd.close()


@pytest.fixture(params=["sync", "aio"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- for real: a lease and a watch across a takeover -------------------------------------------------------------


def test_across_a_takeover_a_lease_is_lost_and_a_watch_resumes(kind: str, run_dir: Path) -> None:
    old = BrokerProcess.start(run_dir)
    new: BrokerProcess | None = None
    r, w = os.pipe()
    try:
        with client(kind, run_dir) as c:
            c.put("l/x", w)
            held = c.lease("l/x", ttl=1)  # renewed every 1/3 s
            watch = c.watch("l/")
            new = BrokerProcess.start(run_dir, args=["--takeover"])
            assert old.proc.wait(timeout=30) == 0, old.log()[-3000:]
            wait_until(held.lost.is_set, "the lease handle to report the lease lost")
            # The watch resumed on the successor right after the last revision it had delivered. The end of the old
            # session is seen once: LEASE_RELEASED, reason HANDOVER as the successor replays it — or HOLDER_DIED,
            # at the very same revision, when the old broker's stream delivered its own ending of the session
            # first (the old broker ends its sessions after the ack and tells its watchers).
            ev = next_event(c, watch)
            assert (ev.type, ev.name, ev.lease_id) == ("lease_released", "l/x", held.lease_id)
            assert ev.reason in ("handover", "holder_died"), ev.reason
            time.sleep(1.5)  # a keep-alive that took the lease again would have by now
            assert c.stat("l/x").lease.holders == ()  # lost, and never taken again behind the caller's back
            c.run(held.release()) if kind == "aio" else held.release()  # nothing to release: no error
            again = c.lease("l/x", ttl=5, keepalive=False)
            assert again.epoch > held.epoch  # fencing epochs keep increasing
            c.run(again.release()) if kind == "aio" else again.release()
            c.delete("l/x")
            assert [next_event(c, watch).type for _ in range(3)] == [
                "lease_granted",
                "lease_released",
                "delete",
            ]
            close_watch(c, watch)
            assert c.stats["reconnects"] == 1 and c.stats["rewatches"] == 1, c.stats
    finally:
        os.close(r)
        os.close(w)
        for b in (old, new):
            if b is not None:
                b.stop()
                with contextlib.suppress(OSError):
                    b.log_path.unlink()


# -- for real: 8 clients through a takeover and a keeper restart -----------------------------------------------

CLIENTS = 8
LANES = 2  # callers sharing each client: threads of a blocking client, tasks of an asyncio one
SHARED = 8  # entries g/0 … g/7 every caller gets (their inodes are known)

WORKER = r"""
import asyncio, json, os, sys, threading, time
import fdbroker, fdbroker.aio
from fdbroker.errors import BrokerError, OutcomeUnknown

me, kind, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
shared = {k: tuple(v) for k, v in json.loads(sys.argv[4]).items()}


def ino(f):
    st = os.fstat(f if isinstance(f, int) else f.fileno())
    return [st.st_dev, st.st_ino]


class Blocking:  # the blocking client's calls as coroutines, so that one lane() serves both clients
    def __init__(self, c):
        self.c = c

    def __getattr__(self, name):
        f = getattr(self.c, name)

        async def call(*a, **k):
            return f(*a, **k)

        return call


async def lane(c, n_lane, out):
    ops = out["ops"] = {}
    names = out["names"] = {}
    out["wrong"] = []
    out["max_call"] = out["max_gap"] = 0.0
    last_ok = time.monotonic()

    async def call(op, aw):
        nonlocal last_ok
        o = ops.setdefault(op, {"calls": 0, "ok": 0, "unknown": 0, "failed": []})
        o["calls"] += 1
        t = time.monotonic()
        try:
            result = await aw
        except OutcomeUnknown as err:
            o["unknown"] += 1
            return "unknown", err
        except BrokerError as err:
            o["failed"].append(f"{type(err).__name__}: {err}")
            return "failed", err
        finally:
            now = time.monotonic()
            out["max_call"] = max(out["max_call"], now - t)
        o["ok"] += 1
        out["max_gap"] = max(out["max_gap"], now - last_ok)
        last_ok = now
        return "ok", result

    n = 0
    prev = None
    while not os.path.exists(stop):
        n += 1
        name = f"c{me}.{n_lane}/{n}"
        r, w = os.pipe()
        rec = names[name] = {"ino": ino(w), "put": None, "then": None}
        rec["put"], _ = await call("put", c.put(name, w))
        os.close(r)
        os.close(w)
        g = f"g/{n % len(shared)}"
        how, got = await call("get", c.get_fd(g))
        if how == "ok":
            if tuple(ino(got)) != shared[g]:
                out["wrong"].append(f"get {g}: inode {ino(got)}, not {shared[g]}")
            got.close()
        if prev is not None and names[prev]["put"] == "ok":
            step = n % 4
            if step == 1:
                how, got = await call("take", c.take(prev))
                names[prev]["then"] = "taken" if how == "ok" else f"take-{how}"
                held = got if how == "ok" else getattr(got, "received", None)
                if held is not None:
                    if ino(held) != names[prev]["ino"]:
                        out["wrong"].append(f"take {prev}: inode {ino(held)}, not {names[prev]['ino']}")
                    held.close()
            elif step == 2:
                how, _ = await call("delete", c.delete(prev))
                names[prev]["then"] = "deleted" if how == "ok" else f"delete-{how}"
            elif step == 3:
                how, e = await call("stat", c.stat(prev))
                if how == "ok" and e.name != prev:
                    out["wrong"].append(f"stat {prev}: {e.name}")
                how, listing = await call("list", c.list(f"c{me}.{n_lane}/"))
                if how == "ok" and prev not in {e.name for e in listing}:
                    out["wrong"].append(f"list c{me}.{n_lane}/: {prev} missing")
            else:
                await call("info", c.info())
        prev = name


def main():
    out = [{} for _ in range(LANES)]
    if kind == "sync":
        c = fdbroker.Client()
        threads = [
            threading.Thread(target=lambda i=i: asyncio.run(lane(Blocking(c), i, out[i]))) for i in range(LANES)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = dict(c.stats)
        c.close()
    else:

        async def run():
            async with fdbroker.aio.Client() as c:
                await asyncio.gather(*(lane(c, i, out[i]) for i in range(LANES)))
                return dict(c.stats)

        stats = asyncio.run(run())
    print(json.dumps({"client": me, "kind": kind, "lanes": out, "stats": stats}))


LANES = @LANES@
main()
""".replace("@LANES@", str(LANES))


def _inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class Hammer:
    """:data:`CLIENTS` client processes, every other one asyncio, hammering the broker at ``run_dir`` until
    :meth:`finish`; ``shared``: the names every caller gets and the inodes they must come back with."""

    def __init__(self, run_dir: Path, shared: dict[str, tuple[int, int]]) -> None:
        self.stop_file = run_dir.parent / "stop"
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(i),
                    "sync" if i % 2 == 0 else "aio",
                    str(self.stop_file),
                    json.dumps(shared),
                ],
                env=child_env(run_dir),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(CLIENTS)
        ]

    def finish(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        reports = []
        for p in self.procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, f"client failed ({p.returncode}):\n{err[-4000:]}"
            reports.append(json.loads(out.splitlines()[-1]))
        return reports

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class Watcher:
    """A watch of every name (a sync client in a thread) that records each event's revision: across the broker's
    replacement they must be dense, each exactly once (``Event.revision``: "with no prefix and every entry
    visible, a watcher sees each revision exactly once, in order")."""

    def __init__(self, run_dir: Path) -> None:
        self.client = fdbroker.Client(run_dir)
        self.watch = self.client.watch()
        assert self.watch.header_revision is not None
        self.start = self.watch.header_revision
        self.revisions: list[int] = []
        self.error: BaseException | None = None
        self.last = 0  # the broker's revision once the clients stopped
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.watch:
                self.revisions.append(ev.revision)
        except BaseException as err:
            self.error = err

    def close(self) -> None:
        self.watch.close()
        self.thread.join(30)
        self.client.close()


def _final_state(run_dir: Path, reports: list[dict[str, Any]]) -> dict[str, int]:
    """Check every answer the callers got against what the broker holds in the end; the unknown outcomes, by
    how they turned out."""
    with fdbroker.Client(run_dir) as c:
        held = {e.name for e in c.list("c")}
        inodes: dict[str, tuple[int, int]] = {}
        for name in held:
            with c.get_fd(name) as f:
                inodes[name] = _inode(f.fileno())
    figures = {
        "unknown puts stored": 0,
        "unknown puts not stored": 0,
        "unknown takes/deletes done": 0,
        "unknown takes/deletes not done": 0,
    }
    wrong: list[str] = []
    recorded: set[str] = set()
    for rep in reports:
        for lane in rep["lanes"]:
            for name, rec in lane["names"].items():
                recorded.add(name)
                there = name in held
                if there and inodes[name] != tuple(rec["ino"]):
                    wrong.append(f"{name} holds another descriptor")
                if rec["put"] == "unknown":
                    figures["unknown puts stored" if there else "unknown puts not stored"] += 1
                elif rec["put"] != "ok":
                    if there:
                        wrong.append(f"{name}: put {rec['put']}, but stored")
                elif rec["then"] in ("taken", "deleted"):
                    if there:
                        wrong.append(f"{name}: {rec['then']}, but still there")
                elif rec["then"] in ("take-unknown", "delete-unknown"):
                    figures["unknown takes/deletes not done" if there else "unknown takes/deletes done"] += 1
                elif not there:
                    wrong.append(f"{name}: put, never taken or deleted ({rec['then']}), but not there")
    wrong.extend(f"{name}: there, but nobody put it" for name in held - recorded)
    assert not wrong, wrong[:20]
    return figures


def _report(what: str, reports: list[dict[str, Any]], figures: dict[str, int], watcher: Watcher) -> None:
    """Check the callers' answers; print the figures (the pauses are printed, never asserted)."""
    totals: dict[str, dict[str, int]] = {}
    failed: list[str] = []
    wrong: list[str] = []
    max_call = max_gap = 0.0
    stats: dict[str, int] = {}
    for rep in reports:
        for k, v in rep["stats"].items():
            stats[k] = stats.get(k, 0) + v
        for lane in rep["lanes"]:
            wrong.extend(lane["wrong"])
            max_call, max_gap = max(max_call, lane["max_call"]), max(max_gap, lane["max_gap"])
            for op, o in lane["ops"].items():
                t = totals.setdefault(op, {"calls": 0, "ok": 0, "unknown": 0, "failed": 0})
                for k in ("calls", "ok", "unknown"):
                    t[k] += o[k]
                t["failed"] += len(o["failed"])
                failed.extend(f"{op}: {f}" for f in o["failed"])
    print(f"\n{what}: {CLIENTS} clients ({CLIENTS // 2} blocking, {CLIENTS // 2} asyncio) x {LANES} callers")
    for op, t in sorted(totals.items()):
        print(
            f"  {op:7} {t['calls']:6} calls, {t['ok']:6} ok, {t['unknown']:3} unknown, {t['failed']} failed"
        )
    print(f"  unknown outcomes, as they turned out: {figures}")
    print(f"  client counters: {stats}")
    print(
        f"  longest pause a caller saw: {max_gap * 1000:.0f} ms between two answers (longest call "
        f"{max_call * 1000:.0f} ms)"
    )
    print(f"  watcher: {len(watcher.revisions)} events, {watcher.error!r}")
    assert not failed, failed[:20]
    assert not wrong, wrong[:20]
    assert all(t["ok"] for t in totals.values()), totals


@pytest.fixture
def run_dir() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="fdb-recon-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        yield top / "run"
    finally:
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def _shared_entries(run_dir: Path) -> Iterator[dict[str, tuple[int, int]]]:
    """Put the shared entries (pipes); yield their inodes; close our ends after."""
    pipes = [os.pipe() for _ in range(SHARED)]
    try:
        with fdbroker.Client(run_dir) as c:
            c.put_many({f"g/{i}": w for i, (_, w) in enumerate(pipes)})
        yield {f"g/{i}": _inode(w) for i, (_, w) in enumerate(pipes)}
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def _sessions(run_dir: Path) -> int:
    with fdbroker.Client(run_dir, reconnect=False) as c:
        return int(c.info().sessions)


def _ride_through(run_dir: Path, what: str, replace: Any, took_what: str) -> Watcher:
    """Put the shared entries, start the watcher and the clients, let them run, ``replace()`` the broker, let them
    run on, stop them; check every answer and the final state, print the figures. Returns the (closed) watcher,
    for the caller to check."""
    hammer: Hammer | None = None
    watcher: Watcher | None = None
    try:
        with _shared_entries(run_dir) as shared:
            watcher = Watcher(run_dir)
            hammer = Hammer(run_dir, shared)
            # Every client has reached the broker (it has a session) before the broker goes: a client that never
            # reached one is told at once that there is none.
            wait_until(lambda: _sessions(run_dir) >= CLIENTS, "every client to open its session", timeout=60)
            time.sleep(1.0)
            took = replace()
            time.sleep(1.5)
            reports = hammer.finish()
            hammer = None
            figures = _final_state(run_dir, reports)
            with fdbroker.Client(run_dir) as c:
                last = c.info().revision
            w = watcher
            wait_until(
                lambda: w.error is not None or (w.revisions and w.revisions[-1] >= last),
                "the watcher to see the last revision",
            )
            watcher.close()
            print(f"\n{what}: {took * 1000:.0f} ms {took_what}")
            _report(what, reports, figures, watcher)
            watcher = None
            w.last = last
            return w
    finally:
        if hammer is not None:
            hammer.kill()
        if watcher is not None:
            watcher.close()


def test_eight_clients_ride_through_a_takeover(run_dir: Path) -> None:
    old = BrokerProcess.start(run_dir)
    brokers = [old]

    def takeover() -> float:
        t = time.monotonic()
        brokers.append(BrokerProcess.start(run_dir, args=["--takeover"]))
        took = time.monotonic() - t
        assert old.proc.wait(timeout=30) == 0, old.log()[-3000:]
        return took

    try:
        watcher = _ride_through(
            run_dir,
            "takeover",
            takeover,
            "from the start of `serve --takeover` to its READY (the old one serves meanwhile)",
        )
        # Resumed on the successor without loss or repetition: every revision after the start, once, in order.
        assert watcher.error is None, watcher.error
        assert watcher.revisions == list(range(watcher.start + 1, watcher.last + 1))
    finally:
        for b in brokers:
            b.stop()
            with contextlib.suppress(OSError):
                b.log_path.unlink()


def _serve_lists_keeper() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "fdbroker", "serve", "--help"],
        capture_output=True,
        text=True,
        env=child_env("/"),
    )
    return "--keeper" in r.stdout


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out.extend(int(c) for c in (task / "children").read_text().split())
    return out


@pytest.mark.skipif(
    not _serve_lists_keeper(), reason="`fdbroker serve --help` does not list --keeper (not wired yet)"
)
def test_eight_clients_ride_through_a_keeper_restart(run_dir: Path) -> None:
    """The keeper (``serve --keeper``) brings a SIGKILLed broker back with every entry; the clients ride through.
    The restarted broker's revisions jump (by 2**20) and its watch history starts there, so a watch cannot
    resume without a gap: it raises OutOfRange (its events up to then were dense)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / "keeper.log"
    env = child_env(run_dir)
    for k in ("NOTIFY_SOCKET", "FDBROKER_FDSTORE", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(k, None)
    with open(log, "wb") as logf:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "fdbroker", "--run-dir", str(run_dir), "serve", "--keeper"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def serving(other_than: int = 0) -> int:
        def pid() -> int:
            assert keeper.poll() is None, log.read_text()[-4000:]
            try:
                with fdbroker.Client(run_dir, timeout=2, reconnect=False) as c:
                    p = c.info().broker_pid
            except fdbroker.errors.BrokerError:
                return 0
            return p if p != other_than else 0

        return int(wait_until(pid, "a broker serving under the keeper", timeout=60))

    def restart() -> float:
        broker = serving()
        assert broker in _children(keeper.pid)
        t = time.monotonic()
        os.kill(broker, signal.SIGKILL)
        serving(other_than=broker)
        return time.monotonic() - t

    try:
        serving()
        watcher = _ride_through(
            run_dir,
            "keeper restart (kill -9 of the broker)",
            restart,
            "from the kill to a new broker answering",
        )
        assert isinstance(watcher.error, OutOfRange), watcher.error
        assert watcher.revisions == list(range(watcher.start + 1, watcher.start + 1 + len(watcher.revisions)))
    finally:
        if keeper.poll() is None:
            keeper.send_signal(signal.SIGTERM)
            try:
                keeper.wait(30)
            except subprocess.TimeoutExpired:
                keeper.kill()
                keeper.wait()
