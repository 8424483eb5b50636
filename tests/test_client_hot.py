"""The blocking client's hot path for a repeated prefetched get (``Client._get_hot``), held to the flow it stands
for: each scenario runs once with ``fdbroker.Client`` and once with :class:`FlowOnly` (the same client with the
hot path off: every get is its flow from the start), against a real broker, and the two must come out alike —
the descriptors returned, the errors raised, the counters, the tokens left, and no descriptor left open in this
process (the ``fdbroker_broker`` fixture checks the broker's side at teardown).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fdbroker
from fdbroker.client import flows
from fdbroker.client.session import pong_key
from fdbroker.errors import BrokerError
from fdbroker.testing import BrokerProcess
from fdbroker.v1 import conduit_pb2 as cpb

IDLE = {"answers": 0, "unclaimed": 0, "expected": 0, "waiting": 0}


class FlowOnly(fdbroker.Client):
    """``fdbroker.Client`` without its hot path: ``get``/``get_fd`` drive their flows from the start."""

    _get_hot = None  # type: ignore[assignment]
    _get_fd_hot = None  # type: ignore[assignment]


KINDS = {"hot": fdbroker.Client, "flow": FlowOnly}


def copies_of(tracked: list[Any]) -> set[int]:
    """This process's descriptors of the open files ``tracked`` (descriptors or sockets) refer to."""
    files = {inode(t if isinstance(t, int) else t.fileno()) for t in tracked}
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            if inode(int(n)) in files:
                out.add(int(n))
        except OSError:
            pass  # the listing's own descriptor
    return out


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def counting_flows(c: fdbroker.Client) -> dict[str, int]:
    """Count the flows ``c`` drives from now on, by name (a get the hot path served drives none; one it handed on
    after its exchange drives ``get_resumed``)."""
    seen: dict[str, int] = {}

    def counting(drive: Callable[..., Any]) -> Callable[..., Any]:
        def counted(flow: Any, *args: Any, **kwargs: Any) -> Any:
            name = flow.gi_code.co_name
            seen[name] = seen.get(name, 0) + 1
            return drive(flow, *args, **kwargs)

        return counted

    c._drive = counting(c._drive)  # type: ignore[method-assign]
    c._resume = counting(c._resume)  # type: ignore[method-assign]
    return seen


def both(
    scenario: Callable[[type[fdbroker.Client], str], dict[str, Any]], tracked: list[Any]
) -> dict[str, dict[str, Any]]:
    """Run ``scenario(client class, name prefix)`` for both kinds; neither may leave open in this process a copy of
    the files ``tracked`` (the entries' descriptors, which the test keeps)."""
    out = {}
    for kind, cls in KINDS.items():
        before = copies_of(tracked)
        out[kind] = scenario(cls, f"hot-{kind}")
        leaked = copies_of(tracked) - before
        assert not leaked, (kind, leaked)
    return out


def outcome(call: Callable[[], Any]) -> Any:
    """The result of ``call`` or the class and code of the error it raised."""
    try:
        return call()
    except BrokerError as err:
        return (type(err).__name__, int(err.code))


@pytest.fixture
def broker(fdbroker_broker: BrokerProcess) -> Iterator[BrokerProcess]:
    yield fdbroker_broker


def test_repeated_gets_are_served_by_the_hot_path_and_come_out_as_the_flow(broker: BrokerProcess) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()

    def scenario(cls: type[fdbroker.Client], pre: str) -> dict[str, Any]:
        with cls(broker.run_dir, prefetch=8) as c:
            c.put(f"{pre}/sock", a)
            c.put(f"{pre}/pipe", w)
            flows_run = counting_flows(c)
            kinds, inodes = set(), set()
            for _ in range(20):
                s = c.get(f"{pre}/sock")
                kinds.add(type(s).__name__)
                inodes.add(inode(s.fileno()))
                s.close()
                f = c.get_fd(f"{pre}/pipe")
                kinds.add(type(f).__name__)
                inodes.add(inode(f.fileno()))
                f.close()
            got = {
                "kinds": kinds,
                "inodes": inodes,
                "stats": dict(c.stats),
                "pending": c._pending(),
                "flows": {k: v for k, v in flows_run.items() if k in ("get", "get_fd")},
            }
            c.delete(f"{pre}/sock")
            c.delete(f"{pre}/pipe")
            return got

    try:
        hot, flow = both(scenario, [a, w]).values()
        assert hot["kinds"] == flow["kinds"] == {"socket", "OwnedFd"}
        assert hot["inodes"] == flow["inodes"] == {inode(a.fileno()), inode(w)}
        # per name: one Get RPC with 8 tokens, then redeems; the last token's Redeem asks for 8 more (gets 9, 17)
        assert hot["stats"] == flow["stats"] == {"get_rpcs": 2, "redeems": 38, "refills": 4}
        assert hot["pending"] == flow["pending"] == IDLE
        assert flow["flows"] == {"get": 20, "get_fd": 20}
        assert hot["flows"] == {
            "get": 3,
            "get_fd": 3,
        }  # only the gets without a token in hand or with the last
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("change", ["deleted", "replaced", "leased"])
def test_a_token_the_broker_refuses_goes_on_as_in_the_flow(broker: BrokerProcess, change: str) -> None:
    """The entry changed after its tokens were prefetched: the broker answers the redeem with an ``Error``; the
    tokens are dropped and the control plane is asked (``NotFound``, the new descriptor, the lease's refusal)."""
    r, w = os.pipe()
    r2, w2 = os.pipe()

    def scenario(cls: type[fdbroker.Client], pre: str) -> dict[str, Any]:
        name = f"{pre}/x"
        with cls(broker.run_dir, prefetch=8) as c, fdbroker.Client(broker.run_dir) as other:
            c.put(name, w)
            c.get_fd(name).close()  # the RPC: 8 tokens held
            c.get_fd(name).close()  # a redeem
            lease = None
            if change == "deleted":
                other.delete(name)
            elif change == "replaced":
                other.put(name, w2, replace=True)
            else:
                lease = other.lease(name, ttl=30, keepalive=False)
            flows_run = counting_flows(c)

            def get() -> Any:
                with c.get_fd(name) as f:
                    return inode(f.fileno())

            got = {
                "outcome": outcome(get),
                "stats": dict(c.stats),
                "tokens": c._state.prefetch.count(name),
                "pending": c._pending(),
                "flows": dict(flows_run),
            }
            if lease is not None:
                lease.release()
            if change != "deleted":
                c.delete(name)
            return got

    try:
        hot, flow = both(scenario, [w, w2]).values()
        for k in ("outcome", "stats", "tokens", "pending"):
            assert hot[k] == flow[k], (k, hot[k], flow[k])
        expected = {"deleted": ("NotFound", 5), "replaced": inode(w2), "leased": hot["outcome"]}[change]
        assert hot["outcome"] == expected
        if change == "leased":
            assert isinstance(expected, tuple), expected  # refused, by the control plane too
        # a Get RPC the broker refuses raises before it is counted
        assert hot["stats"] == {"redeems": 2, "get_rpcs": 2 if change == "replaced" else 1}, hot["stats"]
        assert hot["pending"] == IDLE
        # the hot path redeemed the token, then the flow went on from that Redeem (no second redeem of it)
        assert hot["flows"] == {"get_resumed": 1}, hot["flows"]
        assert flow["flows"] == {"get_fd": 1}, flow["flows"]
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


def test_a_token_of_another_length_is_redeemed_as_the_flow_would(broker: BrokerProcess) -> None:
    """Not one of the broker's (32 bytes): the hot path leaves the ``Redeem`` to the flow's step, which sends it
    as it is; the broker refuses it and the control plane is asked."""
    r, w = os.pipe()

    def scenario(cls: type[fdbroker.Client], pre: str) -> dict[str, Any]:
        name = f"{pre}/x"
        with cls(broker.run_dir, prefetch=0) as c:
            c.put(name, w)
            c.get_fd(name).close()
            c._state.prefetch.add(name, [b"\x01" * 16], time.monotonic() + 30)

            def get() -> Any:
                with c.get_fd(name) as f:
                    return inode(f.fileno())

            got = {"outcome": outcome(get), "stats": dict(c.stats), "pending": c._pending()}
            c.delete(name)
            return got

    try:
        hot, flow = both(scenario, [w]).values()
        assert hot == flow
        assert hot["outcome"] == inode(w) and hot["stats"] == {"get_rpcs": 2, "redeems": 1}
        assert hot["pending"] == IDLE
    finally:
        os.close(r)
        os.close(w)


def test_no_answer_in_time_is_deadline_exceeded_and_the_late_answer_is_closed(broker: BrokerProcess) -> None:
    """The broker stopped (SIGSTOP) with a redeem in flight: ``DeadlineExceeded`` within the client's timeout; once
    it runs again, its late ``Deliver`` is closed when it is read, and the next get works."""
    r, w = os.pipe()

    def scenario(cls: type[fdbroker.Client], pre: str) -> dict[str, Any]:
        name = f"{pre}/x"
        with cls(broker.run_dir, prefetch=8) as c:
            c.put(name, w)
            c.get_fd(name).close()
            c.timeout = 0.5
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                t = time.monotonic()
                late = outcome(lambda: c.get_fd(name).close())
                took = time.monotonic() - t
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            c.timeout = 10.0
            with c.get_fd(name) as f:  # reads (and closes) the late Deliver first
                after = inode(f.fileno())
            got = {"late": late, "within": took < 5, "after": after, "pending": c._pending()}
            got["stats"] = dict(c.stats)
            c.delete(name)
            return got

    try:
        hot, flow = both(scenario, [w]).values()
        assert hot == flow
        assert hot["late"] == ("DeadlineExceeded", 4) and hot["within"]
        assert hot["after"] == inode(w) and hot["pending"] == IDLE
    finally:
        os.close(r)
        os.close(w)


def test_a_takeover_under_a_hot_get_is_ridden_through() -> None:
    """The broker is replaced (``serve --takeover``) while tokens are held: the hot path's exchange meets the closed
    conduit, and the flow tries again on a new session (client/session.py, flows._recover), as the flow alone
    does."""
    r, w = os.pipe()

    def scenario(cls: type[fdbroker.Client], pre: str) -> dict[str, Any]:
        run_dir = (
            Path(tempfile.mkdtemp(prefix="fdb-hot-", dir="/tmp")) / "run"
        )  # short: sun_path is 108 bytes
        brokers = [BrokerProcess.start(run_dir)]
        try:
            with cls(run_dir, prefetch=8) as c:
                c.put("x", w)
                c.get_fd("x").close()
                c.get_fd("x").close()  # a redeem; 7 tokens held, void once the broker is replaced
                first = c.session_id
                brokers.append(BrokerProcess.start(run_dir, args=["--takeover"]))
                assert brokers[0].proc.wait(timeout=30) == 0
                with c.get_fd("x") as f:
                    got = {"inode": inode(f.fileno()), "new_session": c.session_id != first}
                got["stats"] = dict(c.stats)
                got["pending"] = c._pending()
                c.delete("x")
                return got
        finally:
            for b in brokers:
                b.stop()
            shutil.rmtree(run_dir.parent, ignore_errors=True)

    try:
        hot, flow = both(scenario, [w]).values()
        assert hot == flow
        assert hot["inode"] == inode(w) and hot["new_session"]
        assert hot["stats"] == {"get_rpcs": 2, "redeems": 1, "retries": 1, "reconnects": 1}, hot["stats"]
        assert hot["pending"] == IDLE
    finally:
        os.close(r)
        os.close(w)


def test_another_frame_in_the_hot_exchange_s_read_is_filed_and_the_get_answered_from_the_mailbox(
    broker: BrokerProcess,
) -> None:
    """A ``Ping`` sent (by hand) before a hot get: its ``Pong`` comes first, in the read that was to bring the
    ``Deliver``; the get goes on in its flow and finds its answer in the mailbox, and the ``Pong`` waits there for
    whoever expects it."""
    r, w = os.pipe()

    def scenario(cls: type[fdbroker.Client], pre: str) -> dict[str, Any]:
        name = f"{pre}/x"
        with cls(broker.run_dir, prefetch=8) as c:
            c.put(name, w)
            c.get_fd(name).close()
            flows_run = counting_flows(c)
            c.raw.send(cpb.ConduitFrame(ping=cpb.Ping(nonce=77)), expect=[pong_key(77)])
            with c.get_fd(name) as f:
                got: dict[str, Any] = {"inode": inode(f.fileno()), "flows": dict(flows_run)}
            (pong,) = c.raw.await_answers([pong_key(77)])
            got.update(pong=(pong.kind, pong.message.nonce), stats=dict(c.stats), pending=c._pending())
            c.delete(name)
            return got

    try:
        hot, flow = both(scenario, [w]).values()
        for k in ("inode", "pong", "stats", "pending"):
            assert hot[k] == flow[k], (k, hot[k], flow[k])
        assert hot["inode"] == inode(w) and hot["pong"] == ("pong", 77) and hot["pending"] == IDLE
        assert hot["stats"] == {"get_rpcs": 1, "redeems": 1}
        assert hot["flows"] == {"get_resumed": 1} and flow["flows"] == {"get_fd": 1}
    finally:
        os.close(r)
        os.close(w)


def test_threads_sharing_a_client_with_pings_between_their_gets(broker: BrokerProcess) -> None:
    """8 threads get one name 300 times each from one client (prefetch 16: refills race the redeems), while a ninth
    pings (its ``Pong`` lands in a hot get's read: that get finds its answer in the mailbox). Every get returns the
    entry, every descriptor is closed, nothing is left in the mailbox."""
    r, w = os.pipe()
    os.set_blocking(r, False)

    def scenario(cls: type[fdbroker.Client], pre: str) -> dict[str, Any]:
        name = f"{pre}/x"
        with cls(broker.run_dir, prefetch=16) as c:
            c.put(name, w)
            go = threading.Barrier(9)
            stop = threading.Event()
            errors: list[BaseException] = []
            wrote = 0
            lock = threading.Lock()

            def getter() -> None:
                nonlocal wrote
                go.wait()
                try:
                    for _ in range(300):
                        with c.get_fd(name) as f:
                            os.write(f.fileno(), b"g")
                        with lock:
                            wrote += 1
                except BaseException as err:
                    errors.append(err)

            def pinger() -> None:
                go.wait()
                try:
                    while not stop.is_set():
                        c.ping()
                except BaseException as err:
                    errors.append(err)

            threads = [threading.Thread(target=getter) for _ in range(8)]
            ping = threading.Thread(target=pinger)
            for t in [*threads, ping]:
                t.start()
            for t in threads:
                t.join(120)
            stop.set()
            ping.join(30)
            assert not errors, errors
            n = 0
            while True:
                try:
                    n += len(os.read(r, 65536))
                except BlockingIOError:
                    break
            got = {
                "gets": wrote,
                "bytes": n,
                "counted": c.stats["get_rpcs"] + c.stats["redeems"],
                "pending": c._pending(),
            }
            c.delete(name)
            return got

    try:
        hot, flow = both(scenario, [w]).values()
        assert hot == flow == {"gets": 2400, "bytes": 2400, "counted": 2400, "pending": IDLE}
    finally:
        os.close(r)
        os.close(w)


def test_the_verbs_keep_the_flows_signatures_and_documentation() -> None:
    import inspect

    for verb in ("get", "get_fd"):
        method = getattr(fdbroker.Client, verb)
        flow = getattr(flows, verb)
        assert method.__doc__ == flow.__doc__
        assert list(inspect.signature(method).parameters)[1:] == list(inspect.signature(flow).parameters)[1:]
