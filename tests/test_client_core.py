"""The client core (``fdbroker.client``): the flows and the mailbox without I/O, then both drivers —
``fdbroker.Client`` and ``fdbroker.aio.Client`` — held to the same behaviour, each test run once per client:
against a scripted broker (tests/fakebroker.py) for what a real broker never sends, and against a real one.

The differences the two clients once had (issue 8) each have a test here: a ``Deliver`` whose descriptors do not
add up, a lease whose descriptor never came, the broker's prefetch expiry, ``ping``/``stats``/shared prefetch in
both, and ``watch`` returning only once its stream is open.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerutil import run_client
from clientutil import client, close_watch, next_event
from fakebroker import FakeBroker
from flowutil import ByHand

from fdbroker.client import flows
from fdbroker.client.prefetch import Prefetch
from fdbroker.client.session import Answer, Mailbox
from fdbroker.client.steps import AwaitAnswers, CallRpc, SendFrame
from fdbroker.conduit.frames import Frame
from fdbroker.errors import Aborted, DeadlineExceeded, NotFound
from fdbroker.testing import BrokerProcess
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

IDLE = {"answers": 0, "unclaimed": 0, "expected": 0, "waiting": 0}


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def write_end() -> int:
    """A descriptor to deliver: a pipe's write end (the read end is closed)."""
    r, w = os.pipe()
    os.close(r)
    return w


def deliver(*tokens: bytes, fds: list[int]) -> Frame:
    items = [cpb.DeliverItem(token=t, name="x") for t in tokens]
    return Frame(cpb.ConduitFrame(deliver=cpb.Deliver(items=items), fd_count=len(fds)), fds)


# -- without I/O -----------------------------------------------------------------------------------------------


def test_mailbox_refuses_a_deliver_that_does_not_add_up_and_closes_every_descriptor() -> None:
    box = Mailbox()
    w = box.wait([b"t1"])
    fds = [write_end(), write_end()]
    done = box.file(deliver(b"t1", fds=fds))  # one item, two descriptors
    assert done == [w] and not any(_open(fd) for fd in fds)
    with pytest.raises(Aborted, match=r"2 descriptor\(s\) for 1 item\(s\)"):
        box.ready(w)
    assert box.dead is not None  # the session is over: nobody can tell whose answer it was


def test_mailbox_keeps_a_delivery_only_while_someone_can_claim_it() -> None:
    box = Mailbox()
    w = write_end()
    box.file(deliver(b"nobody", fds=[w]))  # no caller, no RPC in flight: closed at once
    assert not _open(w) and box.pending() == IDLE

    n = box.rpc_started()  # the broker pushes a Deliver before the RPC that asked for it returns
    w = write_end()
    box.file(deliver(b"early", fds=[w]))
    assert box.pending()["unclaimed"] == 1 and _open(w)
    box.expect([b"early"])  # the RPC returned and its caller expects its token
    box.rpc_ended(n)
    (a,) = box.take(box.wait([b"early"]))
    assert a.kind == "deliver" and a.fd == w
    os.close(w)

    n = box.rpc_started()
    w = write_end()
    box.file(deliver(b"orphan", fds=[w]))
    box.rpc_ended(n)  # its RPC returned and nobody expected the token (its caller gave up): closed
    assert not _open(w) and box.pending() == IDLE


def test_prefetched_tokens_live_as_long_as_the_broker_says() -> None:
    p = Prefetch(4, threading.Event)
    short = pb.GetResponse(prefetch_tokens=[b"a"])
    short.prefetch_expire_time.FromNanoseconds(int((time.time() + 0.2) * 1e9))
    p.keep("x", short, token_ttl=30.0)  # the session's token lifetime says 30 s; the broker said 0.2
    assert p.pop("x") is None  # too close to expiry to be worth a round trip
    long = pb.GetResponse(prefetch_tokens=[b"b"])
    long.prefetch_expire_time.FromNanoseconds(int((time.time() + 30) * 1e9))
    p.keep("x", long, token_ttl=30.0)
    assert p.pop("x") == b"b"


def test_take_flow_closes_the_descriptor_when_the_ack_fails() -> None:
    """A flow is a generator of steps: a test can drive it by hand, step by step, with no broker."""
    state = flows.State(None, threading.Event)
    hand = ByHand(state, flows.take(state, "q/job"))
    assert isinstance(hand.step, CallRpc) and hand.step.method == "Take"
    resp = pb.TakeResponse()
    resp.handoff.token = b"tok"
    step = hand.ok(resp)
    assert isinstance(step, AwaitAnswers) and list(step.tokens) == [b"tok"]
    w = write_end()
    step = hand.ok([Answer("deliver", cpb.DeliverItem(token=b"tok", name="q/job"), w)])
    assert isinstance(step, SendFrame) and step.frame.WhichOneof("body") == "ack"
    with pytest.raises(Aborted):
        hand.fail(Aborted("the conduit broke"))  # a session that ended, not the broker gone away
    assert not _open(w)  # the entry stays in the broker; the received copy is closed


def test_lease_flow_releases_a_lease_whose_descriptor_never_came() -> None:
    state = flows.State(None, threading.Event)
    hand = ByHand(state, flows.lease(state, "db/primary", 5))
    assert isinstance(hand.step, CallRpc) and hand.step.method == "Lease"
    resp = pb.LeaseResponse(lease_id="L7", epoch=3)
    resp.handoff.token = b"tok"
    assert isinstance(hand.ok(resp), AwaitAnswers)
    step = hand.fail(DeadlineExceeded("no answer on the conduit"))
    assert isinstance(step, CallRpc) and step.method == "Release" and step.request.lease_id == "L7"
    with pytest.raises(DeadlineExceeded):
        hand.ok(pb.ReleaseResponse())


# -- both drivers ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["sync", "aio"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def fake_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeBroker]:
    with FakeBroker(tmp_path_factory.mktemp("fake")) as f:
        yield f


@pytest.fixture
def fake(fake_broker: FakeBroker) -> Iterator[FakeBroker]:
    fake_broker.reset()
    yield fake_broker
    assert fake_broker.leaked() == []  # every descriptor it delivered was closed or handed to the test


def test_a_deliver_that_does_not_add_up_is_refused_cleanly(kind: str, fake: FakeBroker) -> None:
    with client(kind, fake.run_dir, prefetch=0) as c:
        fake.deliver_items = 2  # two items, one descriptor
        with pytest.raises(Aborted) as ei:
            c.get("x")
        assert "1 descriptor(s) for 2 item(s)" in str(ei.value) and "retry" in str(ei.value)
        assert fake.leaked() == [] and c.raw.pending() == IDLE
        fake.deliver_items = 1
        ended = c.session_id
        c.get_fd("x").close()  # the next call opens a new session
        assert c.session_id != ended


@pytest.mark.parametrize("how", ["never came", "did not add up"])
def test_a_lease_whose_descriptor_never_arrived_is_released(kind: str, fake: FakeBroker, how: str) -> None:
    if how == "never came":
        fake.deliver_lease = False
    else:
        fake.deliver_items = 2
    with client(kind, fake.run_dir, timeout=1) as c:
        with pytest.raises(DeadlineExceeded if how == "never came" else Aborted):
            c.lease("x", ttl=5)
        assert fake.calls == ["Lease", "Release"]
        assert fake.released == ["lease-1"]
        assert c.raw.pending() == IDLE


def test_prefetched_tokens_expire_when_the_broker_says(kind: str, fake: FakeBroker) -> None:
    fake.prefetch_ttl = 0.6  # the Welcome says 30 s
    with client(kind, fake.run_dir, prefetch=4) as c:
        c.get_fd("x").close()  # one RPC: a copy and 4 tokens
        c.get_fd("x").close()  # a redeem
        time.sleep(0.6)
        c.get_fd("x").close()  # the tokens have expired: the control plane again, not a redeem
        assert fake.calls == ["Get", "Get"] and fake.redeems == 1
        assert (c.stats["get_rpcs"], c.stats["redeems"]) == (2, 1)


def test_a_broker_that_ignores_refill_sends_the_client_back_to_the_get_rpc(
    kind: str, fake: FakeBroker
) -> None:
    with client(kind, fake.run_dir, prefetch=2) as c:
        for _ in range(4):
            c.get_fd(
                "x"
            ).close()  # an RPC (a copy and 2 tokens), a redeem, the last one's asking for 2 more, an RPC
        assert fake.calls == ["Get", "Get"] and fake.refills == [0, 2]
        assert (c.stats["get_rpcs"], c.stats["redeems"], c.stats["refills"]) == (2, 2, 0)
        assert c.raw.pending() == IDLE


def test_watch_returns_once_its_stream_is_open(kind: str, fake: FakeBroker) -> None:
    fake.watch_delay = 0.5
    with client(kind, fake.run_dir) as c:
        t = time.monotonic()
        w = c.watch("x/")
        assert time.monotonic() - t >= 0.5 and w.header_revision == 7
        close_watch(c, w)


def test_ping_stats_and_a_change_right_after_watch(kind: str, fdbroker_broker: BrokerProcess) -> None:
    r, w = os.pipe()
    try:
        with client(kind, fdbroker_broker.run_dir, prefetch=2) as c, fdbroker_broker.client() as other:
            assert c.ping() is None and c.session_id
            c.put("ps/x", w)
            for _ in range(4):
                c.get_fd("ps/x").close()
            # 1 + 2 copies by the RPC; the last token's Redeem brings 2 more (Redeem.refill)
            assert (c.stats["get_rpcs"], c.stats["redeems"], c.stats["refills"]) == (1, 3, 1)
            watch = c.watch("ps/")
            other.delete("ps/x")  # another session, right after watch() returned: seen
            ev = next_event(c, watch)
            assert (ev.type, ev.name) == ("delete", "ps/x") and ev.revision > watch.header_revision
            close_watch(c, watch)
            with pytest.raises(NotFound):
                c.stat("ps/x")
    finally:
        os.close(r)
        os.close(w)


def test_concurrent_gets_of_one_name_share_a_prefetching_rpc(fdbroker_broker: BrokerProcess) -> None:
    """The blocking client, from 16 threads at once (the asyncio client's test: tests/test_aio_client.py)."""
    r, w = os.pipe()
    try:
        with fdbroker_broker.client(prefetch=16) as c:
            c.put("share/x", w)
            go = threading.Barrier(16)
            errors: list[BaseException] = []

            def one(i: int) -> None:
                go.wait()
                try:
                    g = c.get_fd("share/x")
                    os.write(g.fileno(), bytes([i]))
                    g.close()
                except BaseException as err:
                    errors.append(err)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors, errors
            assert c.stats["get_rpcs"] + c.stats["redeems"] == 16
            assert c.stats["get_rpcs"] <= 3, c.stats  # not one RPC per thread: they waited for the first
            c.delete("share/x")
        os.set_blocking(r, False)
        assert sorted(os.read(r, 100)) == list(range(16))
    finally:
        os.close(r)
        os.close(w)


# -- docs/client.md --------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "client.md"


def _example(name: str) -> str:
    m = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert m, f"no example {name!r} in {DOC}"
    return m.group(1)


def test_the_raw_seam_examples_in_the_docs_run(fdbroker_broker: BrokerProcess) -> None:
    out = run_client(fdbroker_broker.run_dir, _example("raw")).stdout
    assert out == "deliver jobs/1 acked []\ntaken by hand\n", out
    out = run_client(fdbroker_broker.run_dir, _example("flow")).stdout
    assert out == f"acked [] {IDLE}\n", out
