"""The broker core in process: a fake clock, frames recorded by an in-process sink, no sockets and no sleeping.

What is tested here is the broker's own bookkeeping — the lease life cycle (grant, FIFO queue, shared and
exclusive, expiry, keep-alive, check-in, the end of a lease on session end and entry removal, each with its event
reason), entry and token expiry, housekeeping (``tick`` and the next due time it returns), the prefetch pool and
session end voiding tokens. Time moves only when a test moves the clock. The multi-process tests in
test_leases.py prove the same over real sockets and real processes.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from fdbroker.broker.core import Broker, BrokerConfig
from fdbroker.broker.policy import Identity, Limits, Policy, Rule
from fdbroker.broker.sessions import Session
from fdbroker.conduit.frames import Frame
from fdbroker.errors import DeadlineExceeded, FailedPrecondition, NotFound, ResourceExhausted
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

T = TypeVar("T")
EV = pb.Event
OP = pb.Operation
SHARED = pb.LeaseState.MODE_SHARED
EXCLUSIVE = pb.LeaseState.MODE_EXCLUSIVE
TOKEN_TTL = 5.0


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sink:
    """A session's conduit, in process: records every frame the broker sends, with how many descriptors came."""

    def __init__(self) -> None:
        self.frames: list[tuple[cpb.ConduitFrame, int]] = []

    def send(self, message: cpb.ConduitFrame, fds: Sequence[int] = ()) -> None:
        self.frames.append((message, len(fds)))

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        (n,) = struct.unpack(">I", data[:4])
        assert len(data) == 4 + n, "one whole frame per send"
        self.frames.append((cpb.ConduitFrame.FromString(data[4:]), len(fds)))

    def close(self) -> None:
        pass

    def bodies(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for m, _ in self.frames if m.WhichOneof("body") == kind]

    def last(self, kind: str) -> Any:
        got = self.bodies(kind)
        assert got, f"no {kind} frame; got {[m.WhichOneof('body') for m, _ in self.frames]}"
        return got[-1]


class Harness:
    """A broker on a fake clock, its sessions and the events its registry records."""

    def __init__(self, broker: Broker, clock: Clock) -> None:
        self.broker = broker
        self.clock = clock
        self.events: list[pb.Event] = []
        broker.registry.history.subscribe(
            lambda ev: self.events.append(pb.Event.FromString(ev.SerializeToString()))
        )
        self.loop = asyncio.new_event_loop()
        self._pid = 100

    def session(self, uid: int | None = None) -> tuple[Session, Sink]:
        self._pid += 1
        sink = Sink()
        ident = Identity(self._pid, os.getuid() if uid is None else uid, os.getgid())
        return self.broker.open_session(ident, sink), sink

    def put(self, s: Session, sink: Sink, name: str, content: bytes = b"x", **options: Any) -> pb.Entry:
        req = pb.PutRequest(name=name, replace=options.pop("replace", False))
        ttl = options.pop("ttl", None)
        if ttl is not None:
            req.options.ttl.FromNanoseconds(int(ttl * 1e9))
        req.options.ephemeral = options.pop("ephemeral", False)
        assert not options, options
        token = self.broker.put_begin(s, req).handoff.token
        return self.deposit(s, sink, token, content)

    def deposit(self, s: Session, sink: Sink, token: bytes, content: bytes = b"x") -> pb.Entry:
        fd = _memfd(content)  # the broker's from here on, stored or closed
        self.broker.on_frame(
            s, Frame(cpb.ConduitFrame(fd_count=1, deposit=cpb.Deposit(tokens=[token])), [fd])
        )
        result = sink.last("deposited").results[-1]
        assert not result.HasField("error"), result.error
        entry: pb.Entry = result.entry
        return entry

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = self.loop.create_task(coro)
        self.settle()
        return task

    def settle(self) -> None:
        """Let every task that can run, run (a grant resumes its waiter one loop step later)."""
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    def lease(
        self, s: Session, name: str, *, ttl: float = 30.0, shared: bool = False, wait: bool = False
    ) -> pb.LeaseResponse:
        return self.run(self.broker.lease(s, _lease_req(name, ttl, shared, wait), None))

    def wait_lease(
        self, s: Session, name: str, *, ttl: float = 30.0, shared: bool = False, timeout: float | None = None
    ) -> asyncio.Task[pb.LeaseResponse]:
        return self.start(self.broker.lease(s, _lease_req(name, ttl, shared, True), timeout))

    def lease_events(self, name: str) -> list[tuple[str, str, int]]:
        """(type, reason, epoch) of every lease event on ``name``, in order."""
        return [
            (EV.Type.Name(e.type), EV.Reason.Name(e.reason), e.epoch)
            for e in self.events
            if e.name == name and e.type in (EV.TYPE_LEASE_GRANTED, EV.TYPE_LEASE_RELEASED)
        ]

    def types(self, name: str) -> list[str]:
        return [EV.Type.Name(e.type) for e in self.events if e.name == name]

    def holders(self, name: str) -> list[str]:
        return [h.lease_id for h in self.broker.stat(None, name).entry.lease.holders]

    def close(self) -> None:
        self.loop.close()
        self.broker.close()


def _lease_req(name: str, ttl: float, shared: bool, wait: bool) -> pb.LeaseRequest:
    req = pb.LeaseRequest(name=name, mode=SHARED if shared else EXCLUSIVE, wait=wait)
    req.ttl.FromNanoseconds(int(ttl * 1e9))
    return req


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("inprocess", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def _policy(**limits: int) -> Policy:
    return Policy(os.getuid(), limits=Limits(**limits))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def h(clock: Clock) -> Iterator[Harness]:
    harness = Harness(Broker(BrokerConfig(capacity=64, token_ttl=TOKEN_TTL), _policy(), clock=clock), clock)
    yield harness
    harness.close()


def _small(clock: Clock, **limits: int) -> Harness:
    return Harness(
        Broker(BrokerConfig(capacity=64, token_ttl=TOKEN_TTL), _policy(**limits), clock=clock), clock
    )


# -- leases: grant, queue, modes ---------------------------------------------------------------------------------


def test_grant_delivers_the_descriptor_tagged_with_a_lease_token_and_records_the_event(h: Harness) -> None:
    a, sink = h.session()
    h.put(a, sink, "l/res", b"held")
    r = h.lease(a, "l/res", ttl=10)
    assert r.epoch > 0 and r.lease_id and r.handoff.operation == OP.OPERATION_LEASE
    deliver = sink.last("deliver")
    assert [i.token for i in deliver.items] == [r.handoff.token]
    assert deliver.items[0].operation == OP.OPERATION_LEASE and sink.frames[-1][1] == 1
    assert h.lease_events("l/res") == [("TYPE_LEASE_GRANTED", "REASON_UNSPECIFIED", r.epoch)]
    assert h.holders("l/res") == [r.lease_id]


def test_exclusive_waiters_are_served_first_in_first_out(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    c, _ = h.session()
    h.put(a, sa, "q/res")
    first = h.lease(a, "q/res")
    wb = h.wait_lease(b, "q/res")
    wc = h.wait_lease(c, "q/res")
    assert h.broker.stat(None, "q/res").entry.lease.waiters == 2
    h.broker.release(a, first.lease_id, False)
    h.settle()
    assert wb.done() and not wc.done()
    second = wb.result()
    h.broker.release(b, second.lease_id, False)
    h.settle()
    third = wc.result()
    assert first.epoch < second.epoch < third.epoch
    assert h.holders("q/res") == [third.lease_id]


def test_shared_leases_coexist_and_exclude_an_exclusive_one(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    x, _ = h.session()
    h.put(a, sa, "s/res")
    s1 = h.lease(a, "s/res", shared=True)
    s2 = h.lease(b, "s/res", shared=True)
    assert h.broker.stat(None, "s/res").entry.lease.mode == SHARED
    with pytest.raises(FailedPrecondition, match=r"leased by pid \d+ .*shared"):
        h.lease(x, "s/res")
    ex = h.wait_lease(x, "s/res")
    with pytest.raises(FailedPrecondition, match=r"queued|leased by"):
        h.lease(b, "s/res", shared=True)  # would jump the queued exclusive request
    h.broker.release(a, s1.lease_id, False)
    h.settle()
    assert not ex.done()  # one shared holder left
    h.broker.release(b, s2.lease_id, False)
    h.settle()
    assert ex.result().epoch > s2.epoch
    assert h.broker.stat(None, "s/res").entry.lease.mode == EXCLUSIVE


def test_a_queued_exclusive_request_holds_back_later_shared_ones_then_they_are_granted_together(
    h: Harness,
) -> None:
    a, sa = h.session()
    x, _ = h.session()
    b, _ = h.session()
    c, _ = h.session()
    h.put(a, sa, "f/res")
    held = h.lease(a, "f/res", shared=True)
    ex = h.wait_lease(x, "f/res")
    later = [h.wait_lease(s, "f/res", shared=True) for s in (b, c)]
    h.broker.release(a, held.lease_id, False)
    h.settle()
    assert ex.done() and not any(t.done() for t in later)
    h.broker.release(x, ex.result().lease_id, False)
    h.settle()
    assert all(t.done() for t in later)
    assert sorted(h.holders("f/res")) == sorted(t.result().lease_id for t in later)


def test_a_stream_of_overlapping_shared_holders_cannot_starve_an_exclusive_waiter(h: Harness) -> None:
    """The lease is never free: each shared holder asks again before it releases. The exclusive request still
    gets in, because every request after it queues behind it."""
    sessions = [h.session()[0] for _ in range(3)]
    x, _ = h.session()
    owner, so = h.session()
    h.put(owner, so, "st/res")
    held = {s.id: h.lease(s, "st/res", shared=True) for s in sessions}
    ex = h.wait_lease(x, "st/res")
    again = []
    for s in sessions:  # each holder queues for its next turn, then lets go of this one
        again.append(h.wait_lease(s, "st/res", shared=True))
        h.broker.release(s, held[s.id].lease_id, False)
        h.settle()
    assert ex.done() and not any(t.done() for t in again)
    assert h.holders("st/res") == [ex.result().lease_id]
    h.broker.release(x, ex.result().lease_id, False)
    h.settle()
    assert all(t.done() for t in again)  # then the shared ones, together
    assert ex.result().epoch < min(t.result().epoch for t in again)


def test_a_waiter_that_gives_up_leaves_the_queue_with_deadline_exceeded_naming_the_holder(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    h.put(a, sa, "d/res")
    h.lease(a, "d/res")
    task = h.wait_lease(b, "d/res", timeout=0.05)  # the deadline is the RPC's, in real time
    with pytest.raises(DeadlineExceeded, match=rf"'d/res'.*pid {a.identity.pid}"):
        h.run(task)
    assert h.broker.stat(None, "d/res").entry.lease.waiters == 0


def test_the_holder_may_use_its_own_exclusive_lease_and_others_are_told_who_holds_it(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    h.put(a, sa, "own/res")
    h.lease(a, "own/res")
    h.broker.get(a, "own/res")
    for op in (lambda: h.broker.get(b, "own/res"), lambda: h.broker.take(b, "own/res")):
        with pytest.raises(FailedPrecondition, match=rf"exclusive lease held by pid {a.identity.pid}"):
            op()


# -- leases: expiry, keep-alive, check-in -----------------------------------------------------------------------


def test_a_lease_expires_at_its_ttl_and_tick_says_when(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "e/res")
    r = h.lease(a, "e/res", ttl=1.0)
    assert h.broker.tick() == pytest.approx(h.clock.now + 1.0)
    h.clock.advance(0.99)
    h.broker.tick()
    assert h.holders("e/res") == [r.lease_id]
    h.clock.advance(0.02)
    assert h.broker.tick() is None  # nothing left to wait for
    assert h.holders("e/res") == []
    assert h.lease_events("e/res")[-1] == ("TYPE_LEASE_RELEASED", "REASON_EXPIRED", r.epoch)
    assert list(h.broker.keepalive(a, [r.lease_id]).gone) == [r.lease_id]
    with pytest.raises(NotFound, match="no lease"):
        h.broker.release(a, r.lease_id, False)


def test_keepalive_moves_the_expiry_and_only_for_the_holders_own_leases(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    h.put(a, sa, "ka/res")
    r = h.lease(a, "ka/res", ttl=1.0)
    for _ in range(5):
        h.clock.advance(0.8)
        k = h.broker.keepalive(a, [r.lease_id, "no-such-lease"])
        assert [x.lease_id for x in k.renewed] == [r.lease_id] and list(k.gone) == ["no-such-lease"]
        assert h.broker.tick() == pytest.approx(h.clock.now + 1.0)
    assert list(h.broker.keepalive(b, [r.lease_id]).gone) == [r.lease_id]  # another session's lease
    assert h.holders("ka/res") == [r.lease_id]
    h.clock.advance(1.0)
    h.broker.tick()
    assert h.lease_events("ka/res")[-1][1] == "REASON_EXPIRED"


def test_checkin_stores_the_returned_descriptor_then_releases_and_the_next_holder_gets_it(h: Harness) -> None:
    a, sa = h.session()
    b, sb = h.session()
    h.put(a, sa, "ci/res", b"old")
    old_id = h.broker.stat(None, "ci/res").entry.revision
    r = h.lease(a, "ci/res")
    waiter = h.wait_lease(b, "ci/res")
    rel = h.broker.release(a, r.lease_id, True)
    assert rel.handoff.operation == OP.OPERATION_CHECKIN
    assert h.holders("ci/res") == [r.lease_id]  # held until the descriptor arrives
    with pytest.raises(FailedPrecondition, match="already being checked in"):
        h.broker.release(a, r.lease_id, True)
    h.deposit(a, sa, rel.handoff.token, b"new")
    h.settle()
    nxt = waiter.result()
    assert h.types("ci/res")[-3:] == ["TYPE_PUT", "TYPE_LEASE_RELEASED", "TYPE_LEASE_GRANTED"]
    assert h.lease_events("ci/res")[-2][:2] == ("TYPE_LEASE_RELEASED", "REASON_RELEASED")
    assert nxt.entry.revision > old_id
    fd_count = sb.frames[-1][1]
    assert sb.last("deliver").items[0].token == nxt.handoff.token and fd_count == 1


def test_an_abandoned_checkin_releases_the_lease_and_keeps_the_entry(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "ab/res", b"kept")
    before = h.broker.stat(None, "ab/res").entry
    r = h.lease(a, "ab/res", ttl=60)
    h.broker.release(a, r.lease_id, True)
    assert h.broker.tick() == pytest.approx(h.clock.now + TOKEN_TTL)  # the check-in token is due first
    h.clock.advance(TOKEN_TTL)
    h.broker.tick()
    assert h.holders("ab/res") == []
    assert h.lease_events("ab/res")[-1][:2] == ("TYPE_LEASE_RELEASED", "REASON_RELEASED")
    assert h.broker.stat(None, "ab/res").entry.create_time == before.create_time
    assert h.broker.pending_puts == 0


def test_checkin_after_expiry_is_refused_and_the_entry_keeps_its_descriptor(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "late/res", b"kept")
    before = h.broker.stat(None, "late/res").entry
    r = h.lease(a, "late/res", ttl=1.0)
    h.clock.advance(1.0)
    h.broker.tick()
    with pytest.raises(NotFound, match="no lease"):
        h.broker.release(a, r.lease_id, True)
    assert h.broker.stat(None, "late/res").entry.create_time == before.create_time


def test_checkin_is_refused_when_the_entry_was_replaced_since_the_grant(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "cas/res", b"v1")
    r = h.lease(a, "cas/res")
    h.put(a, sa, "cas/res", b"v2", replace=True)
    assert h.holders("cas/res") == [r.lease_id]  # the lease follows the name
    with pytest.raises(FailedPrecondition, match="replaced since"):
        h.broker.release(a, r.lease_id, True)
    assert h.holders("cas/res") == [r.lease_id]
    h.broker.release(a, r.lease_id, False)
    assert h.holders("cas/res") == []


# -- leases end with their holder or their entry -----------------------------------------------------------------


def test_session_end_releases_its_leases_as_holder_died_and_the_next_waiter_gets_in(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    h.put(a, sa, "sd/res")
    r = h.lease(a, "sd/res", ttl=600)
    waiter = h.wait_lease(b, "sd/res")
    h.broker.end_session(a)
    h.settle()
    got = waiter.result()
    assert h.lease_events("sd/res") == [
        ("TYPE_LEASE_GRANTED", "REASON_UNSPECIFIED", r.epoch),
        ("TYPE_LEASE_RELEASED", "REASON_HOLDER_DIED", r.epoch),
        ("TYPE_LEASE_GRANTED", "REASON_UNSPECIFIED", got.epoch),
    ]
    assert list(h.broker.keepalive(b, [r.lease_id]).gone) == [r.lease_id]


def test_session_end_releases_leases_before_removing_its_ephemeral_entries(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "eph/res", ephemeral=True)
    r = h.lease(a, "eph/res")
    h.broker.end_session(a)
    assert h.types("eph/res")[-2:] == ["TYPE_LEASE_RELEASED", "TYPE_DELETE"]
    assert h.lease_events("eph/res")[-1] == ("TYPE_LEASE_RELEASED", "REASON_HOLDER_DIED", r.epoch)
    assert [EV.Reason.Name(e.reason) for e in h.events if e.type == EV.TYPE_DELETE] == [
        "REASON_SESSION_ENDED"
    ]


def test_removing_the_entry_ends_its_leases_then_fails_its_waiters(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    h.put(a, sa, "rm/res")
    r = h.lease(a, "rm/res")
    waiter = h.wait_lease(b, "rm/res")
    h.broker.delete(a, "rm/res")
    h.settle()
    with pytest.raises(NotFound, match="removed while waiting"):
        waiter.result()
    assert h.types("rm/res")[-2:] == ["TYPE_LEASE_RELEASED", "TYPE_DELETE"]
    assert h.lease_events("rm/res")[-1] == ("TYPE_LEASE_RELEASED", "REASON_ENTRY_REMOVED", r.epoch)
    assert list(h.broker.keepalive(a, [r.lease_id]).gone) == [r.lease_id]


def test_an_expiring_entry_ends_its_leases_first(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "xe/res", ttl=2.0)
    r = h.lease(a, "xe/res", ttl=60)
    h.clock.advance(2.0)
    h.broker.tick()
    assert h.types("xe/res")[-2:] == ["TYPE_LEASE_RELEASED", "TYPE_EXPIRE"]
    assert h.lease_events("xe/res")[-1] == ("TYPE_LEASE_RELEASED", "REASON_ENTRY_REMOVED", r.epoch)


def test_epochs_keep_increasing_across_delete_and_reput(h: Harness) -> None:
    a, sa = h.session()
    epochs = []
    for _ in range(3):
        h.put(a, sa, "ep/res")
        for shared in (False, True):
            r = h.lease(a, "ep/res", shared=shared)
            epochs.append(r.epoch)
            h.broker.release(a, r.lease_id, False)
        h.broker.delete(a, "ep/res")
    assert epochs == sorted(set(epochs))


# -- entries and tokens expire; tick says when the next thing is due ---------------------------------------------


def test_an_entry_expires_at_its_ttl(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "ttl/res", ttl=2.0)
    assert h.broker.tick() == pytest.approx(h.clock.now + 2.0)
    h.clock.advance(1.5)
    h.broker.tick()
    assert "ttl/res" in h.broker.registry
    h.clock.advance(0.5)
    assert h.broker.tick() is None
    assert "ttl/res" not in h.broker.registry and h.types("ttl/res")[-1] == "TYPE_EXPIRE"


def test_an_entry_being_taken_does_not_expire_until_the_take_ends(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "tk/res", ttl=1.0)
    h.broker.take(a, "tk/res")
    h.clock.advance(1.0)
    h.broker.tick()
    assert "tk/res" in h.broker.registry  # the receiver may still ack
    h.clock.advance(TOKEN_TTL)
    h.broker.tick()  # the take token expired: the take is abandoned, then the entry expires
    h.broker.tick()
    assert "tk/res" not in h.broker.registry


def test_a_put_token_expires_unredeemed_and_gives_back_its_reservation(h: Harness) -> None:
    a, sa = h.session()
    token = h.broker.put_begin(a, pb.PutRequest(name="tok/res")).handoff.token
    assert len(h.broker.tokens) == 1 and h.broker.pending_puts == 1
    assert h.broker.tick() == pytest.approx(h.clock.now + TOKEN_TTL)
    h.clock.advance(TOKEN_TTL)
    assert h.broker.tick() is None
    assert len(h.broker.tokens) == 0 and h.broker.pending_puts == 0
    fd = _memfd(b"late")
    h.broker.on_frame(a, Frame(cpb.ConduitFrame(fd_count=1, deposit=cpb.Deposit(tokens=[token])), [fd]))
    (result,) = sa.last("deposited").results
    assert result.token == token and "expired" in result.error.message
    assert "tok/res" not in h.broker.registry


def test_tick_reports_the_earliest_of_tokens_entries_and_leases(h: Harness) -> None:
    a, sa = h.session()
    assert h.broker.tick() is None
    h.put(a, sa, "due/entry", ttl=30.0)
    h.lease(a, "due/entry", ttl=20.0)
    assert h.broker.tick() == pytest.approx(h.clock.now + 20.0)
    h.broker.put_begin(a, pb.PutRequest(name="due/put"))
    assert h.broker.tick() == pytest.approx(h.clock.now + TOKEN_TTL)


# -- prefetch pool, explicit-token quota ------------------------------------------------------------------------


def test_prefetch_fills_its_own_pool_and_a_full_pool_never_fails_the_call(clock: Clock) -> None:
    h = _small(clock, max_prefetch_tokens_per_uid=5, max_pending_tokens_per_uid=2)
    try:
        a, sa = h.session()
        h.put(a, sa, "pf/res")
        assert len(h.broker.get(a, "pf/res", prefetch=3).prefetch_tokens) == 3
        r = h.broker.get(a, "pf/res", prefetch=3)
        assert len(r.prefetch_tokens) == 2  # the room left in the pool
        r = h.broker.get(a, "pf/res", prefetch=3)
        assert len(r.prefetch_tokens) == 0 and not r.HasField("prefetch_expire_time")
        assert len(sa.bodies("deliver")) == 3  # every get delivered
        h.broker.take(a, "pf/res")  # explicit tokens have their own quota, untouched by the pool
        h.broker.put_begin(a, pb.PutRequest(name="pf/other"))
        with pytest.raises(ResourceExhausted, match="handoff tokens pending"):
            h.broker.put_begin(a, pb.PutRequest(name="pf/third"))
        h.clock.advance(TOKEN_TTL)
        h.broker.tick()  # everything expired: the pool is empty again
        assert len(h.broker.get(a, "pf/res", prefetch=9).prefetch_tokens) == 5
    finally:
        h.close()


def test_a_prefetched_token_is_redeemed_on_the_conduit_for_a_delivery(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "rd/res")
    (token,) = h.broker.get(a, "rd/res", prefetch=1).prefetch_tokens
    h.broker.on_frame(a, Frame(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[token]))))
    assert sa.last("deliver").items[0].token == token and sa.frames[-1][1] == 1
    h.broker.on_frame(a, Frame(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[token]))))
    err = sa.last("error")
    assert err.token == token and "already used" in err.message


def _redeem(h: Harness, s: Session, *tokens: bytes, refill: int = 0) -> None:
    h.broker.on_frame(s, Frame(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=tokens, refill=refill))))


def test_a_redeem_with_refill_brings_fresh_tokens_in_its_deliver_item_from_the_uids_pool(
    clock: Clock,
) -> None:
    h = _small(clock, max_prefetch_tokens_per_uid=6)
    try:
        a, sa = h.session()
        h.put(a, sa, "rf/res")
        (token,) = h.broker.get(a, "rf/res", prefetch=1).prefetch_tokens
        _redeem(h, a, token, refill=4)
        (item,) = sa.last("deliver").items
        assert item.token == token and len(item.prefetch_tokens) == 4 and sa.frames[-1][1] == 1
        assert item.HasField("prefetch_expire_time")
        fresh = list(item.prefetch_tokens)
        _redeem(h, a, fresh[0], refill=100)  # asks for 100: the pool has room for 6 - 3 = 3
        (item,) = sa.last("deliver").items
        assert item.token == fresh[0] and len(item.prefetch_tokens) == 3
        fresh += item.prefetch_tokens
        _redeem(
            h, a, fresh[1], refill=5
        )  # the pool is full (6 held) but for the room its own redemption made
        (item,) = sa.last("deliver").items
        assert item.token == fresh[1] and len(item.prefetch_tokens) == 1
        fresh += item.prefetch_tokens
        _redeem(h, a, *fresh[2:])  # every refilled token redeems, each once
        assert [i.token for i in sa.last("deliver").items] == fresh[2:]
        assert not any(
            i.prefetch_tokens or i.HasField("prefetch_expire_time") for i in sa.last("deliver").items
        )
        assert h.broker.tokens.counts()[1] == 0
    finally:
        h.close()


def test_a_refill_is_decided_again_by_the_policy_and_a_denied_caller_gets_no_tokens(h: Harness) -> None:
    uid = os.getuid() + 4242  # not the broker's: the rules apply to it
    a, sa = h.session(uid=uid)
    h.put(a, sa, "rf/denied")
    tokens = list(h.broker.get(a, "rf/denied", prefetch=2).prefetch_tokens)
    h.broker.set_policy(Policy(os.getuid(), rules=[Rule(uids=frozenset({uid}), deny=frozenset({"get"}))]))
    denials = h.broker.metrics.denials.values
    before = denials.get(("get",), 0)
    _redeem(h, a, tokens[0], refill=8)
    (item,) = sa.last("deliver").items  # the token was granted before: it delivers, and nothing more
    assert item.token == tokens[0] and not item.prefetch_tokens
    assert denials.get(("get",), 0) == before + 1  # counted (and audited) as the Get RPC's denial
    assert h.broker.tokens.counts()[1] == 1  # only the one left from the Get


def test_a_refill_above_the_limit_refuses_the_frame_and_spends_no_token(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "rf/big")
    tokens = list(h.broker.get(a, "rf/big", prefetch=2).prefetch_tokens)
    _redeem(h, a, *tokens, refill=1025)
    errs = sa.bodies("error")
    assert [e.token for e in errs] == tokens and {e.code for e in errs} == {3}  # INVALID_ARGUMENT
    assert not sa.bodies("deliver")[1:]  # only the Get's own
    _redeem(h, a, *tokens, refill=1024)  # still good; only the first token's item is refilled
    items = sa.last("deliver").items
    assert [i.token for i in items] == tokens and len(items[0].prefetch_tokens) == 1024
    assert not items[1].prefetch_tokens


def test_a_refill_rides_only_on_a_first_token_that_delivers(h: Harness) -> None:
    a, sa = h.session()
    h.put(a, sa, "rf/first")
    good = list(h.broker.get(a, "rf/first", prefetch=2).prefetch_tokens)
    _redeem(h, a, b"\0" * 32, good[0], refill=8)  # the first token fails: no refill for the second
    assert sa.last("error").token == b"\0" * 32
    (item,) = sa.last("deliver").items
    assert item.token == good[0] and not item.prefetch_tokens
    (batch,) = h.broker.batch_get(a, ["rf/first"], prefetch=1).prefetch_tokens
    _redeem(h, a, batch, refill=8)  # a batch token is not refilled
    assert sa.last("deliver").items[0].token == batch and not sa.last("deliver").items[0].prefetch_tokens
    assert h.broker.tokens.counts()[1] == 1  # good[1]


def test_a_refill_never_makes_the_answer_outgrow_a_frame(clock: Clock) -> None:
    config = BrokerConfig(capacity=64, token_ttl=TOKEN_TTL, max_frame_bytes=2048)
    h = Harness(Broker(config, _policy(), clock=clock), clock)
    try:
        a, sa = h.session()
        h.put(a, sa, "rf/small")
        (token,) = h.broker.get(a, "rf/small", prefetch=1).prefetch_tokens
        _redeem(h, a, token, refill=1024)
        (item,) = sa.last("deliver").items
        assert 0 < len(item.prefetch_tokens) < 60
        assert sa.last("deliver").ByteSize() + 8 <= 2048
    finally:
        h.close()


# -- session end voids its tokens -------------------------------------------------------------------------------


def test_session_end_voids_every_token_and_undoes_what_each_reserved(h: Harness) -> None:
    a, sa = h.session()
    b, _ = h.session()
    h.put(a, sa, "v/taken")
    h.put(a, sa, "v/got")
    h.broker.put_begin(a, pb.PutRequest(name="v/new"))
    h.broker.take(a, "v/taken")
    h.broker.get(a, "v/got", prefetch=4)
    assert len(h.broker.tokens) == 6 and h.broker.pending_puts == 1
    h.broker.end_session(a)
    assert len(h.broker.tokens) == 0 and h.broker.pending_puts == 0
    assert len(h.broker.sessions) == 1
    h.broker.take(b, "v/taken")  # the abandoned take left the entry, takeable again
    assert h.broker.tick() == pytest.approx(h.clock.now + TOKEN_TTL)  # only b's take token is left


def test_a_deposit_whose_descriptor_never_arrived_answers_an_error_naming_each_token(h: Harness) -> None:
    a, sa = h.session()
    tokens = [h.broker.put_begin(a, pb.PutRequest(name=f"miss/{i}")).handoff.token for i in range(2)]
    fd = _memfd(b"only one")  # the broker's from here on: closed, as the frame is refused whole
    h.broker.on_frame(a, Frame(cpb.ConduitFrame(fd_count=1, deposit=cpb.Deposit(tokens=tokens)), [fd]))
    errors = sa.bodies("error")
    assert [e.token for e in errors] == tokens
    assert all(e.code == 3 and "1 descriptors for 2 tokens" in e.message for e in errors)
    assert len(h.broker.tokens) == 0 and h.broker.pending_puts == 0  # both tokens are spent
    assert "miss/0" not in h.broker.registry and "miss/1" not in h.broker.registry


def test_cancelled_lease_requests_leave_no_waiter_behind(clock: Clock) -> None:
    """max_lease_waiters_per_uid counts live requests; a cancelled or timed-out one used to stay in the entry's
    queue (marked cancelled) until it reached the head, which a live waiter ahead of it prevents. One uid could
    queue and cancel without bound: the queue grew by one per request, and every Stat, List, scrape and grant
    walked it. A request that gives up now leaves the queue at once."""
    h = _small(clock, max_lease_waiters_per_uid=2)
    try:
        owner, sink = h.session()
        h.put(owner, sink, "l/x")
        h.lease(owner, "l/x")
        hog, _ = h.session()  # any uid the policy lets lease the entry; the queue limit is per uid
        first = h.wait_lease(hog, "l/x")  # live, at the head: it stays
        for i in range(50):
            if i % 2:
                t = h.wait_lease(hog, "l/x")
                t.cancel()
                h.settle()
                assert t.cancelled()
            else:
                t = h.wait_lease(hog, "l/x", timeout=0.0)
                h.settle()
                with pytest.raises(DeadlineExceeded):
                    t.result()
        e = h.broker.registry.find("l/x")
        assert e is not None and e.lease is not None
        assert list(e.lease.waiters) == [w for w in e.lease.waiters if not w.cancelled]
        assert len(e.lease.waiters) == 1
        assert h.broker.stat(None, "l/x").entry.lease.waiters == 1
        first.cancel()
        h.settle()
        assert len(e.lease.waiters) == 0
    finally:
        h.close()
