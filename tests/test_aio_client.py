"""``fdbroker.aio.Client`` end to end through a real broker process (the ``fdbroker_broker`` fixture checks the
broker's descriptor count after each test; ``no_fd_leak`` checks this process's). Descriptors are proven to work
on the receiving side, in other processes where it matters; the sync and asyncio clients interoperate."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from brokerutil import run_client, spawn_client

import fdbroker.aio
from fdbroker.client.steps import CallRpc, Flow
from fdbroker.errors import (
    Aborted,
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fdbroker.testing import BrokerProcess
from fdbroker.v1 import broker_pb2 as pb

T = TypeVar("T")

IDLE = {"answers": 0, "unclaimed": 0, "expected": 0, "waiting": 0}
"""``raw.pending()`` of a client with no call in progress: nothing held for anyone."""


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await main()

    return asyncio.run(wrapped())


def aclient(broker: BrokerProcess, **kw: Any) -> fdbroker.aio.Client:
    return fdbroker.aio.Client(broker.run_dir, **kw)


def test_put_pipe_by_aio_then_a_sync_client_in_another_process_writes_through_it(fdbroker_broker):
    r, w = os.pipe()
    try:

        async def main() -> None:
            async with aclient(fdbroker_broker) as c:
                e = await c.put("pipes/audit", w, labels={"team": "ops"})
                assert e.kind == "pipe" and e.revision > 0 and e.labels == {"team": "ops"}
                assert c.session_id and c.identity is not None and c.identity[0] == os.getpid()

        run(main)
        os.close(w)
        w = -1
        run_client(
            fdbroker_broker.run_dir,
            """
            import fdbroker, os
            with fdbroker.Client() as c:
                f = c.get_fd("pipes/audit")
                os.write(f.fileno(), b"hello from the sync side")
                f.close()
            """,
        )
        os.set_blocking(r, False)
        assert os.read(r, 100) == b"hello from the sync side"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_put_by_sync_child_got_by_aio(fdbroker_broker):
    out = run_client(
        fdbroker_broker.run_dir,
        """
        import fdbroker, os
        m = os.memfd_create("from-sync")
        os.write(m, b"deposited by the sync client")
        with fdbroker.Client() as c:
            print(c.put("mem/sync", m).kind)
        """,
    )
    assert out.stdout.strip() == "memfd"

    async def main() -> None:
        async with aclient(fdbroker_broker) as c:
            got = await c.get("mem/sync")
            assert isinstance(got, fdbroker.aio.OwnedFd)
            assert os.pread(got.fileno(), 100, 0) == b"deposited by the sync client"
            got.close()
            await c.delete("mem/sync")

    run(main)


def test_tcp_listener_put_by_aio_accepts_in_an_aio_child(fdbroker_broker):
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    async def put() -> None:
        async with aclient(fdbroker_broker) as c:
            e = await c.put("web/http", lsock)
            assert e.kind == "tcp-listener" and e.local_address == f"127.0.0.1:{port}" and e.listening

    run(put)
    lsock.close()  # only the broker holds the listener now
    child = spawn_client(
        fdbroker_broker.run_dir,
        """
        import asyncio, socket, fdbroker.aio
        async def main():
            async with fdbroker.aio.Client() as c:
                s = await c.get("web/http")
                assert isinstance(s, socket.socket) and s.family == socket.AF_INET, s
                print("READY", flush=True)
                conn, _ = s.accept()
                conn.sendall(b"served by " + str(s.getsockname()[1]).encode())
                conn.close(); s.close()
        asyncio.run(main())
        """,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY", child.stderr.read() if child.stderr else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        assert conn.recv(100) == f"served by {port}".encode()
    assert child.wait(10) == 0
    child.stdout.close()
    if child.stderr is not None:
        child.stderr.close()


def test_file_shares_offset_and_memfd_content(fdbroker_broker, tmp_path):
    p = tmp_path / "log"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    m = os.memfd_create("cfg")
    os.write(m, b"config-bytes")

    async def main() -> None:
        async with aclient(fdbroker_broker) as c:
            ef = await c.put("log/audit", fd)
            em = await c.put("mem/cfg", m)
            assert ef.kind == "file" and ef.path == str(p) and "O_APPEND" in ef.flags
            assert em.kind == "memfd"
            got = await c.get("log/audit")
            assert isinstance(got, io.FileIO), got  # a regular file: an unbuffered file object
            got.write(b"via broker\n")
            got.close()
            raw = await c.get_fd("log/audit")
            assert isinstance(raw, fdbroker.aio.OwnedFd)
            os.write(raw.fileno(), b"raw\n")
            raw.close()
            mm = await c.get("mem/cfg")
            assert os.pread(mm.fileno(), 100, 0) == b"config-bytes"
            mm.close()

    try:
        run(main)
        os.write(fd, b"direct\n")
        assert p.read_bytes() == b"via broker\nraw\ndirect\n"
    finally:
        os.close(fd)
        os.close(m)


def test_take_stat_list_delete_and_errors(fdbroker_broker):
    r, w = os.pipe()

    async def main() -> None:
        async with aclient(fdbroker_broker) as c:
            for n in ["a/one", "a/two", "b/three"]:
                await c.put(n, r, labels={"grp": n[0]})
            listing = await c.list("a/")
            assert [e.name for e in listing] == ["a/one", "a/two"]
            assert listing.revision >= 3
            assert [e.name for e in await c.list(selector="grp=b")] == ["b/three"]
            assert [e.name for e in await c.list(page_size=1)] == ["a/one", "a/two", "b/three"]
            with pytest.raises(AlreadyExists) as ei:
                await c.put("a/one", w)
            assert "a/one" in str(ei.value)
            rev = (await c.stat("a/one")).revision
            with pytest.raises(FailedPrecondition):
                await c.put("a/one", w, if_revision=rev + 1000)
            e = await c.put("a/one", w, if_revision=rev)
            assert e.kind == "pipe" and e.revision > rev
            with pytest.raises(InvalidArgument):
                await c.put("bad//name", w)
            with pytest.raises(NotFound) as nf:
                await c.get("nope/none")
            assert "nope/none" in str(nf.value)
            # take moves the write end out: the entry is gone and the descriptor works here
            taken = await c.take("a/one")
            with pytest.raises(NotFound):
                await c.stat("a/one")
            os.write(taken.fileno(), b"t")
            taken.close()
            assert os.read(r, 1) == b"t"
            rev_del = await c.delete("a/two")
            assert rev_del > rev
            with pytest.raises(NotFound):
                await c.delete("a/two")
            assert [e.name for e in await c.list()] == ["b/three"]
            info = await c.info()
            assert info.entries == 1 and info.revision >= rev_del

    try:
        run(main)
    finally:
        os.close(r)
        os.close(w)


def test_batch_get_of_300_entries_crosses_message_limit(fdbroker_broker):
    fds = [os.eventfd(i + 1) for i in range(300)]
    names = [f"batch/e{i:03d}" for i in range(300)]

    async def main() -> None:
        async with aclient(fdbroker_broker) as c:
            entries = await c.put_many(list(zip(names, fds, strict=True)))
            assert [e.name for e in entries] == names and {e.kind for e in entries} == {"eventfd"}
            got = await c.get_many(names)
            assert len(got) == 300
            for i, g in enumerate(got):
                assert os.eventfd_read(g.fileno()) == i + 1  # each one is the right descriptor, in order
                g.close()
            with pytest.raises(NotFound):
                await c.get_many([*names[:5], "batch/missing"])  # all or nothing

    try:
        run(main)
    finally:
        for fd in fds:
            os.close(fd)


def test_repeated_get_many_uses_batch_tokens_and_a_replace_voids_them(fdbroker_broker):
    fds = [os.eventfd(0) for _ in range(10)]
    names = [f"bt/e{i}" for i in range(10)]
    fresh = os.eventfd(0)

    async def main() -> None:
        async with aclient(fdbroker_broker, prefetch=4) as c:
            await c.put_many(list(zip(names, fds, strict=True)))
            for _ in range(6):
                got = await c.get_many(names)
                for i, g in enumerate(got):
                    os.eventfd_write(g.fileno(), i + 1)
                    g.close()
            # 1 RPC brings 4 batch tokens: 6 rounds = 2 RPCs + 4 redeems of the whole batch
            assert (c.stats["batch_get_rpcs"], c.stats["redeems"]) == (2, 4)
            await c.put("bt/e3", fresh, replace=True)
            got = await c.get_many(names, raw=True)
            assert all(isinstance(g, fdbroker.aio.OwnedFd) for g in got)
            os.eventfd_write(got[3].fileno(), 99)
            for g in got:
                g.close()
            assert c.stats["batch_get_rpcs"] == 3  # the voided batch token sent it back to the control plane

    try:
        run(main)
        assert [os.eventfd_read(fd) for fd in fds] == [6 * (i + 1) for i in range(10)]
        assert os.eventfd_read(fresh) == 99
    finally:
        for fd in [*fds, fresh]:
            os.close(fd)


def test_fifty_concurrent_gets_share_one_session(fdbroker_broker):
    r, w = os.pipe()

    async def main() -> int:
        async with aclient(fdbroker_broker) as c:
            await c.put("conc/pipe", w)

            async def one(i: int) -> None:
                g = await c.get_fd("conc/pipe")
                os.write(g.fileno(), bytes([i]))
                g.close()

            await asyncio.gather(*(one(i) for i in range(50)))
            assert c.stats["get_rpcs"] + c.stats["redeems"] == 50
            # concurrent gets of one name share prefetched tokens instead of 50 RPCs
            assert c.stats["redeems"] > 0
            info = await c.info()
            assert info.sessions == 1
            return c.stats["get_rpcs"]

    try:
        run(main)
        os.set_blocking(r, False)
        assert sorted(os.read(r, 100)) == list(range(50))
    finally:
        os.close(r)
        os.close(w)


def test_repeated_gets_use_prefetched_tokens_and_replace_voids_them(fdbroker_broker):
    r, w = os.pipe()
    r2, w2 = os.pipe()

    async def main() -> None:
        async with aclient(fdbroker_broker, prefetch=8) as c:
            await c.put("p/x", w)
            for _ in range(20):
                g = await c.get_fd("p/x")
                os.write(g.fileno(), b".")
                g.close()
            # 1 RPC brings 1 + 8 copies, and the Redeem of the last token 8 more: 20 gets = 1 RPC + 19 redeems
            assert (c.stats["get_rpcs"], c.stats["redeems"], c.stats["refills"]) == (1, 19, 2)
            # replacing the entry voids the prefetched tokens: the next get must see the new descriptor
            await c.put("p/x", w2, replace=True)
            g = await c.get_fd("p/x")
            os.write(g.fileno(), b"!")
            g.close()
            assert c.stats["get_rpcs"] == 2

    try:
        run(main)
        os.set_blocking(r2, False)
        assert os.read(r2, 10) == b"!"
        os.set_blocking(r, False)
        assert os.read(r, 100) == b"." * 20
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


def test_adaptive_prefetch_kicks_in_for_a_hot_name(fdbroker_broker):
    r, w = os.pipe()

    async def main() -> None:
        async with aclient(fdbroker_broker) as c:
            await c.put("hot/x", w)
            for _ in range(30):
                (await c.get_fd("hot/x")).close()
            assert c.stats["redeems"] > c.stats["get_rpcs"]

    try:
        run(main)
    finally:
        os.close(r)
        os.close(w)


def test_undelivered_descriptors_are_closed_not_leaked(fdbroker_broker):
    """A Deliver whose caller never claims it (an RPC made behind the client's back, and callers cancelled at
    every stage of a get) is closed by the client."""
    r, w = os.pipe()

    def fds_to(target: str) -> int:
        n = 0
        for f in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{f}") == target:
                    n += 1
            except OSError:
                pass
        return n

    pipe_w = os.readlink(f"/proc/self/fd/{w}")
    base = fds_to(pipe_w)  # both ends of a pipe read the same

    async def main() -> None:
        async with aclient(fdbroker_broker, prefetch=4) as c:
            await c.put("orph/x", w)
            # the broker delivers on the conduit for an RPC made behind the client's back: nobody claims it
            resp = await c.stub.Get(
                pb.GetRequest(name="orph/x"), metadata=[("fdbroker-session", c.session_id)]
            )
            assert len(resp.handoffs) == 1
            await c.ping()  # the Deliver was read and filed before the Pong
            assert c.raw.pending() == IDLE and fds_to(pipe_w) == base  # only our own w

            # a flow that asks for a delivery and walks away from it: the client closes it when the flow ends
            def get_and_walk_away() -> Flow[Any]:
                return (yield CallRpc("Get", pb.GetRequest(name="orph/x")))

            resp = await c.raw.run(get_and_walk_away())
            await c.ping()
            assert c.raw.pending() == IDLE and fds_to(pipe_w) == base
            # cancel gets at every point of their life
            for spins in range(0, 12):
                t = asyncio.ensure_future(c.get_fd("orph/x"))
                for _ in range(spins):
                    await asyncio.sleep(0)
                t.cancel()
                try:
                    g = await t
                    g.close()
                except asyncio.CancelledError:
                    pass
            await c.ping()
            assert c.raw.pending() == IDLE
            assert fds_to(pipe_w) == base
            g = await c.get_fd("orph/x")  # the session still works
            assert fds_to(pipe_w) == base + 1
            g.close()

    try:
        run(main)
    finally:
        os.close(r)
        os.close(w)


def test_lease_exclusive_and_shared_with_increasing_epochs(fdbroker_broker):
    r, w = os.pipe()

    async def main() -> None:
        async with aclient(fdbroker_broker) as c, aclient(fdbroker_broker) as other:
            await c.put("db/primary", w)
            async with c.lease("db/primary", ttl=5) as h1:
                assert h1.epoch >= 1 and h1.lease_id
                os.write(h1.fd.fileno(), b"1")
                with pytest.raises(FailedPrecondition):
                    await other.lease("db/primary", ttl=5)
                with pytest.raises(FailedPrecondition):
                    await other.get("db/primary")
                st = await other.stat("db/primary")
                assert st.lease.mode == "exclusive" and st.lease.epoch == h1.epoch
                # a waiter queues and is granted once h1 is released
                waiting = asyncio.ensure_future(other.lease("db/primary", ttl=5, wait=30))
                while (await c.stat("db/primary")).lease.waiters == 0:
                    await asyncio.sleep(0.01)
                assert not waiting.done()
            assert isinstance(h1.fd, fdbroker.aio.OwnedFd) and h1.fd.closed  # released on exit, fd closed
            h2 = await waiting
            assert h2.epoch > h1.epoch
            await h2.release()
            await h2.release()  # idempotent
            # shared leases coexist, each with a higher epoch
            async with (
                c.lease("db/primary", ttl=5, shared=True) as s1,
                other.lease("db/primary", ttl=5, shared=True) as s2,
            ):
                assert h2.epoch < s1.epoch < s2.epoch
                st = await c.stat("db/primary")
                assert st.lease.mode == "shared" and len(st.lease.holders) == 2
                with pytest.raises(FailedPrecondition):
                    await c.lease("db/primary", ttl=5)  # exclusive excluded by shared
            assert (await c.stat("db/primary")).lease.mode == ""

    try:
        run(main)
        os.set_blocking(r, False)
        assert os.read(r, 10) == b"1"
    finally:
        os.close(r)
        os.close(w)


def test_lease_keepalive_outlives_ttl_and_release_checks_in(fdbroker_broker):
    r, w = os.pipe()
    r2, w2 = os.pipe()

    async def main() -> None:
        async with aclient(fdbroker_broker) as c:
            await c.put("ka/x", w)
            h = await c.lease("ka/x", ttl=0.6)
            # renewals keep it alive: the broker's expiry moves forward past the original deadline
            first = (await c.stat("ka/x")).lease.holders[0][3]
            while (await c.stat("ka/x")).lease.holders[0][3] <= first + 0.6:
                await asyncio.sleep(0.05)
            assert not h.lost.is_set()
            await h.release(return_fd=w2)  # check in a different descriptor
            g = await c.get_fd("ka/x")
            os.write(g.fileno(), b"new")
            g.close()

    try:
        run(main)
        os.set_blocking(r2, False)
        assert os.read(r2, 10) == b"new"
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


def test_watch_sees_put_and_delete_with_revisions(fdbroker_broker):
    r, w = os.pipe()

    async def main() -> None:
        async with aclient(fdbroker_broker) as c:
            await c.put("other/x", r)
            async with c.watch("w/") as watch:
                header = await watch.started()
                assert header == watch.header_revision
                e = await c.put("w/a", r)
                rev = await c.delete("w/a")
                await c.put("other/y", r)  # outside the prefix
                await c.put("w/b", r)
                events = []
                async for ev in watch:
                    events.append(ev)
                    if len(events) == 3:
                        break
            assert [(ev.type, ev.name) for ev in events] == [
                ("put", "w/a"),
                ("delete", "w/a"),
                ("put", "w/b"),
            ]
            assert events[0].revision == e.revision and events[1].revision == rev
            assert header < events[0].revision < events[1].revision < events[2].revision
            # resuming from a listing's revision misses nothing
            listing = await c.list("w/")
            await c.put("w/c", r)
            resumed = c.watch("w/", start_revision=listing.revision + 1)
            ev = await resumed.__anext__()
            assert (ev.type, ev.name) == ("put", "w/c")
            await resumed.aclose()
            assert [x async for x in resumed] == []

    try:
        run(main)
    finally:
        os.close(r)
        os.close(w)


def test_watch_iteration_ends_when_the_client_closes(fdbroker_broker):
    async def main() -> None:
        c = aclient(fdbroker_broker)
        watch = c.watch()
        await watch.started()

        async def drain() -> list[Any]:
            return [ev async for ev in watch]

        t = asyncio.ensure_future(drain())
        await asyncio.sleep(0)
        await c.aclose()
        assert await t == []

    run(main)


def _scratch_broker() -> BrokerProcess:
    run_dir = Path(tempfile.mkdtemp(prefix="fdb-", dir="/tmp")) / "run"
    return BrokerProcess.start(run_dir)


@pytest.mark.parametrize("reconnect", [False, True], ids=["no-reconnect", "reconnect"])
def test_broker_killed_fails_pending_calls_and_leaks_nothing(reconnect: bool):
    """Calls waiting on the conduit when the broker dies fail — at once with Aborted without reconnecting; once
    their timeout has passed with Unavailable when they try again and no broker comes back — and nothing received
    is left open."""
    r, w = os.pipe()
    broker = _scratch_broker()
    try:

        async def main() -> None:
            async with fdbroker.aio.Client(broker.run_dir, prefetch=16, reconnect=reconnect, timeout=1) as c:
                await c.put("s/x", w)
                (await c.get_fd("s/x")).close()  # 16 prefetched tokens now
                os.kill(broker.pid, signal.SIGSTOP)  # frozen: redeems sit unanswered
                tasks = [asyncio.ensure_future(c.get_fd("s/x")) for _ in range(5)]
                while c.raw.pending()["waiting"] < 5:
                    await asyncio.sleep(0.01)
                assert not any(t.done() for t in tasks)
                os.kill(broker.pid, signal.SIGKILL)
                broker.proc.wait()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                if reconnect:
                    assert all(isinstance(x, Unavailable) for x in results), results
                    assert str(broker.run_dir) in str(results[0])
                else:
                    assert all(isinstance(x, Aborted) for x in results), results
                    assert "conduit" in str(results[0]) and "retry" in str(results[0])
                assert c.raw.pending() == IDLE
                with pytest.raises(Unavailable) as ei:
                    await c.get_fd("s/x")
                assert str(broker.run_dir) in str(ei.value)

        run(main)
    finally:
        broker.stop()
        os.close(r)
        os.close(w)


def test_broker_stopped_fails_a_queued_lease_wait_clearly():
    """Without reconnecting, at once (a waiter that reconnects queues again on a successor, and without one
    keeps trying until its wait and timeout have passed: tests/test_reconnect.py)."""
    r, w = os.pipe()
    broker = _scratch_broker()
    try:

        async def main() -> None:
            async with (
                fdbroker.aio.Client(broker.run_dir) as holder,
                fdbroker.aio.Client(broker.run_dir, reconnect=False) as waiter,
            ):
                await holder.put("q/x", w)
                h = await holder.lease("q/x", ttl=30)
                waiting = asyncio.ensure_future(waiter.lease("q/x", ttl=5, wait=60))
                while (await holder.stat("q/x")).lease.waiters == 0:
                    await asyncio.sleep(0.01)
                assert await asyncio.to_thread(broker.stop) == 0
                with pytest.raises(BrokerError) as ei:
                    await waiting
                assert isinstance(ei.value, (Unavailable, Aborted)), repr(ei.value)
                assert str(broker.run_dir) in str(ei.value)  # says which broker is gone
                await h.release()  # the session is gone: releasing still closes the handle's descriptor
                assert h.lost.is_set()

        run(main)
    finally:
        broker.stop()
        os.close(r)
        os.close(w)


def test_no_broker_is_unavailable_and_closed_client_refuses(tmp_path):
    async def main() -> None:
        c = fdbroker.aio.Client(tmp_path / "nothing-here")
        with pytest.raises(Unavailable) as ei:
            await c.connect()
        assert "fdbroker serve" in str(ei.value)
        await c.aclose()
        with pytest.raises(BrokerError):
            await c.info()

    run(main)
