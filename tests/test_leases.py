"""Leases through a real broker: mutual exclusion across processes, death-bound release, fencing epochs,
deadlines, the client's keep-alive, expiry by the housekeeping timer, check-in. Every test runs against a real
``fdbroker serve`` with the leak check of the ``fdbroker_broker`` fixture. The broker's lease bookkeeping on its
own (queue order, expiry and keep-alive arithmetic, every way a lease ends) is tested on a fake clock, without
sleeping, in tests/test_broker_inprocess.py."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import pytest
from brokerutil import spawn_client
from leaseutil import Collector, memfd, read_all

from fdbroker.errors import DeadlineExceeded, FailedPrecondition, NotFound


def _put_memfd(c, name: str, content: bytes = b"x", **kw) -> None:
    fd = memfd(content)
    try:
        c.put(name, fd, **kw)
    finally:
        os.close(fd)


def _wait_until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


class _Bg(threading.Thread):
    """Runs ``fn`` in a thread and keeps its result or exception."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:
            self.error = err

    def get(self, timeout: float = 30.0):
        self.join(timeout)
        assert not self.is_alive(), "background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------------------------------------------------------
# Mutual exclusion


@pytest.mark.slow
def test_exclusive_lease_mutual_exclusion_across_processes(fdbroker_broker, tmp_path):
    """N processes take an exclusive lease on a log file R times each and append start/end lines through the
    leased descriptor while holding it: the log shows no overlap and strictly increasing epochs."""
    n, rounds = 6, 12
    log_path = tmp_path / "log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with fdbroker_broker.client() as c:
        c.put("mx/log", fd)
    os.close(fd)
    code = f"""
        import fdbroker, os, time
        with fdbroker.Client() as c:
            for i in range({rounds}):
                with c.lease("mx/log", ttl=30, wait=120) as h:
                    out = h.fd.fileno()
                    os.write(out, f"{{h.epoch}} {{os.getpid()}} start\\n".encode())
                    time.sleep(0.003)
                    os.write(out, f"{{h.epoch}} {{os.getpid()}} end\\n".encode())
        """
    t0 = time.monotonic()
    procs = [spawn_client(fdbroker_broker.run_dir, code) for _ in range(n)]
    for p in procs:
        _out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    elapsed = time.monotonic() - t0
    lines = [ln.split() for ln in log_path.read_text().splitlines()]
    assert len(lines) == 2 * n * rounds
    epochs = []
    for start, end in zip(lines[0::2], lines[1::2], strict=True):
        assert start[2] == "start" and end[2] == "end", (start, end)
        assert start[:2] == end[:2], f"overlap: {start} then {end}"
        epochs.append(int(start[0]))
    assert all(a < b for a, b in itertools.pairwise(epochs)), "epochs not strictly increasing"
    assert len({ln[1] for ln in lines}) == n
    print(
        f"\n{n} processes x {rounds} exclusive leases in {elapsed:.2f}s ({n * rounds / elapsed:.0f} grants/s)"
    )
    with fdbroker_broker.client() as c:
        e = c.stat("mx/log")
        assert e.lease.mode == "" and e.lease.waiters == 0 and e.lease.epoch == epochs[-1]


# ---------------------------------------------------------------------------------------------------------------
# Death-bound release


@pytest.mark.slow
def test_kill9_of_holder_releases_at_once_and_waiter_gets_it(fdbroker_broker):
    with fdbroker_broker.client() as c:
        _put_memfd(c, "k/res")
    child = spawn_client(
        fdbroker_broker.run_dir,
        """
        import fdbroker, time
        c = fdbroker.Client()
        h = c.lease("k/res", ttl=600, keepalive=False)
        print(h.lease_id, h.epoch, flush=True)
        time.sleep(600)
        """,
    )
    try:
        assert child.stdout is not None
        lease_id, epoch = child.stdout.readline().split()
        with fdbroker_broker.client() as c, Collector(c, "k/") as col:
            waiter = _Bg(lambda: c.lease("k/res", ttl=30, wait=60, keepalive=False))
            _wait_until(lambda: c.stat("k/res").lease.waiters == 1, what="waiter queued")
            t_kill_wall, t_kill = time.time(), time.monotonic()
            os.kill(child.pid, signal.SIGKILL)
            h = waiter.get(60)
            latency = time.monotonic() - t_kill
            ev = col.wait_for(lambda e: e.type == "lease_released" and e.lease_id == lease_id)
            with h:
                assert ev.reason == "holder_died" and ev.epoch == int(epoch)
                assert h.epoch > int(epoch)
                granted = col.wait_for(lambda e: e.type == "lease_granted")
                assert granted.lease_id == h.lease_id and granted.revision == ev.revision + 1
                e = c.stat("k/res")
                assert [x[1] for x in e.lease.holders] == [os.getpid()]
        print(
            f"\nkill -9 -> lease released (broker event) {max(0.0, ev.time - t_kill_wall) * 1000:.1f} ms, "
            f"-> waiter holds it {latency * 1000:.1f} ms"
        )
        assert latency < 5.0  # the lease TTL is 600 s: only the session's end can explain this
    finally:
        child.kill()
        child.communicate()


# ---------------------------------------------------------------------------------------------------------------
# FIFO


# The queue's order (a queued exclusive request holds back later shared ones; a stream of overlapping shared
# holders cannot starve an exclusive waiter) is broker bookkeeping: tests/test_broker_inprocess.py drives it
# step by step, without threads or sleeps.


# ---------------------------------------------------------------------------------------------------------------
# Conflicts, deadlines


def test_get_take_delete_replace_under_anothers_exclusive_lease_name_the_holder(fdbroker_broker):
    with fdbroker_broker.client() as c:
        _put_memfd(c, "x/res", b"guarded")
    child = spawn_client(
        fdbroker_broker.run_dir,
        """
        import fdbroker, sys
        c = fdbroker.Client()
        h = c.lease("x/res", ttl=600, keepalive=False)
        print(h.epoch, flush=True)
        import time; time.sleep(600)
        """,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        holder = rf"pid {child.pid}\b.*uid {os.getuid()}\b"
        with fdbroker_broker.client() as c:
            for op in (lambda: c.get("x/res"), lambda: c.take("x/res"), lambda: c.delete("x/res")):
                with pytest.raises(FailedPrecondition, match=holder) as ei:
                    op()
                assert "until" in str(ei.value)  # the expiry
            with pytest.raises(FailedPrecondition, match=holder):
                _put_memfd(c, "x/res", replace=True)
            with pytest.raises(FailedPrecondition, match=holder):
                c.lease("x/res", ttl=5, shared=True)
            assert c.stat("x/res").lease.holders[0][1] == child.pid  # stat is never blocked
    finally:
        child.kill()
        child.communicate()
    with fdbroker_broker.client() as c:  # the holder died: everything is allowed again
        _wait_until(lambda: not c.stat("x/res").lease.holders, what="release on death")
        with c.get("x/res") as f:
            assert read_all(f) == b"guarded"


def test_holder_may_use_its_own_exclusive_lease(fdbroker_broker):
    with fdbroker_broker.client() as c:
        _put_memfd(c, "own/res", b"mine")
        with c.lease("own/res", ttl=30) as h:
            with c.get("own/res") as f:
                assert read_all(f) == b"mine"
            assert read_all(h.fd) == b"mine"


def test_lease_wait_deadline_exceeded(fdbroker_broker):
    with fdbroker_broker.client() as a, fdbroker_broker.client() as b:
        _put_memfd(a, "d/res")
        with a.lease("d/res", ttl=30):
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=rf"'d/res'.*pid {os.getpid()}"):
                b.lease("d/res", ttl=5, wait=1.0)
            waited = time.monotonic() - t0
            assert 0.5 < waited < 10, waited
            assert a.stat("d/res").lease.waiters == 0  # the waiter left the queue
        with b.lease("d/res", ttl=5, wait=1.0) as h:  # free now: granted at once
            assert h.epoch > 0


def test_no_wait_conflict_is_failed_precondition_naming_holder(fdbroker_broker):
    with fdbroker_broker.client() as a, fdbroker_broker.client() as b:
        _put_memfd(a, "c/res")
        with a.lease("c/res", ttl=30, shared=True) as h:
            with pytest.raises(
                FailedPrecondition, match=rf"pid {os.getpid()} \(uid {os.getuid()}, shared, epoch"
            ):
                b.lease("c/res", ttl=5)
            with b.lease("c/res", ttl=5, shared=True) as h2:
                assert h2.epoch > h.epoch


# ---------------------------------------------------------------------------------------------------------------
# Keep-alive and expiry


def test_the_handles_keepalive_thread_keeps_a_short_lease(fdbroker_broker):
    """The client's keep-alive thread against a real broker and its housekeeping timer. Renewal arithmetic and
    expiry without keep-alive are tested on a fake clock in tests/test_broker_inprocess.py."""
    with fdbroker_broker.client() as c, Collector(c, "ka/") as col:
        _put_memfd(c, "ka/res")
        with c.lease("ka/res", ttl=0.6) as h:  # renewed every 0.2 s by the handle's thread
            first = h.lease.expire_time
            time.sleep(1.2)  # two TTLs: without renewals the broker would have expired it
            e = c.stat("ka/res")
            assert [x[0] for x in e.lease.holders] == [h.lease_id] and not h.lost.is_set()
            assert e.lease.holders[0][3] > first + 0.4  # the expiry moved forward
        ev = col.wait_for(lambda e: e.type == "lease_released" and e.lease_id == h.lease_id)
        assert ev.reason == "released"


# ---------------------------------------------------------------------------------------------------------------
# Check-in


def test_checkin_replaces_the_descriptor_and_the_next_holder_gets_the_new_one(fdbroker_broker):
    with fdbroker_broker.client() as a, fdbroker_broker.client() as b, Collector(a, "pool/") as col:
        _put_memfd(a, "pool/conn", b"old", labels={"pool": "db"})
        h = a.lease("pool/conn", ttl=30)
        assert read_all(h.fd) == b"old"
        nxt = _Bg(lambda: b.lease("pool/conn", ttl=30, wait=30))
        _wait_until(lambda: a.stat("pool/conn").lease.waiters == 1)
        new = memfd(b"new")
        try:
            h.release(return_fd=new)
        finally:
            os.close(new)
        with nxt.get() as h2:  # the waiter gets the checked-in descriptor, never the old one
            assert read_all(h2.fd) == b"new"
        with a.get("pool/conn") as f:
            assert read_all(f) == b"new"
        e = a.stat("pool/conn")
        assert e.labels == {"pool": "db"}  # the entry's options survive the check-in
        put = col.wait_for(lambda e: e.type == "put")
        rel = col.wait_for(lambda e: e.type == "lease_released")
        assert rel.lease_id == h.lease_id and rel.reason == "released" and put.revision < rel.revision


def test_checkin_refused_when_entry_was_replaced_since_the_grant(fdbroker_broker):
    """The settled question: a plain release is always allowed (the lease belongs to the name and survives a
    replace), but a check-in of an entry replaced since the grant is refused and changes nothing."""
    with fdbroker_broker.client() as c:
        _put_memfd(c, "cas/res", b"v1")
        h = c.lease("cas/res", ttl=30, keepalive=False)
        _put_memfd(c, "cas/res", b"v2", replace=True)  # the holder may replace under its own lease
        assert [x[0] for x in c.stat("cas/res").lease.holders] == [h.lease_id]  # the lease followed the name
        new = memfd(b"v3")
        try:
            with pytest.raises(FailedPrecondition, match="replaced since"):
                c.release(h.lease_id, return_fd=new)
        finally:
            os.close(new)
        assert [x[0] for x in c.stat("cas/res").lease.holders] == [h.lease_id]  # still held
        c.release(h.lease_id)  # a plain release works
        h.fd.close()
        with c.get("cas/res") as f:
            assert read_all(f) == b"v2"


def test_checkin_after_expiry_is_refused(fdbroker_broker):
    with fdbroker_broker.client() as c, Collector(c, "exp/") as col:
        _put_memfd(c, "exp/res", b"kept")
        h = c.lease("exp/res", ttl=0.2, keepalive=False)
        col.wait_for(lambda e: e.type == "lease_released" and e.reason == "expired")
        new = memfd(b"late")
        try:
            with pytest.raises(NotFound):
                h.client.release(h.lease_id, return_fd=new)
        finally:
            os.close(new)
        h.fd.close()
        with c.get("exp/res") as f:
            assert read_all(f) == b"kept"


# ---------------------------------------------------------------------------------------------------------------
# Fencing epochs


def test_epoch_keeps_increasing_across_delete_and_reput(fdbroker_broker):
    epochs: list[int] = []
    with fdbroker_broker.client() as c:
        for _ in range(4):
            _put_memfd(c, "ep/res")
            for shared in (False, True, True):
                with c.lease("ep/res", ttl=5, shared=shared) as h:
                    epochs.append(h.epoch)
                    assert c.stat("ep/res").lease.epoch == h.epoch
            c.delete("ep/res")
        assert all(a < b for a, b in itertools.pairwise(epochs)), epochs


def test_delete_by_holder_ends_lease_and_fails_waiters(fdbroker_broker):
    with fdbroker_broker.client() as a, fdbroker_broker.client() as b, Collector(a, "del/") as col:
        _put_memfd(a, "del/res")
        h = a.lease("del/res", ttl=30, keepalive=False)
        w = _Bg(lambda: b.lease("del/res", ttl=5, wait=30))
        _wait_until(lambda: a.stat("del/res").lease.waiters == 1)
        a.delete("del/res")
        with pytest.raises(NotFound, match="removed while waiting"):
            w.get()
        ev = col.wait_for(lambda e: e.type == "lease_released")
        assert ev.lease_id == h.lease_id and ev.reason == "entry_removed"
        assert col.wait_for(lambda e: e.type == "delete").revision == ev.revision + 1
        assert list(a.keepalive([h.lease_id]).gone) == [h.lease_id]
        h.release()  # already gone: closes the descriptor quietly


def test_put_without_replace_of_a_leased_entry_is_already_exists(fdbroker_broker):
    """Found by the model: the lease check ran before the existence check and said "cannot replace" to a put
    that never asked to replace."""
    from fdbroker.errors import AlreadyExists

    with fdbroker_broker.client() as a, fdbroker_broker.client() as b:
        _put_memfd(a, "ae/res")
        with b.lease("ae/res", ttl=30):
            with pytest.raises(AlreadyExists):
                _put_memfd(a, "ae/res")
            with pytest.raises(FailedPrecondition, match="cannot replace"):
                _put_memfd(a, "ae/res", replace=True)
